"""The batching scheduler: sessions join, pause, leave and get cancelled independently."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import numpy as np
import pytest

from kyutai_tts_plugin.engine import StreamingSession, TTSEngine
from kyutai_tts_plugin.errors import EngineFullError, EngineTimeoutError
from kyutai_tts_plugin.testing import TEST_VOICES, StepRecorder
from kyutai_tts_plugin.types import AudioChunk, SessionOptions, WordTiming

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november".split()


def make_engine(root: Path, **kwargs) -> TTSEngine:
    return TTSEngine.from_pretrained(root, voice_repo=root / "voices", **kwargs)


def drain(session: StreamingSession) -> tuple[np.ndarray, list[WordTiming]]:
    pcm, words = [], []
    for ev in session:
        if isinstance(ev, AudioChunk):
            pcm.append(ev.pcm)
        else:
            words.append(ev)
    return (np.concatenate(pcm) if pcm else np.zeros(0, np.float32)), words


def test_random_joins_cancels_and_word_arrivals(tiny_checkpoint, test_seed):
    # The plan (texts, options, cancels, pauses) comes from the seed; the threads' interleaving does
    # not, and every property asserted below holds for any interleaving.
    rng = random.Random(test_seed)
    engine = make_engine(tiny_checkpoint, max_sessions=4, max_waiting=16)
    recorder = StepRecorder(engine)
    try:
        plans = []
        for i in range(12):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9)))
            opts = SessionOptions(
                temperature=0.0,
                n_q=rng.choice([4, 8]),
                voice=TEST_VOICES[i % len(TEST_VOICES)],
                cfg_coef=rng.choice([1.5, 2.0, 3.0]),
            )
            plans.append((text, opts, rng.random() < 0.33, rng.randrange(2**32), rng.random()))
        solo = {}
        for i, (text, opts, cancel, _, _) in enumerate(plans):
            if not cancel:
                s = engine.open_session(opts)
                s.push_text(text + " ")  # the streamed run below sends each word with a space
                s.flush()
                solo[i] = (drain(s), recorder.tokens(s))

        results: dict[int, object] = {}
        start = threading.Barrier(12)

        def run(i: int) -> None:
            text, opts, cancel, thread_seed, cancel_at = plans[i]
            jitter = random.Random(thread_seed)  # each thread its own generator: the plan replays
            start.wait()
            for _ in range(jitter.randrange(200)):  # staggered joins: a few engine steps apart
                threading.Event().wait(0.0005)
            s = engine.open_session(opts)
            words = text.split(" ")
            for j, w in enumerate(words):  # words trickle in, split mid-word
                s.push_text(w[:2])
                threading.Event().wait(jitter.uniform(0, 0.02))
                s.push_text(w[2:] + " ")
                if cancel and j == min(len(words) - 1, int(len(words) * cancel_at)):
                    s.cancel()
                    # At most the step in flight when cancel returned can still be recorded.
                    results[i] = ("cancelled", s, recorder.count(s))
                    return
            s.flush()
            results[i] = ("done", s, drain(s))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(results) == 12
        for i, (kind, s, payload) in results.items():
            if kind == "done":
                (pcm, words), toks = solo[i]
                got_pcm, got_words = payload
                assert recorder.tokens(s) == toks, f"session {i} differs from its solo run"
                assert got_pcm.shape == pcm.shape and np.abs(got_pcm - pcm).max() <= 1e-5
                assert got_words == words
            else:
                assert list(s) == [], "no event is delivered after cancel"
        # Run the engine on until every slot is free again, then check the cancelled sessions:
        # cancel stops a session within the one step that may be in flight.
        assert engine.active_sessions == 0, "every slot is freed"
        flush_engine(engine, recorder)
        for i, (kind, s, count) in results.items():
            if kind == "cancelled":
                assert recorder.count(s) <= count + 1, f"session {i} stepped after its cancel"
    finally:
        recorder.close()
        engine.close()


def flush_engine(engine: TTSEngine, recorder: StepRecorder) -> None:
    """Step one more session to its end: every step in flight before it has been recorded."""
    s = engine.open_session(SessionOptions(temperature=0.0, n_q=4))
    s.push_text("the end")
    s.flush()
    drain(s)
    assert recorder.count(s) > 0


def test_starved_session_does_not_hold_back_others(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint, max_sessions=2)
    recorder = StepRecorder(engine)
    try:
        starved = engine.open_session(SessionOptions(temperature=0.0, n_q=4))
        starved.push_text("only two ")  # fewer than 3 words and no flush: it must not step
        busy = engine.open_session(SessionOptions(temperature=0.0, n_q=4))
        busy.push_text("this session has all of its words right now")
        busy.flush()
        pcm, _ = drain(busy)
        assert pcm.size > 0 and busy.is_finished
        assert recorder.count(busy) > 0 and recorder.count(starved) == 0
        alone = engine.synthesize(
            "this session has all of its words right now", SessionOptions(temperature=0, n_q=4)
        )
        assert np.array_equal(pcm, alone.pcm)
        starved.cancel()
    finally:
        engine.close()


def test_slow_consumer_is_masked_out(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint, max_sessions=2, max_buffered_s=0.4)
    try:
        slow = engine.open_session(SessionOptions(temperature=0.0, n_q=4))
        slow.push_text(" ".join(WORDS))
        slow.flush()
        fast = engine.open_session(SessionOptions(temperature=0.0, n_q=4))
        fast.push_text(" ".join(WORDS[:6]))
        fast.flush()
        drain(fast)
        assert fast.is_finished
        # The unread session stopped once 5 frames (0.4 s) were waiting for its consumer.
        assert slow._buffered() <= 5 + 2 and not slow.is_finished
        pcm, _ = drain(slow)  # reading lets it go on to the end
        assert slow.is_finished and pcm.size > 0
    finally:
        engine.close()


def test_engine_full_and_wait_queue(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint, max_sessions=1, max_waiting=1, queue_timeout_s=30)
    recorder = StepRecorder(engine)
    try:
        first = engine.open_session(SessionOptions(temperature=0.0, n_q=4))
        queued = engine.open_session(SessionOptions(temperature=0.0, n_q=4))
        with pytest.raises(EngineFullError, match="engine full: 1 sessions are speaking and 1 are waiting"):
            engine.open_session()
        assert engine.active_sessions == 2
        queued.push_text("I wait for the slot")
        queued.flush()  # ready to speak at once, but the only slot is taken
        first.push_text("first one speaks")
        first.flush()
        drain(first)
        pcm, words = drain(queued)  # it got the slot once the first finished
        assert pcm.size > 0 and [w.word for w in words] == ["I", "wait", "for", "the", "slot"]
        assert recorder.engine_indices(queued)[0] > recorder.engine_indices(first)[-1], (
            "the queued session must wait while the slot is taken"
        )
        assert engine.active_sessions == 0
    finally:
        engine.close()


def test_wait_queue_timeout(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint, max_sessions=1, max_waiting=4, queue_timeout_s=0.2)
    try:
        hog = engine.open_session(SessionOptions(temperature=0.0, n_q=4))
        hog.push_text("two words")  # never flushed: holds the only slot
        late = engine.open_session(SessionOptions(temperature=0.0, n_q=4))
        late.push_text("hello there")
        late.flush()
        with pytest.raises(EngineTimeoutError, match="waited 0 s for a free engine slot"):
            drain(late)
        hog.cancel()
        assert engine.active_sessions == 0
    finally:
        engine.close()
