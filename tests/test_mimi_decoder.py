"""Our streaming Mimi decoder against moshi's Mimi (the reference), on a tiny random codec."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kyutai_tts_plugin.errors import CheckpointError
from kyutai_tts_plugin.mimi import (
    REAL_MIMI_CONFIG,
    TINY_MIMI_CONFIG,
    MimiModel,
    MimiStreamingDecoder,
    encoder_shapes,
    random_mimi_state_dict,
)

from .moshi_oracle import _fused_names

os.environ.setdefault("NO_TORCH_COMPILE", "1")
from moshi.models import loaders  # noqa: E402


@pytest.fixture(scope="module")
def codecs(tmp_path_factory: pytest.TempPathFactory):
    ref = loaders.get_mimi(None, TINY_MIMI_CONFIG.to_dict(), num_codebooks=32)
    state = random_mimi_state_dict(TINY_MIMI_CONFIG, seed=3)
    ref.load_state_dict(state)  # moshi's load hook accepts the fused checkpoint names
    path = tmp_path_factory.mktemp("mimi") / "mimi.safetensors"
    save_file(state, path)
    return ref, MimiModel.from_safetensors(path, TINY_MIMI_CONFIG), path


def reference_stream(ref, codes: torch.Tensor) -> torch.Tensor:
    ref.set_num_codebooks(codes.shape[1])
    with ref.streaming(codes.shape[0]), torch.no_grad():
        return torch.cat([ref.decode(codes[:, :, t : t + 1]) for t in range(codes.shape[-1])], dim=-1)


@pytest.mark.parametrize("n_q", [32, 8])
def test_streaming_decode_matches_moshi_past_the_window(codecs, n_q):
    ref, ours, _ = codecs
    codes = torch.randint(0, 2048, (2, n_q, 140))  # 280 transformer positions > its 250 window
    expected = reference_stream(ref, codes)
    dec = MimiStreamingDecoder(ours, 3)
    frames = [dec.decode_step(codes[:, :, t : t + 1], [0, 2]) for t in range(codes.shape[-1])]
    got = torch.stack(frames, dim=1).reshape(2, 1, -1)
    assert (got - expected).abs().max().item() <= 1e-5
    # Our one-shot decode is the streaming path. (moshi's own one-shot decode differs from its
    # streaming decode by ~1e-4 on random weights: float32 summation order over long convolutions.)
    assert (ours.decode(codes) - expected).abs().max().item() <= 1e-5


def test_rows_are_independent_and_reset(codecs):
    _, ours, _ = codecs
    a, b = torch.randint(0, 2048, (1, 16, 20)), torch.randint(0, 2048, (1, 16, 20))
    solo_a = ours.decode(a)[0, 0]
    dec = MimiStreamingDecoder(ours, 2)
    out_a = []
    for t in range(20):
        if t == 7:  # row 1 starts a new stream while row 0 keeps going
            dec.reset([1])
        rows = [0, 1] if t >= 7 else [0]
        codes = torch.cat([a[:, :, t : t + 1], b[:, :, t - 7 : t - 6]]) if t >= 7 else a[:, :, t : t + 1]
        out = dec.decode_step(codes, rows)
        out_a.append(out[0])
    assert torch.allclose(torch.cat(out_a), solo_a, atol=1e-6)
    solo_b = ours.decode(b[:, :, :13])[0, 0]
    dec.reset([0])
    rest = [dec.decode_step(b[:, :, t : t + 1], [0])[0] for t in range(13)]
    assert torch.allclose(torch.cat(rest), solo_b, atol=1e-6)


def test_real_size_inventory_matches_moshi():
    with torch.device("meta"):
        ref = loaders.get_mimi(None, REAL_MIMI_CONFIG.to_dict(), device="meta", num_codebooks=32)
        ours = MimiModel(REAL_MIMI_CONFIG)
    ref_shapes = {k: tuple(v.shape) for k, v in _fused_names(ref.state_dict()).items()}
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()} | encoder_shapes(REAL_MIMI_CONFIG)
    assert ours_shapes == ref_shapes
    assert len(ref_shapes) == 318
    assert sum(torch.Size(s).numel() * 4 for s in ref_shapes.values()) == 384_605_572


def test_checkpoint_errors_name_file_and_key(codecs, tmp_path: Path):
    _, _, path = codecs
    from safetensors.torch import load_file

    state = load_file(path)
    del state["decoder.model.0.conv.conv.weight"]
    bad = tmp_path / "missing.safetensors"
    save_file(state, bad)
    with pytest.raises(
        CheckpointError, match=r"missing.safetensors: missing tensor 'decoder.model.0.conv.conv.weight'"
    ):
        MimiModel.from_safetensors(bad, TINY_MIMI_CONFIG)
    state = load_file(path)
    state["upsample.convtr.convtr.convtr.weight"] = torch.zeros(3, 1, 4)
    save_file(state, bad)
    with pytest.raises(
        CheckpointError, match=r"'upsample.convtr.convtr.convtr.weight' has shape \[3, 1, 4\]"
    ):
        MimiModel.from_safetensors(bad, TINY_MIMI_CONFIG)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        MimiModel.from_safetensors(truncated, TINY_MIMI_CONFIG)
