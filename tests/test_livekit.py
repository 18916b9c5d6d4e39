"""kyutai_tts_plugin.livekit.TTS with livekit-agents' own classes, no server, tiny checkpoint."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from livekit.agents import APIConnectionError, APIConnectOptions, APIError, APITimeoutError

from kyutai_tts_plugin import engine as engine_module
from kyutai_tts_plugin.engine import TTSEngine
from kyutai_tts_plugin.livekit import TTS
from kyutai_tts_plugin.testing import HANG_GUARD_S
from kyutai_tts_plugin.types import SessionOptions

TEXT = "Sure, here is the plan: we meet at 10 and then walk to the old harbour."
NO_RETRY = APIConnectOptions(max_retry=0, timeout=10)


async def wait_idle(engine: TTSEngine) -> None:
    """Wait until the engine holds no session: the remote server frees it after the client is gone.

    A hang guard, not a timing assertion: it only fails if the slot is never freed.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANG_GUARD_S
    while engine.active_sessions:
        assert loop.time() < deadline, f"the engine still holds {engine.active_sessions} session(s)"
        await asyncio.sleep(0.01)


def tokens_of(text: str, size: int = 3) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


async def run_stream(tts: TTS, deltas: list[str], conn_options=NO_RETRY):
    events = []
    async with tts.stream(conn_options=conn_options) as stream:

        async def feed() -> None:
            for d in deltas:
                stream.push_text(d)
            stream.end_input()

        feeder = asyncio.create_task(feed())
        async for ev in stream:
            events.append(ev)
        await feeder
    return events


def timed_words(events) -> list:
    words = []
    for ev in events:
        words.extend(ev.frame.userdata.get("lk.timed_transcripts", []))
    return words


async def test_stream_provider_checks_audio_and_aligned_transcript(tiny_engine, backend):
    tts = TTS(engine=backend, temperature=0.0, n_q=4)
    events = await run_stream(tts, tokens_of(TEXT))
    assert len({ev.request_id for ev in events}) == 1
    assert all(ev.segment_id for ev in events) and len({ev.segment_id for ev in events}) == 1
    assert [ev.is_final for ev in events].count(True) == 1 and events[-1].is_final
    for ev in events:
        assert ev.frame.sample_rate == 24000 and ev.frame.num_channels == 1
        assert 0 <= ev.frame.duration <= 0.25
    pcm = np.concatenate([np.frombuffer(ev.frame.data, dtype=np.int16) for ev in events])
    ref = tiny_engine.synthesize(TEXT, SessionOptions(temperature=0.0, n_q=4))
    expected = np.round(np.clip(ref.pcm, -1, 1) * 32767).astype(np.int16)
    assert np.array_equal(pcm[: len(expected)], expected)
    assert not pcm[len(expected) :].any()  # at most the emitter's 10 ms final marker of silence
    words = timed_words(events)
    assert "".join(words) == TEXT
    assert [w.start_time for w in words] == pytest.approx([w.start_s for w in ref.words])
    await wait_idle(tiny_engine)


async def test_every_delta_reaches_the_engine_before_the_llm_finishes(tiny_engine):
    # The "LLM" holds back its last delta until audio came: the stream can only end if every
    # delta is spoken as it arrives (else the hang guard fails the test).
    tts = TTS(engine=tiny_engine, temperature=0.0, n_q=4)
    deltas = tokens_of(TEXT)
    first_audio = asyncio.Event()
    pushed = 0
    pushed_at_first_audio: int | None = None
    events = []
    async with tts.stream(conn_options=NO_RETRY) as stream:

        async def feed() -> None:
            nonlocal pushed
            for d in deltas[:-1]:
                stream.push_text(d)
                pushed += 1
            try:
                await asyncio.wait_for(first_audio.wait(), HANG_GUARD_S)
            except TimeoutError:
                raise AssertionError("no audio while the last delta was held back") from None
            stream.push_text(deltas[-1])
            pushed += 1
            stream.end_input()

        async def consume() -> None:
            nonlocal pushed_at_first_audio
            async for ev in stream:
                if pushed_at_first_audio is None:
                    pushed_at_first_audio = pushed
                    first_audio.set()
                events.append(ev)

        # The feeder's failure ends the test at once; the outer guard catches a stream that never ends.
        await asyncio.wait_for(asyncio.gather(feed(), consume()), 2 * HANG_GUARD_S)
    assert pushed_at_first_audio == len(deltas) - 1
    assert "".join(timed_words(events)) == TEXT


async def test_synthesize_whole_text(tiny_engine):
    tts = TTS(engine=tiny_engine, temperature=0.0, n_q=4)
    frames = [ev async for ev in tts.synthesize("a whole text at once", conn_options=NO_RETRY)]
    assert frames and sum(ev.frame.duration for ev in frames) > 0.5


