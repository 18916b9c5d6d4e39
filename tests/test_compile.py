"""`compile=True`: both halves of the step compile with `torch.compile(fullgraph=True)` on CPU and
give the eager engine's tokens, in a batch mixing greedy and seeded top-k sessions and two voices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch._dynamo.utils import counters

from kyutai_tts_plugin.engine import TTSEngine
from kyutai_tts_plugin.testing import TEST_VOICES, StepRecorder
from kyutai_tts_plugin.types import AudioChunk, SessionOptions

TEXT = "the quick brown fox jumps over the lazy dog"
OPTIONS = [
    SessionOptions(temperature=0.0, n_q=8, voice=TEST_VOICES[0]),
    SessionOptions(temperature=0.8, top_k=50, top_k_text=5, n_q=4, seed=1234, voice=TEST_VOICES[1]),
]


def _run(root: Path, compile: bool) -> tuple[list[list[tuple[int, int, tuple[int, ...]]]], list[np.ndarray]]:
    engine = TTSEngine.from_pretrained(root, voice_repo=root / "voices", max_sessions=2, compile=compile)
    try:
        with StepRecorder(engine) as recorder:
            sessions = [engine.open_session(o) for o in OPTIONS]
            for s in sessions:
                s.push_text(TEXT)
                s.flush()
            pcm = [np.concatenate([e.pcm for e in s if isinstance(e, AudioChunk)]) for s in sessions]
            return [recorder.tokens(s) for s in sessions], pcm
    finally:
        engine.close()


def test_compiled_step_equals_eager(tiny_checkpoint: Path) -> None:
    torch._dynamo.reset()
    counters.clear()
    eager_tokens, eager_pcm = _run(tiny_checkpoint, compile=False)
    compiled_tokens, compiled_pcm = _run(tiny_checkpoint, compile=True)
    # fullgraph=True raises on any graph break, so reaching here means both halves compiled whole;
    # the counter shows they ran compiled (at least one graph per half).
    assert counters["stats"]["unique_graphs"] >= 2, dict(counters["stats"])
    assert all(len(t) > 20 for t in eager_tokens)
    assert compiled_tokens == eager_tokens
    for a, b in zip(compiled_pcm, eager_pcm, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_compiled_backbone_writes_the_kv_cache_in_place(tiny_checkpoint: Path) -> None:
    """The compiled backbone writes each step's KV cells into the cache, not into a copy of it.

    A write through a view of a graph input (one tensor holding every layer's cache) is
    functionalized into a copy of the whole layer's cache per layer and step: a loop over all its
    elements in the generated code, the cost moshi pays for its KV cache (about half its step at
    batch 8). Per-layer cache tensors are written in place: no such loop.
    """
    from torch._inductor.utils import run_and_get_code

    from kyutai_tts_plugin.generator import Generator, SlotSettings

    engine = TTSEngine.from_pretrained(tiny_checkpoint, voice_repo=tiny_checkpoint / "voices", max_sessions=2)
    try:
        model, mimi = engine.model, engine.generator.mimi
        gen = Generator(model, mimi, 2, torch.device("cpu"), engine.delay_steps, compile=True)
        dim = model.shape.conditioners["speaker_wavs"]["tensor"]["dim"]
        kv = model.cross_kv(model.speaker_memory([torch.randn(1, dim, 125)], 1))
        for row in range(2):
            gen.join(row, SlotSettings(0.6, 50, 0.6, 5, 8, 0.0, seed=row), model.condition_sum(2.0), kv)
        torch._dynamo.reset()
        _, code = run_and_get_code(gen.text_step, 2)
    finally:
        engine.close()
    shape = model.shape
    layer_cache = gen.lm_state.k[0].numel()
    assert layer_cache == 2 * shape.num_heads * shape.context * (shape.dim // shape.num_heads)
    source = "\n".join(code)
    assert "async_compile" in source, "no generated code seen"
    assert f"{layer_cache}L" not in source, "the compiled step copies a whole layer's KV cache"
