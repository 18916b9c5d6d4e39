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


def test_ties_at_the_top_k_boundary_break_the_same_way_for_any_candidate_bound():
    # Logits on a coarse grid: many exact ties, also at each row's k-th rank. The candidates must be a
    # row's first k entries in (probability descending, id ascending) order whatever bound the batch
    # asks for, else a row's draw would depend on its neighbours' top-k.
    gen = torch.Generator().manual_seed(3)
    n, vocab = 256, 512
    logits = torch.randint(0, 6, (n, vocab), generator=gen).float()
    noise = torch.empty(n, vocab).exponential_(1, generator=gen)
    temps = torch.full((n,), 0.8)
    topks = torch.tensor([1, 3, 7, 50, 100, 0, 128, 200] * (n // 8))

    def draw(bound: int) -> torch.Tensor:
        return sample_with_noise(logits, temps, topks, lambda entries: noise.gather(-1, entries), bound)

    # The reference: a stable descending sort (ties in id order), the first k, the race, first max.
    values, order = torch.sort(torch.softmax(logits / 0.8, -1), dim=-1, descending=True, stable=True)
    k = torch.where(topks > 0, topks, torch.full_like(topks, vocab))
    kept = torch.where(torch.arange(vocab) < k[:, None], values, torch.zeros_like(values))
    choice = torch.argmax(kept / noise.gather(-1, order), dim=-1, keepdim=True)
    expected = order.gather(-1, choice)[:, 0].tolist()
    for bound in (vocab, 256):
        rows = topks.clamp(max=bound) == topks  # rows whose k fits this bound (0 = whole vocabulary)
        rows &= (topks > 0) | (bound == vocab)
        got = draw(bound)
        assert got[rows].tolist() == [e for e, r in zip(expected, rows.tolist(), strict=True) if r]


def test_noise_is_positive_and_finite_at_both_ends_of_its_bits():
    # All-ones bits used to give u = 1.0 in float32, E = 0, and NaN scores (argmax's favourite) for
    # the candidates past a row's top-k: a bound-dependent draw outside the top-k.
    u = ours.open_unit_interval(torch.tensor([-1, 0, 1 << 62]))
    e = -torch.log(u)
    assert bool(((u > 0) & (u < 1)).all()) and bool((e > 0).all()) and bool(torch.isfinite(e).all())