async def test_emoji_only_text_ends_cleanly(tiny_engine):
    tts = TTS(engine=tiny_engine, temperature=0.0, n_q=4)
    events = await run_stream(tts, ["🙂🚀", " !!"])
    assert events and events[-1].is_final
    assert tiny_engine.active_sessions == 0


async def test_cancelling_the_stream_frees_the_slot_at_once(tiny_engine, backend):
    tts = TTS(engine=backend, temperature=0.0, n_q=4)
    stream = tts.stream(conn_options=NO_RETRY)
    for d in tokens_of(TEXT * 3):
        stream.push_text(d)
    got = 0
    async for _ in stream:
        got += 1
        if got == 3:
            break
    await stream.aclose()  # what AgentSession does on interruption
    if backend is tiny_engine:
        assert tiny_engine.active_sessions == 0  # in-process: freed synchronously
    await wait_idle(tiny_engine)


async def test_options_are_fixed_per_stream_and_changeable_between(tiny_engine):
    tts = TTS(engine=tiny_engine, temperature=0.0, n_q=4)
    a = await run_stream(tts, ["one two three"])
    tts.update_options(n_q=2)
    b = await run_stream(tts, ["one two three"])
    ref_b = tiny_engine.synthesize("one two three", SessionOptions(temperature=0.0, n_q=2))
    pcm_b = np.concatenate([np.frombuffer(ev.frame.data, dtype=np.int16) for ev in b])
    assert np.array_equal(
        pcm_b[: len(ref_b.pcm)], np.round(np.clip(ref_b.pcm, -1, 1) * 32767).astype(np.int16)
    )
    assert sum(len(ev.frame.data) for ev in a) == sum(len(ev.frame.data) for ev in b)


async def test_error_mapping(tiny_checkpoint):
    engine = TTSEngine.from_pretrained(
        tiny_checkpoint,
        voice_repo=tiny_checkpoint / "voices",
        max_sessions=1,
        max_waiting=0,
        queue_timeout_s=0.3,
    )
    try:
        with pytest.raises(APIError) as bad:
            await run_stream(TTS(engine=engine, voice="nope"), ["hello there"])
        assert not bad.value.retryable and "nope" in str(bad.value) and "voices" in str(bad.value)
        hog = engine.open_session(SessionOptions(n_q=2))
        hog.push_text("two words")
        with pytest.raises(APIConnectionError, match="engine full"):
            await run_stream(TTS(engine=engine), ["hello there"])
        engine.max_waiting = 1
        with pytest.raises(APITimeoutError, match="waited"):
            await run_stream(TTS(engine=engine), ["hello there friend"])
        hog.cancel()
    finally:
        engine.close()


def test_prewarm_never_blocks(tiny_checkpoint, tiny_engine, monkeypatch):
    # The model load blocks until this test releases it, after prewarm() returned: a prewarm that
    # waited for the load would deadlock (broken by the loader's hang guard, failing the test).
    release = threading.Event()
    loads: list[dict] = []

    def blocked_load(**kwargs) -> TTSEngine:
        loads.append(kwargs)
        if not release.wait(HANG_GUARD_S):
            raise AssertionError("the model load was never released: prewarm() waited for it")
        return tiny_engine

    monkeypatch.setattr(engine_module, "shared_engine", blocked_load)
    tts = TTS(model=tiny_checkpoint, voice_repo=tiny_checkpoint / "voices")
    tts.prewarm()
    tts.prewarm()  # a second call starts no second load
    assert tts._loader.loading, "prewarm() returned only after the load ended"
    assert tts.model == tiny_checkpoint.name and tts.provider == "kyutai"
    release.set()
    load = tts._loader._future
    assert load is not None and load.result(timeout=HANG_GUARD_S) is tiny_engine
    assert [(d["model"], d["voice_repo"]) for d in loads] == [(tiny_checkpoint, tiny_checkpoint / "voices")]


async def test_back_to_back_replies_do_not_mix(tiny_engine):
    tts = TTS(engine=tiny_engine, temperature=0.0, n_q=4)
    first, second = "First reply here.", " And the second one!"
    a, b = await asyncio.gather(run_stream(tts, tokens_of(first)), run_stream(tts, tokens_of(second)))
    assert "".join(timed_words(a)) == first and "".join(timed_words(b)) == second
    assert {ev.request_id for ev in a}.isdisjoint({ev.request_id for ev in b})


def test_bad_options_are_refused_when_set(tiny_engine):
    from kyutai_tts_plugin.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="temperature"):
        TTS(engine=tiny_engine, temperature=-1.0)
    tts = TTS(engine=tiny_engine, n_q=4)
    with pytest.raises(InvalidInputError, match="n_q"):
        tts.update_options(n_q=0)
    assert tts._opts.n_q == 4  # the refused change left the options as they were
