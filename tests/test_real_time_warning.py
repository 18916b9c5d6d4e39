"""A session that the engine generates slower than real time says so once, in the log."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

from kyutai_tts_plugin.engine import REAL_TIME_CHECK_STEPS, TTSEngine
from kyutai_tts_plugin.types import SessionOptions

TEXT = "a sentence long enough to run for more than two seconds of audio, or thereabouts"


def fake_clock(seconds_per_call: float):
    # The engine reads its clock twice per step, so each step lasts exactly `seconds_per_call`.
    ticks = itertools.count()
    return lambda: next(ticks) * seconds_per_call


def test_slower_than_real_time_is_logged_once_per_session(tiny_checkpoint: Path, caplog) -> None:
    engine = TTSEngine.from_pretrained(tiny_checkpoint, voice_repo=tiny_checkpoint / "voices")
    try:
        caplog.set_level(logging.WARNING, logger="kyutai_tts_plugin.engine")
        engine._clock = fake_clock(0.05)  # 50 ms per 80 ms frame: faster than real time
        engine.synthesize(TEXT, SessionOptions(temperature=0.0, n_q=4))
        assert not [r for r in caplog.records if "slower than real time" in r.getMessage()]

        engine._clock = fake_clock(0.2)  # 200 ms per 80 ms frame
        session = engine.open_session(SessionOptions(temperature=0.0, n_q=4))
        session.push_text(TEXT)
        session.flush()
        frames = sum(1 for _ in session)
        assert frames > 2 * REAL_TIME_CHECK_STEPS
        warnings = [r.getMessage() for r in caplog.records if "slower than real time" in r.getMessage()]
        assert len(warnings) == 1, warnings
        assert session.id in warnings[0] and "0.40x" in warnings[0] and "device='cuda'" in warnings[0]
    finally:
        engine.close()
