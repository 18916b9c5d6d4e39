"""Our Mimi codec against moshi's (the reference, test-only) on a tiny random codec; real-size inventory."""

from __future__ import annotations

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import math  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from moshi.models import loaders  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from kyutai_tts_plugin.errors import CheckpointError  # noqa: E402
from kyutai_tts_plugin.mimi import (  # noqa: E402
    REAL_MIMI_CONFIG,
    TINY_MIMI_CONFIG,
    MimiConfig,
    MimiModel,
    MimiStreamingDecoder,
    random_mimi_state_dict,
)

FRAME = 1920


def randomize(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random values for moshi's own state dict, scaled so that the decoded audio is O(0.1..1)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        noise = torch.randn(t.shape, generator=gen)
        if key.endswith("_initialized"):
            v = torch.ones(t.shape)
        elif key.endswith("cluster_usage"):
            v = torch.rand(t.shape, generator=gen) * 2 + 0.2
        elif key.endswith("embedding_sum"):  # centroids = sum / usage ~ N(0, 1/dim)
            v = noise * out[key.replace("embedding_sum", "cluster_usage")][:, None] / math.sqrt(t.shape[1])
        elif key.endswith(".scale"):
            v = 0.2 * torch.rand(t.shape, generator=gen)
        elif "norm" in key and key.endswith(".weight"):
            v = 1 + 0.2 * noise
        elif key.endswith(".bias"):
            v = 0.1 * noise
        elif "convtr" in key:
            v = noise / math.sqrt(2 * t.shape[0])
        else:
            v = noise / math.sqrt(math.prod(t.shape[1:]))
        out[key] = v.float().contiguous()
    return out


def fused(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """moshi module names -> the released checkpoint's names (Mimi attention has one weight set)."""
    out = {}
    for key, value in state.items():
        key = key.replace(".in_projs.0.weight", ".in_proj_weight").replace(
            ".out_projs.0.weight", ".out_proj.weight"
        )
        out[key] = value
    return out


def moshi_mimi(config: MimiConfig = TINY_MIMI_CONFIG, device: str = "cpu"):
    return loaders.get_mimi(None, config.to_dict(), device=device, num_codebooks=32)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path, Path]:
    ref = moshi_mimi()
    state = randomize(ref.state_dict(), seed=1)
    ref.load_state_dict(state)
    root = tmp_path_factory.mktemp("mimi")
    save_file(fused(state), root / "fused.safetensors")
    save_file(state, root / "modules.safetensors")
    return ref, root / "fused.safetensors", root / "modules.safetensors"


@pytest.fixture(scope="module")
def ref(files):
    return files[0]


@pytest.fixture(scope="module")
def ours(files) -> MimiModel:
    return MimiModel.from_safetensors(files[1], TINY_MIMI_CONFIG)


def moshi_stream(ref, codes: torch.Tensor) -> torch.Tensor:
    ref.set_num_codebooks(codes.shape[1])
    try:
        with ref.streaming(codes.shape[0]), torch.no_grad():
            return torch.cat([ref.decode(codes[:, :, t : t + 1]) for t in range(codes.shape[-1])], dim=-1)
    finally:
        ref.set_num_codebooks(32)


def our_stream(dec: MimiStreamingDecoder, codes: torch.Tensor, rows: list[int]) -> torch.Tensor:
    frames = [dec.decode_step(codes[:, :, t : t + 1], rows) for t in range(codes.shape[-1])]
    return torch.stack(frames, dim=1).reshape(codes.shape[0], 1, -1)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# -- 1. loading -----------------------------------------------------------------------------------


def test_both_attention_namings_load_the_same_tensors(files, ref):
    _, fused_path, modules_path = files
    a = MimiModel.from_safetensors(fused_path, TINY_MIMI_CONFIG)
    b = MimiModel.from_safetensors(modules_path, TINY_MIMI_CONFIG)
    sa, sb = a.checkpoint_state_dict(), b.checkpoint_state_dict()
    assert "decoder_transformer.transformer.layers.0.self_attn.in_proj_weight" in sa
    assert sa.keys() == load_file(fused_path).keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # Codebooks are the EMA ratio, as in moshi.
    cb = a.quantizer.rvq_rest.vq.layers[3]._codebook.embedding
    assert torch.equal(cb, ref.quantizer.rvq_rest.vq.layers[3]._codebook.embedding)
    assert not a.training and not any(p.requires_grad for p in a.parameters())


def test_config_round_trip_and_real_constants():
    assert REAL_MIMI_CONFIG.to_dict() == loaders._mimi_config
    assert MimiConfig.from_dict(TINY_MIMI_CONFIG.to_dict()) == TINY_MIMI_CONFIG
    tiny = MimiModel(TINY_MIMI_CONFIG)
    assert (tiny.sample_rate, tiny.frame_rate, tiny.frame_size, tiny.num_codebooks) == (
        24000,
        12.5,
        FRAME,
        32,
    )
    d = TINY_MIMI_CONFIG.to_dict()
    del d["transformer"]["positional_embedding"]
    with pytest.raises(CheckpointError, match="transformer.positional_embedding"):
        MimiConfig.from_dict(d)


# -- 2. streaming parity ------------------------------------------------------------------------


@pytest.mark.parametrize(("n_q", "rows"), [(32, [0, 1]), (8, [2, 0])])
def test_streaming_decode_matches_moshi(ref, ours, n_q, rows):
    codes = torch.randint(0, 2048, (2, n_q, 32), generator=torch.Generator().manual_seed(n_q))
    expected = moshi_stream(ref, codes)
    got = our_stream(MimiStreamingDecoder(ours, 3), codes, rows)
    assert expected.abs().std().item() > 0.05  # a real signal, not a noise floor
    assert max_diff(got, expected) <= 1e-5


def test_streaming_decode_matches_moshi_past_the_attention_window(ref, ours):
    codes = torch.randint(0, 2048, (1, 32, 140), generator=torch.Generator().manual_seed(7))  # 280 > 250
    assert max_diff(our_stream(MimiStreamingDecoder(ours, 1), codes, [0]), moshi_stream(ref, codes)) <= 1e-5


# -- 3. one-shot decode -------------------------------------------------------------------------


@pytest.mark.parametrize("n_q", [32, 8, 1])
def test_one_shot_decode_matches_moshi_and_our_stream(ref, ours, n_q):
    codes = torch.randint(0, 2048, (2, n_q, 40), generator=torch.Generator().manual_seed(3))
    ref.set_num_codebooks(n_q)
    with torch.no_grad():
        expected = ref.decode(codes)
    ref.set_num_codebooks(32)
    got = ours.decode(codes)
    assert got.shape == (2, 1, 40 * FRAME)
    assert max_diff(got, expected) <= 1e-5
    assert max_diff(got, our_stream(MimiStreamingDecoder(ours, 2), codes, [0, 1])) <= 1e-5


def test_one_shot_decode_past_the_window_follows_moshi_one_shot(ref, ours):
    # One-shot attention sees the full 250-position window; streaming two positions at a time sees 249
    # for the first of each pair once the ring is full (moshi's own behaviour): both are reproduced.
    codes = torch.randint(0, 2048, (1, 32, 140), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = ref.decode(codes)
    assert max_diff(ours.decode(codes), expected) <= 1e-5


# -- 4. independent rows ------------------------------------------------------------------------


def test_rows_are_independent_started_late_paused_and_reset(ours):
    gen = torch.Generator().manual_seed(11)
    streams = {name: torch.randint(0, 2048, (1, 16, 24), generator=gen) for name in "abcd"}
    # row -> list of (stream name, first step); row 1 is reset at step 12 and takes stream "d".
    start = {"a": 0, "b": 3, "c": 5, "d": 12}
    row_of = {"a": 2, "b": 0, "c": 1, "d": 1}
    paused = {("a", 8), ("a", 9), ("b", 15)}  # steps where a stream is not decoded (it just waits)
    dec = MimiStreamingDecoder(ours, 4)
    pos = dict.fromkeys(start, 0)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in start}
    for step in range(30):
        live = []
        for name in "dcba":  # a non-contiguous, unsorted row order
            if step == start[name]:
                dec.reset([row_of[name]])
            if step < start[name] or (name, step) in paused or pos[name] >= 24:
                continue
            if name == "c" and step >= start["d"]:
                continue  # "c" lost its slot to "d"
            live.append(name)
        if not live:
            continue
        codes = torch.cat([streams[k][:, :, pos[k] : pos[k] + 1] for k in live])
        rows = [row_of[k] for k in live]
        pcm = dec.decode_step(codes, torch.tensor(rows) if step % 2 else rows)  # both row forms
        for i, k in enumerate(live):
            out[k].append(pcm[i])
            pos[k] += 1
    for name, frames in out.items():
        alone = ours.decode(streams[name][:, :, : len(frames)])[0, 0]
        assert len(frames) >= 7
        assert max_diff(torch.cat(frames), alone) <= 1e-5, name


# -- 5. encode ----------------------------------------------------------------------------------


def test_encode_matches_moshi_exactly(ref, ours):
    pcm = 0.3 * torch.randn(2, 1, 24000, generator=torch.Generator().manual_seed(2))  # 12.5 frames
    with torch.no_grad():
        expected = ref.encode(pcm)
    got = ours.encode(pcm)
    assert got.shape == (2, 32, 13) and got.dtype == torch.long
    assert got.unique().numel() > 300  # the quantizer really chooses among its centroids
    assert torch.equal(got, expected)
    assert torch.equal(ours.encode(pcm, n_q=8), expected[:, :8])


# -- 6. real-size inventory ---------------------------------------------------------------------


def test_real_size_inventory_matches_moshi():
    with torch.device("meta"):
        ref = moshi_mimi(REAL_MIMI_CONFIG, device="meta")
        ours = MimiModel(REAL_MIMI_CONFIG)
    ref_shapes = {k: tuple(v.shape) for k, v in fused(ref.state_dict()).items()}
    assert len(ref_shapes) == 318
    assert sum(math.prod(s) * 4 for s in ref_shapes.values()) == 384_605_572
    assert {k: tuple(v.shape) for k, v in ours.checkpoint_state_dict().items()} == ref_shapes


def test_random_state_dict_is_a_valid_checkpoint_for_moshi_and_us(tmp_path: Path):
    state = random_mimi_state_dict(TINY_MIMI_CONFIG, seed=4)
    assert all(v.dtype == torch.float32 for v in state.values())
    ref = moshi_mimi()
    ref.load_state_dict(state)  # strict, fused names through moshi's load hook
    save_file(state, tmp_path / "m.safetensors")
    ours = MimiModel.from_safetensors(tmp_path / "m.safetensors", TINY_MIMI_CONFIG)
    codes = torch.randint(0, 2048, (1, 32, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref.decode(codes)
    assert expected.std().item() > 0.05
    assert max_diff(ours.decode(codes), expected) <= 1e-5


# -- 7. checkpoint errors -----------------------------------------------------------------------


def test_checkpoint_errors_name_the_file_and_the_key(files, tmp_path: Path):
    good = files[1]
    bad = tmp_path / "bad.safetensors"

    def load_with(edit) -> str:
        state = load_file(good)
        edit(state)
        save_file(state, bad)
        with pytest.raises(CheckpointError) as info:
            MimiModel.from_safetensors(bad, TINY_MIMI_CONFIG)
        assert str(bad) in str(info.value)
        return str(info.value)

    key = "decoder.model.0.conv.conv.weight"
    msg = load_with(lambda s: s.pop(key))
    assert f"missing tensor '{key}'" in msg and "expected float32 [64, 32, 7]" in msg
    key = "upsample.convtr.convtr.convtr.weight"
    msg = load_with(lambda s: s.__setitem__(key, torch.zeros(3, 1, 4)))
    assert f"'{key}' has shape [3, 1, 4], expected [32, 1, 4]" in msg
    key = "quantizer.rvq_first.vq.layers.0._codebook.embedding_sum"
    msg = load_with(lambda s: s.__setitem__(key, s[key].half()))
    assert f"'{key}' has dtype torch.float16, expected torch.float32" in msg
    msg = load_with(lambda s: s.__setitem__("decoder.extra", torch.zeros(1)))
    assert "unexpected tensor 'decoder.extra'" in msg

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.safetensors: truncated"):
        MimiModel.from_safetensors(truncated, TINY_MIMI_CONFIG)
    with pytest.raises(
        CheckpointError, match=r"'encoder.model.0.conv.conv.weight' has shape \[4, 1, 7\], expected \[64"
    ):
        MimiModel.from_safetensors(good, REAL_MIMI_CONFIG)  # the wrong config for the file


def test_bad_rows_and_codes_are_rejected(ours):
    dec = MimiStreamingDecoder(ours, 2)
    codes = torch.zeros(2, 32, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="distinct"):
        dec.decode_step(codes, [1, 1])
    with pytest.raises(ValueError, match="distinct"):
        dec.decode_step(codes, [0, 2])
    with pytest.raises(ValueError, match=r"\[1, n_q, 1\]"):
        dec.decode_step(codes, [0])
    with pytest.raises(ValueError, match="1 <= n <= 32"):
        ours.decode(torch.zeros(1, 33, 2, dtype=torch.long))
