"""The engine's cache of voice keys/values is bounded (least recently used), and an evicted voice
still speaks the same: a joining session copies its voice into its slot, so eviction costs a reload."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kyutai_tts_plugin import engine as engine_module
from kyutai_tts_plugin.engine import TTSEngine
from kyutai_tts_plugin.testing import TEST_VOICES
from kyutai_tts_plugin.types import SessionOptions


def test_voice_cache_is_bounded_and_eviction_changes_no_audio(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "VOICE_CACHE_SIZE", 2)
    engine = TTSEngine.from_pretrained(tiny_checkpoint, voice_repo=tiny_checkpoint / "voices", max_sessions=2)
    try:
        first = engine.synthesize("hello there", SessionOptions(temperature=0.0, voice=TEST_VOICES[0]))
        for voice in TEST_VOICES[1:]:
            engine.synthesize("hello there", SessionOptions(temperature=0.0, voice=voice))
            assert len(engine._cross_cache) <= 2
        assert (TEST_VOICES[0],) not in engine._cross_cache  # evicted by the later voices
        again = engine.synthesize("hello there", SessionOptions(temperature=0.0, voice=TEST_VOICES[0]))
    finally:
        engine.close()
    assert len(TEST_VOICES) >= 3
    assert first.pcm.size > 0
    np.testing.assert_array_equal(again.pcm, first.pcm)
