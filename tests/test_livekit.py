"""kyutai_tts_plugin.livekit.TTS with livekit-agents' own classes, no server, tiny checkpoint."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from livekit.agents import APIConnectionError, APIConnectOptions, APIError, APITimeoutError

from kyutai_tts_plugin.engine import TTSEngine
from kyutai_tts_plugin.livekit import TTS
from kyutai_tts_plugin.types import SessionOptions

TEXT = "Sure, here is the plan: we meet at 10 and then walk to the old harbour."
NO_RETRY = APIConnectOptions(max_retry=0, timeout=10)


async def wait_idle(engine, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while engine.active_sessions and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert engine.active_sessions == 0


def tokens_of(text: str, size: int = 3) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


async def run_stream(tts: TTS, deltas: list[str], delay: float = 0.0, conn_options=NO_RETRY):
    events = []
    async with tts.stream(conn_options=conn_options) as stream:

        async def feed() -> None:
            for d in deltas:
                stream.push_text(d)
                if delay:
                    await asyncio.sleep(delay)
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
    tts = TTS(engine=tiny_engine, temperature=0.0, n_q=4)
    deltas = tokens_of(TEXT)
    loop = asyncio.get_running_loop()
    first_audio = None
    last_delta = None
    async with tts.stream(conn_options=NO_RETRY) as stream:

        async def feed() -> None:
            nonlocal last_delta
            for d in deltas:
                stream.push_text(d)
                await asyncio.sleep(0.03)
            last_delta = loop.time()
            stream.end_input()

        feeder = asyncio.create_task(feed())
        async for _ in stream:
            if first_audio is None:
                first_audio = loop.time()
        await feeder
    assert first_audio is not None and last_delta is not None and first_audio < last_delta


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


def test_prewarm_never_blocks(tiny_checkpoint):
    tts = TTS(model=tiny_checkpoint, voice_repo=tiny_checkpoint / "voices")
    import time

    t0 = time.perf_counter()
    tts.prewarm()
    assert time.perf_counter() - t0 < 0.05
    assert tts.model == str(tiny_checkpoint) and tts.provider == "kyutai"
    tts._loaded.wait(60)
    assert tts._engine is not None


async def test_back_to_back_replies_do_not_mix(tiny_engine):
    tts = TTS(engine=tiny_engine, temperature=0.0, n_q=4)
    first, second = "First reply here.", " And the second one!"
    a, b = await asyncio.gather(run_stream(tts, tokens_of(first)), run_stream(tts, tokens_of(second)))
    assert "".join(timed_words(a)) == first and "".join(timed_words(b)) == second
    assert {ev.request_id for ev in a}.isdisjoint({ev.request_id for ev in b})
