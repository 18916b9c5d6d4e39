"""No session's input, and no failure, stops the engine or starves the others (issue 11, engine side).

Order in time is asserted in engine steps (StepRecorder) and the engine's timeout clock is driven by
the test; the only waits are HANG_GUARD_S guards, reached only when a test fails.
"""

from __future__ import annotations

import asyncio
import gc
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kyutai_tts_plugin.checkpoint import VoiceLibrary
from kyutai_tts_plugin.engine import CLOSED_MESSAGE, StreamingSession, TTSEngine
from kyutai_tts_plugin.errors import (
    EngineFailure,
    EngineTimeoutError,
    InvalidInputError,
    VoiceNotFoundError,
)
from kyutai_tts_plugin.testing import HANG_GUARD_S, TEST_VOICES, StepRecorder
from kyutai_tts_plugin.types import AudioChunk, SessionOptions

GREEDY = SessionOptions(temperature=0.0, n_q=4)
TEXT = "a steady voice keeps talking while another session fails next to it"


def make_engine(root: Path, voices: Path | None = None, **kwargs: Any) -> TTSEngine:
    return TTSEngine.from_pretrained(root, voice_repo=voices or root / "voices", **kwargs)


def outcome(session: StreamingSession) -> tuple[np.ndarray, BaseException | None]:
    """All the session's audio and the error its stream ended with; fails (not hangs) if it never ends."""
    result: dict[str, Any] = {"pcm": [], "error": None}

    def read() -> None:
        try:
            for ev in session:
                if isinstance(ev, AudioChunk):
                    result["pcm"].append(ev.pcm)
        except Exception as e:
            result["error"] = e

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(HANG_GUARD_S)
    assert not reader.is_alive(), f"session {session.id} never ended"
    pcm = np.concatenate(result["pcm"]) if result["pcm"] else np.zeros(0, np.float32)
    return pcm, result["error"]


def wait_until(engine: TTSEngine, condition: Callable[[], bool], what: str) -> None:
    with engine._cv:
        if not engine._cv.wait_for(condition, timeout=HANG_GUARD_S):
            raise AssertionError(f"never reached: {what}")


# -- 1. failures stay with the session that caused them; a failing device makes the engine unhealthy


