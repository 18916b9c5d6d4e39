"""Device sampling: moshi's law under the same noise, and per-row reproducibility in any batch."""

from __future__ import annotations

import types

import pytest
import torch

import kyutai_tts_plugin.sampling as ours
from kyutai_tts_plugin.sampling import mix64, mix64_reference, sample, sample_with_noise, stream_keys


def test_mix64_matches_the_unsigned_reference():
    values = [0, 1, -1, 2**63 - 1, -(2**63), 123456789, -987654321987]
    got = [int(x) & ((1 << 64) - 1) for x in mix64(torch.tensor(values))]
    assert got == [mix64_reference(v) for v in values]


def _moshi_pick(monkeypatch, logits: torch.Tensor, temp: float, k: int, noise: torch.Tensor) -> torch.Tensor:
    """moshi's `sample_token` with its exponential draw replaced by `noise` (one value per vocabulary
    entry, read at the entries moshi's top-k kept, in its rank order)."""
    from moshi.utils import sampling as ref

    captured: dict[str, torch.Tensor] = {}

    class Shim(types.SimpleNamespace):
        def __getattr__(self, name: str):
            return getattr(torch, name)

        def topk(self, probs, kk, dim=-1):
            values, indices = torch.topk(probs, kk, dim=dim)
            captured["indices"] = indices
            return values, indices

        def empty_like(self, x):
            indices = captured.get("indices")
            drawn = noise if indices is None else noise.gather(-1, indices)
            return types.SimpleNamespace(exponential_=lambda *a, **kw: drawn.reshape(x.shape).clone())

    monkeypatch.setattr(ref, "torch", Shim())
    try:
        return ref.sample_token(logits, use_sampling=temp > 0, temp=temp, top_k=k)
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("temp,k", [(0.6, 250), (0.6, 25), (1.0, 0), (0.3, 1), (0.0, 250)])
def test_sampling_law_is_moshis_under_the_same_noise(monkeypatch, temp, k):
    gen = torch.Generator().manual_seed(int(temp * 100) + k)
    n, vocab = 512, 2048
    logits = torch.randn(n, vocab, generator=gen) * 3
    noise = torch.empty(n, vocab).exponential_(1, generator=gen)
    expected = _moshi_pick(monkeypatch, logits, temp, k, noise)
    got = sample_with_noise(
        logits,
        torch.full((n,), temp),
        torch.full((n,), k, dtype=torch.long),
        lambda entries: noise.gather(-1, entries),
        vocab if k == 0 else k,
    )
    assert torch.equal(got, expected)


def test_seeded_rows_draw_the_same_alone_and_in_any_batch():
    # 128 seeds, each alone and inside a batch of 16 rows with other settings (greedy and sampled,
    # other top-k and steps): a row's tokens depend on its own seed and step only.
    gen = torch.Generator().manual_seed(0)
    vocab, streams = 2048, 9
    seeds = torch.randint(-(2**62), 2**62, (128,), generator=gen)
    logits = torch.randn(128, streams, vocab, generator=gen) * 2
    steps = torch.randint(0, 5000, (128,), generator=gen)
    temps = torch.tensor([0.0, 0.6, 0.6, 1.0] * 32)
    topks = torch.tensor([250, 250, 0, 25] * 32)
    ids = torch.arange(streams)

    def run(rows: torch.Tensor) -> torch.Tensor:
        keys = stream_keys(seeds[rows], steps[rows], ids)
        k_max = max(vocab if int(k) == 0 else int(k) for k in topks[rows])
        return sample(logits[rows], temps[rows], topks[rows], keys, k_max)

    alone = torch.stack([run(torch.tensor([i]))[0] for i in range(128)])
    for start in range(0, 128, 16):
        perm = torch.randperm(16, generator=gen) + start
        batch = run(perm)
        assert torch.equal(batch, alone[perm])
    assert torch.equal(alone[temps == 0], logits[temps == 0].argmax(-1))
    # The draws are not degenerate: sampled rows mostly differ from greedy.
    assert (alone[temps > 0] != logits[temps > 0].argmax(-1)).float().mean() > 0.3


def test_noise_is_exponential():
    keys = stream_keys(torch.arange(64), torch.zeros(64, dtype=torch.long), torch.arange(4))
    e = ours.exponential_noise(keys, torch.arange(2048).expand(64, 4, 2048))
    assert abs(float(e.mean()) - 1.0) < 0.01 and abs(float(e.var()) - 1.0) < 0.03