def test_truncated_voice_file_fails_only_its_session_without_its_path(tiny_checkpoint: Path, tmp_path):
    voices = shutil.copytree(tiny_checkpoint / "voices", tmp_path / "voices")
    engine = make_engine(tiny_checkpoint, voices, max_sessions=4)
    recorder = StepRecorder(engine)
    try:
        bad_voice = TEST_VOICES[2]
        bad_file = engine.voices.resolve(bad_voice)
        bad_file.write_bytes(bad_file.read_bytes()[: bad_file.stat().st_size // 2])
        good_texts = {TEST_VOICES[0]: TEXT, TEST_VOICES[1]: TEXT + " and more"}
        with engine._cv:  # all three are opened and flushed before the worker looks: one batch
            good = {
                v: engine.open_session(GREEDY, voice=v) for v in good_texts
            }  # (the lock is re-entrant: the calls below take it too)
            bad = engine.open_session(GREEDY, voice=bad_voice)
            for s in [*good.values(), bad]:
                s.push_text(TEXT)
            for v, s in good.items():
                s.push_text(good_texts[v][len(TEXT) :])
                s.flush()
            bad.flush()
        _, error = outcome(bad)
        assert isinstance(error, EngineFailure)
        assert bad_voice in str(error) and str(tmp_path) not in str(error)
        batched = {v: outcome(s) for v, s in good.items()}
        for v, (pcm, err) in batched.items():
            assert err is None
            solo = engine.open_session(GREEDY, voice=v)
            solo.push_text(good_texts[v])
            solo.flush()
            solo_pcm, _ = outcome(solo)
            # Same tokens at every step; the PCM of a batched decoder differs from a solo one only by
            # float rounding (the batch shapes the matmuls), far below one 16-bit step.
            assert recorder.tokens(good[v]) == recorder.tokens(solo)
            assert pcm.shape == solo_pcm.shape and np.abs(pcm - solo_pcm).max() < 1e-5
        assert engine.healthy and engine.active_sessions == 0
    finally:
        recorder.close()
        engine.close()


class _FailingGenerator:
    """Stands in for the engine's generator on a failed device: every call raises, as CUDA would."""

    def __init__(self, real: Any, passing: tuple[str, ...]) -> None:
        self._real = real
        self._passing = passing

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._real, name)
        if not callable(value) or name in self._passing:
            return value

        def fail(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        return fail


@pytest.mark.parametrize("passing", [(), ("join",)], ids=["fails-at-join", "fails-at-step"])
def test_a_failing_device_makes_the_engine_unhealthy_instead_of_hanging(tiny_checkpoint: Path, passing):
    engine = make_engine(tiny_checkpoint, max_sessions=1, max_waiting=8)
    try:
        engine.generator = _FailingGenerator(engine.generator, passing)  # type: ignore[assignment]
        with engine._cv:  # every session is queued before the worker admits the first
            sessions = [engine.open_session(GREEDY) for _ in range(4)]
            for s in sessions:
                s.push_text(TEXT)
                s.flush()
        errors = [outcome(s)[1] for s in sessions]
        assert all(isinstance(e, EngineFailure) for e in errors), errors
        messages = [str(e) for e in errors]
        # Two failures end their own sessions; the third makes the engine unhealthy, which ends the
        # session that failed and every waiting one with that reason.
        assert ["failed while stepping" in m for m in messages] == [True, True, False, False], messages
        assert all("unhealthy" in m and "create a new TTSEngine" in m for m in messages[2:]), messages
        assert (
            not engine.healthy
            and isinstance(engine.health_error, str)
            and "RuntimeError" in engine.health_error
        )
        with pytest.raises(EngineFailure, match="unhealthy"):
            engine.open_session(GREEDY)
        assert engine._worker.is_alive() and engine.active_sessions == 0
    finally:
        engine.close()


# -- 2. pauses and session duration are bounded


def test_total_pause_per_session_is_capped(tiny_checkpoint: Path):
    engine = make_engine(tiny_checkpoint, max_pause_s=15)
    try:
        s = engine.open_session(GREEDY)
        s.push_text('one <break time="10s"/> two ')
        with pytest.raises(InvalidInputError, match=r"more than 15 s .*max_pause_s"):
            s.push_text('three <break time="6s"/> four')
        _, error = outcome(s)
        assert isinstance(error, InvalidInputError) and "max_pause_s" in str(error)
        assert engine.active_sessions == 0
    finally:
        engine.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_session_longer_than_max_session_s_is_ended(tiny_checkpoint: Path):
    engine = make_engine(tiny_checkpoint, max_session_s=100, idle_timeout_s=60)
    clock = engine._timeout_clock = Clock()
    try:
        s = engine.open_session(GREEDY)
        s.push_text("talking ")
        wait_until(engine, lambda: s.run is not None, "the session holds a slot")
        for _ in range(3):  # active all along: never idle for 60 s
            clock.now += 40
            s.push_text("still ")
        engine._notify_worker()
        _, error = outcome(s)
        assert isinstance(error, EngineTimeoutError) and "max_session_s" in str(error)
        assert engine.active_sessions == 0
    finally:
        engine.close()


# -- 3. tokenization happens outside the engine lock


def test_a_large_push_held_in_the_tokenizer_does_not_stop_other_sessions(tiny_checkpoint: Path):
    engine = make_engine(tiny_checkpoint, max_sessions=2)
    inside, leave = threading.Event(), threading.Event()
    encode = engine.tokenizer.encode_word

    def held_encode(word: str) -> list[int]:
        if word == "zzhold":  # the large push parks here, in the middle of its tokenization
            inside.set()
            leave.wait(HANG_GUARD_S)
        return encode(word)

    engine.tokenizer.encode_word = held_encode  # type: ignore[method-assign]
    recorder = StepRecorder(engine)
    try:
        streaming = engine.open_session(GREEDY)
        streaming.push_text(" ".join([TEXT] * 6))
        streaming.flush()
        big = engine.open_session(GREEDY)
        pusher = threading.Thread(target=big.push_text, args=("zzhold " + "word " * 40_000,), daemon=True)
        pusher.start()  # 200 kB
        assert inside.wait(HANG_GUARD_S)
        before = recorder.count(streaming)
        recorder.wait_for(lambda: recorder.count(streaming) >= before + 5, "5 steps during the push")
        leave.set()
        pusher.join(HANG_GUARD_S)
        assert not pusher.is_alive()
        big.cancel()
        assert outcome(streaming)[1] is None
    finally:
        leave.set()
        recorder.close()
        engine.close()


# -- 4. nothing leaks a slot


def test_synthesize_frees_its_slot_when_it_raises(tiny_engine: Any):
    with pytest.raises(InvalidInputError, match="push_text expects a str"):
        tiny_engine.synthesize(None)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        tiny_engine.synthesize_dialog(["hello", 5])  # type: ignore[list-item]
    assert tiny_engine.active_sessions == 0


def test_idle_sessions_holding_a_slot_are_ended(tiny_checkpoint: Path):
    engine = make_engine(tiny_checkpoint, idle_timeout_s=60, max_buffered_s=0.2)
    clock = engine._timeout_clock = Clock()
    try:
        silent = engine.open_session(GREEDY)
        silent.push_text("two words")  # fewer than the lookahead: it waits for more, forever
        unread = engine.open_session(GREEDY)
        unread.push_text(TEXT)
        unread.flush()  # flushed, never read: paused by max_buffered_s
        busy = engine.open_session(GREEDY)
        busy.push_text("a few words here")
        wait_until(engine, lambda: all(s.run is not None for s in (silent, unread, busy)), "three slots")
        # Being stepped is progress: move the clock once the unread session has stopped being stepped.
        limit = engine.max_buffered_frames
        assert limit is not None
        wait_until(engine, lambda: unread._buffered() >= limit, "the unread session is paused by its reader")
        clock.now += 61
        busy.push_text(" more")  # progress: this one stays
        engine._notify_worker()
        for s in (silent, unread):
            error = outcome(s)[1]
            assert isinstance(error, EngineTimeoutError) and "idle_timeout_s" in str(error)
        assert engine.active_sessions == 1 and not busy.is_finished
        busy.flush()
        assert outcome(busy)[1] is None
    finally:
        engine.close()


def test_a_session_dropped_without_flush_or_cancel_frees_its_slot(tiny_checkpoint: Path):
    engine = make_engine(tiny_checkpoint, max_sessions=1, idle_timeout_s=None)
    try:
        dropped = engine.open_session(GREEDY)
        dropped.push_text("words that nobody will ever hear")
        state = dropped._core  # the engine's side, which the engine holds anyway
        wait_until(engine, lambda: state.run is not None, "the session takes the only slot")
        del dropped
        gc.collect()
        wait_until(engine, lambda: engine.active_sessions == 0, "the dropped session's slot is freed")
        assert len(engine.synthesize("the next session gets the slot", GREEDY).pcm) > 0
    finally:
        engine.close()


def test_a_closed_engine_refuses_everything_with_one_error(tiny_checkpoint: Path):
    engine = make_engine(tiny_checkpoint)
    s = engine.open_session(GREEDY)
    s.push_text("hello ")
    engine.close()
    assert engine.active_sessions == 0
    for call in (lambda: engine.open_session(GREEDY), lambda: s.push_text("more"), s.flush, s.next_turn):
        with pytest.raises(EngineFailure) as err:
            call()
        assert str(err.value) == CLOSED_MESSAGE
    assert isinstance(outcome(s)[1], EngineFailure)


# -- 5. open_session never waits for a voice download


class SlowHubVoices(VoiceLibrary):
    """A Hub voice repository whose downloads wait for the test (the files come from a local copy)."""

    def __init__(self, local: VoiceLibrary, gate: threading.Event) -> None:
        super().__init__(local.source, suffix=local.suffix)
        self.directory = None  # as for a Hub repo id
        self._local = local
        self._gate = gate
        self.threads: list[str] = []

    def _resolve(self, name: str) -> Path:
        self.threads.append(threading.current_thread().name)
        self._gate.wait(HANG_GUARD_S)
        return self._local.resolve(name)


def test_open_session_does_not_wait_for_a_hub_voice(tiny_checkpoint: Path):
    engine = make_engine(tiny_checkpoint, max_sessions=2)
    gate = threading.Event()
    hub = SlowHubVoices(engine.voices, gate)
    engine.voices = hub
    recorder = StepRecorder(engine)
    try:
        other = engine.open_session(GREEDY)  # its voice (the default) is loaded while the hub waits
        gate.set()
        other.push_text(" ".join([TEXT] * 4))
        other.flush()
        wait_until(engine, lambda: other.run is not None, "the first session joins")
        gate.clear()
        caller = threading.current_thread().name
        slow = engine.open_session(GREEDY, voice=TEST_VOICES[2])  # returns while the "download" waits
        missing = engine.open_session(GREEDY, voice="vctk/p225_02")
        assert slow.run is None and caller not in hub.threads
        before = recorder.count(other)
        recorder.wait_for(lambda: recorder.count(other) >= before + 3, "steps of the other session")
        slow.push_text(TEXT)
        slow.flush()
        gate.set()
        pcm, error = outcome(slow)
        assert error is None and len(pcm) > 0
        error = outcome(missing)[1]
        assert isinstance(error, VoiceNotFoundError) and "vctk/p225_023.wav" in str(error)
        assert outcome(other)[1] is None
    finally:
        gate.set()
        recorder.close()
        engine.close()


async def test_server_health_reports_an_unhealthy_engine(tiny_checkpoint: Path):
    import aiohttp

    from kyutai_tts_plugin.server import start_server

    engine = make_engine(tiny_checkpoint, max_sessions=1)
    server = await start_server(engine)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(server.http_url + "/api/health") as resp:
                assert resp.status == 200 and (await resp.json())["status"] == "ok"
            engine.generator = _FailingGenerator(engine.generator, ())  # type: ignore[assignment]
            with engine._cv:
                sessions = [engine.open_session(GREEDY) for _ in range(3)]
                for s in sessions:
                    s.push_text(TEXT)
                    s.flush()
            for s in sessions:
                await asyncio.to_thread(outcome, s)
            async with http.get(server.http_url + "/api/health") as resp:
                assert resp.status == 503 and (await resp.json())["status"] == "unhealthy"
    finally:
        await server.close()
        engine.close()
