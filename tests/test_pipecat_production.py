"""KyutaiTTSService as production voice agents drive it (issue 13, points 1-5).

Same harness as test_pipecat.py: Pipecat's own aggregators, TTS base class, worker and runner; the
only double is the scripted LLM. The pipeline clock is a `ManualClock`, so "playback time" (word
PTS, pacing) moves only when a test says so. Where the point is Pipecat's 3 s idle timeout of an
audio context, the test shortens that timeout and then waits several times as long: the wait is the
scenario (a silence longer than the timeout), never a threshold that an assertion measures.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from pipecat.frames.frames import (
    EndFrame,
    ErrorFrame,
    LLMFullResponseEndFrame,
    OutputAudioRawFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
)
from pipecat.services.tts_service import TextAggregationMode
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import TransportParams
from pipecat.utils.text.transforms.strip_markdown import strip_markdown

from kyutai_tts_plugin.engine import TTSEngine
from kyutai_tts_plugin.errors import InvalidInputError
from kyutai_tts_plugin.pipecat import KyutaiTTSService
from kyutai_tts_plugin.testing import HANG_GUARD_S
from kyutai_tts_plugin.types import FRAME_DURATION_S, FRAME_SIZE, SAMPLE_RATE, SessionOptions

from .test_pipecat import (
    FIRST,
    SECOND,
    TEXT,
    Bot,
    EngineProbe,
    FlakyBackend,
    ManualClock,
    Unfinished,
    assert_same_audio,
    audio_of,
    contexts_in_order,
    of_context,
    pcm16,
    run_bot,
    tokens_of,
)

GREEDY_OPTIONS = SessionOptions(temperature=0.0)
SHORT_TIMEOUT_S = 1.0  # Pipecat's idle timeout of an audio context, shortened (3 s by default)
SILENCE_S = 3 * SHORT_TIMEOUT_S  # a silence several times that long
TAIL_TICKS = 10_000  # device ticks enough for any tail Pipecat writes at the end


@pytest.fixture
def probe(tiny_engine: TTSEngine) -> Any:
    engine_probe = EngineProbe(tiny_engine)
    try:
        yield engine_probe
    finally:
        engine_probe.close()  # never leave the shared engine parked behind a failed test


def assert_one_clean_turn(bot: Bot, text: str) -> None:
    """One context from start to stop, the whole text spoken and committed, no error."""
    rec = bot.recorder
    assert len(rec.down(TTSStartedFrame)) == 1 and len(rec.down(TTSStoppedFrame)) == 1
    assert not rec.up(ErrorFrame), [e.error for e in rec.up(ErrorFrame)]
    assert bot.tts.is_usable
    assert bot.assistant_messages() == [text]


# -- 1. silences normal for this engine never end the audio context ---------------------------------


async def test_a_reply_waiting_for_a_slot_longer_than_the_idle_timeout_is_spoken_whole(
    tiny_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tiny_engine, "queue_timeout_s", math.inf)
    blockers = [tiny_engine.open_session() for _ in range(tiny_engine.max_sessions)]

    async def script(bot: Bot) -> None:
        rec = bot.recorder
        await bot.say()
        await rec.wait_for(lambda: bool(rec.down(TTSStartedFrame)), "the reply's context")
        await asyncio.sleep(SILENCE_S)  # every slot is taken: the reply waits in the engine's queue
        for session in blockers:
            session.cancel()
        await rec.wait_for(lambda: bool(rec.down(LLMFullResponseEndFrame)), "the reply")

    try:
        bot = await run_bot(tiny_engine, [tokens_of(SECOND)], script, stop_frame_timeout_s=SHORT_TIMEOUT_S)
    finally:
        for session in blockers:
            session.cancel()
    assert_one_clean_turn(bot, SECOND)
    assert audio_of(bot.recorder.down()) == pcm16(tiny_engine.synthesize(SECOND, GREEDY_OPTIONS).pcm)
    assert tiny_engine.active_sessions == 0


async def test_an_llm_stalling_mid_word_does_not_split_the_turn_or_garble_the_text(tiny_engine: Any) -> None:
    text = "We can meet at noon and then go to the station together."
    head, tail = text.split(" and ")
    tokens = [*tokens_of(head), " a", "nd ", *tokens_of(tail)]
    stall_at = len(tokens_of(head)) + 1  # the LLM stops after "a" of "and" (a tool call, say)

    async def hold(bot: Bot, reply: int, token: int) -> None:
        if token == stall_at:
            await asyncio.sleep(SILENCE_S)

    async def script(bot: Bot) -> None:
        await bot.say()
        await bot.recorder.wait_for(lambda: bool(bot.recorder.down(LLMFullResponseEndFrame)), "the reply")

    bot = await run_bot(tiny_engine, [tokens], script, hold=hold, stop_frame_timeout_s=SHORT_TIMEOUT_S)
    assert_one_clean_turn(bot, text)
    assert audio_of(bot.recorder.down()) == pcm16(tiny_engine.synthesize(text, GREEDY_OPTIONS).pcm)


async def test_a_model_still_loading_past_the_idle_timeout_is_not_a_failure(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kyutai_tts_plugin.engine as engine_module

    may_load = threading.Event()
    load = engine_module.shared_engine

    def held_load(*args: Any, **kwargs: Any) -> TTSEngine:
        if not may_load.wait(timeout=HANG_GUARD_S):
            raise AssertionError("the test never let the model load")
        return load(*args, **kwargs)

    monkeypatch.setattr(engine_module, "shared_engine", held_load)

    async def script(bot: Bot) -> None:
        rec = bot.recorder
        await bot.say()
        await rec.wait_for(lambda: bool(rec.down(TTSStartedFrame)), "the reply's context")
        await asyncio.sleep(SILENCE_S)
        may_load.set()
        await rec.wait_for(lambda: bool(rec.down(LLMFullResponseEndFrame)), "the reply")

    try:
        bot = await run_bot(
            None,
            [tokens_of(SECOND)],
            script,
            model=tiny_checkpoint,
            voice_repo=tiny_checkpoint / "voices",
            stop_frame_timeout_s=SHORT_TIMEOUT_S,
        )
    finally:
        may_load.set()
    rec = bot.recorder
    assert not rec.up(ErrorFrame), [e.error for e in rec.up(ErrorFrame)]
    assert bot.tts.is_usable and bot.assistant_messages() == [SECOND]
    engine = bot.tts.engine
    assert isinstance(engine, TTSEngine)
    expected = pcm16(engine.synthesize(SECOND, GREEDY_OPTIONS).pcm)
    for context_id in contexts_in_order(rec.down()):
        assert audio_of(of_context(rec.down(), context_id)) == expected


async def test_a_model_that_failed_to_load_loads_once_its_files_appear(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()

    async def script(bot: Bot) -> None:
        rec = bot.recorder
        await bot.say()
        await rec.wait_for(lambda: len(rec.down(LLMFullResponseEndFrame)) == 1, "the first reply")
        shutil.copytree(tiny_checkpoint, model_dir, dirs_exist_ok=True)  # the download finished
        await bot.say()
        await rec.wait_for(lambda: len(rec.down(LLMFullResponseEndFrame)) == 2, "the second reply")

    bot = await run_bot(
        None, [tokens_of(SECOND), tokens_of(SECOND)], script, model=model_dir, voice_repo=model_dir / "voices"
    )
    rec = bot.recorder
    errors = [e.error for e in rec.up(ErrorFrame)]
    assert len(errors) == 1 and "config.json" in errors[0], errors
    engine = bot.tts.engine
    assert isinstance(engine, TTSEngine)
    try:
        failed, spoken = contexts_in_order(rec.down())
        expected = pcm16(engine.synthesize(SECOND, GREEDY_OPTIONS).pcm)
        assert audio_of(of_context(rec.down(), spoken)) == expected
        assert bot.tts.is_usable and bot.assistant_messages() == [SECOND]
    finally:
        engine.close()


# -- 2. captions and context follow the audio actually pushed, underruns included -------------------


async def test_word_times_shift_by_an_underrun(tiny_engine: Any, probe: EngineProbe) -> None:
    clock = ManualClock()
    start_ns = clock.now_ns
    before_gap = 5  # audio frames pushed before the engine stalls
    gap_s = 1.0

    async def script(bot: Bot) -> None:
        rec = bot.recorder
        probe.park_at_chunk(0, before_gap)
        await bot.say()
        await probe.parked()
        await rec.wait_for(lambda: len(rec.down(TTSAudioRawFrame)) == before_gap, "the first frames")
        # The listener plays those frames, then hears nothing for gap_s: the engine is stalled.
        clock.advance(before_gap * FRAME_DURATION_S + gap_s)
        probe.release()
        await rec.wait_for(lambda: bool(rec.down(LLMFullResponseEndFrame)), "the reply")

    bot = await run_bot(tiny_engine, [tokens_of(TEXT)], script, clock=clock)
    reference = tiny_engine.synthesize(TEXT, GREEDY_OPTIONS)
    words = bot.recorder.down(TTSTextFrame)
    assert [w.text for w in words] == [t.text.strip() for t in reference.words]
    shifted = 0
    for frame, timing in zip(words, reference.words, strict=True):
        # A word starting in a frame pushed after the gap is heard gap_s later than the engine says.
        after_gap = round(timing.start_s / FRAME_DURATION_S) >= before_gap
        shifted += after_gap
        expected = start_ns + (timing.start_s + (gap_s if after_gap else 0.0)) * 1e9
        assert abs(frame.pts - expected) < 1e3, (frame.text, frame.pts - start_ns, timing.start_s)
    assert 0 < shifted < len(words)
    assert bot.assistant_messages() == [TEXT]


async def test_a_word_longer_than_the_text_to_audio_delay_follows_its_first_frame(tiny_engine: Any) -> None:
    # Its end (the next word's start) comes after its audio has begun; its caption must not wait for it.
    word = "www.example.com/some/long/path"
    text = f"Go to {word} now."
    reference = tiny_engine.synthesize(text, GREEDY_OPTIONS)
    timing = next(w for w in reference.words if w.word == word)
    delay_frames = tiny_engine.delay_steps + tiny_engine._max_delay
    assert round((timing.end_s - timing.start_s) / FRAME_DURATION_S) > delay_frames, "no longer long"

    async def script(bot: Bot) -> None:
        await bot.say()
        await bot.recorder.wait_for(lambda: bool(bot.recorder.down(TTSStoppedFrame)), "the reply")

    bot = await run_bot(tiny_engine, [tokens_of(text)], script)
    rec = bot.recorder
    caption = rec.index(TTSTextFrame, text=word)
    frames_before = sum(isinstance(p.frame, TTSAudioRawFrame) for p in rec.pushed[:caption])
    # Queued behind the frame it starts in (Pipecat then times it from that frame's push).
    assert frames_before == round(timing.start_s / FRAME_DURATION_S) + 1
    assert bot.assistant_messages() == [text]


# -- 3. text transforms see sentences, not words -----------------------------------------------------


async def test_text_transforms_see_whole_sentences(tiny_engine: Any) -> None:
    text = "## Today\n**Very important** news for you. It is *really* good."
    seen: list[str] = []

    async def record(text: str, text_type: str) -> str:
        seen.append(text)
        return text

    async def script(bot: Bot) -> None:
        await bot.say()
        await bot.recorder.wait_for(lambda: bool(bot.recorder.down(LLMFullResponseEndFrame)), "the reply")

    bot = await run_bot(
        tiny_engine, [tokens_of(text)], script, text_transforms=[("*", strip_markdown), ("*", record)]
    )
    # The markdown was removed before the engine got the text: no marker reached it.
    assert seen and not any(c in "".join(seen) for c in "*#"), seen
    assert "Very important news for you." in "".join(seen)
    assert all(len(s.split()) > 1 for s in seen), seen  # never one word at a time
    rec = bot.recorder
    assert not rec.up(ErrorFrame)
    spoken = " ".join(s.strip() for s in seen)
    assert audio_of(rec.down()) == pcm16(tiny_engine.synthesize(spoken, GREEDY_OPTIONS).pcm)
    # The context keeps the LLM's own text (Pipecat joins its words with spaces).
    assert bot.assistant_messages() == [text.replace("\n", " ")]


# -- 4. what was not heard is not committed ----------------------------------------------------------


async def test_a_reply_in_an_unknown_voice_is_not_committed(tiny_engine: Any) -> None:
    async def script(bot: Bot) -> None:
        await bot.say()
        await bot.recorder.wait_for(lambda: bool(bot.recorder.down(LLMFullResponseEndFrame)), "the reply")

    bot = await run_bot(
        tiny_engine,
        [tokens_of(SECOND)],
        script,
        settings=KyutaiTTSService.Settings(temperature=0.0, voice="no/such-voice"),
    )
    errors = [e.error for e in bot.recorder.up(ErrorFrame)]
    assert len(errors) == 1 and "no/such-voice" in errors[0], errors
    assert not bot.recorder.down(TTSTextFrame)
    assert not any(m for m in bot.assistant_messages()), bot.assistant_messages()


async def test_a_reply_lost_mid_stream_commits_only_the_words_whose_audio_was_pushed(
    tiny_engine: Any,
) -> None:
    async def script(bot: Bot) -> None:
        await bot.say()
        await bot.recorder.wait_for(lambda: bool(bot.recorder.down(LLMFullResponseEndFrame)), "the reply")

    bot = await run_bot(FlakyBackend(tiny_engine), [tokens_of(TEXT)], script)
    rec = bot.recorder
    assert len(rec.up(ErrorFrame)) == 1
    pushed_s = len(rec.down(TTSAudioRawFrame)) * FRAME_DURATION_S
    reference = tiny_engine.synthesize(TEXT, GREEDY_OPTIONS)
    heard = [t.text.strip() for t in reference.words if t.start_s < pushed_s]
    assert heard and len(heard) < len(reference.words)
    assert [w.text for w in rec.down(TTSTextFrame)] == heard
    assert bot.assistant_messages() == [" ".join(heard)]


# -- 5. constructor conventions, EndFrame, pacing ----------------------------------------------------


def test_voice_keywords_and_aggregate_sentences_are_honoured_or_refused(tiny_engine: TTSEngine) -> None:
    voice = "vctk/p225_023.wav"
    assert KyutaiTTSService(engine=tiny_engine, voice=voice)._session_options().voice == voice
    assert KyutaiTTSService(engine=tiny_engine, voice_id=voice)._session_options().voice == voice
    same = KyutaiTTSService(engine=tiny_engine, voice=voice, settings=KyutaiTTSService.Settings(voice=voice))
    assert same._session_options().voice == voice
    with pytest.raises(InvalidInputError, match="conflicting voices"):
        KyutaiTTSService(engine=tiny_engine, voice=voice, voice_id="expresso/other.wav")
    with pytest.raises(InvalidInputError, match="conflicting voices"):
        KyutaiTTSService(engine=tiny_engine, voice=voice, settings=KyutaiTTSService.Settings(voice="x.wav"))

    by_sentence = KyutaiTTSService(engine=tiny_engine, aggregate_sentences=True)
    assert by_sentence._text_aggregation_mode == TextAggregationMode.SENTENCE
    assert by_sentence._word_aggregator is None
    assert KyutaiTTSService(engine=tiny_engine, aggregate_sentences=False)._word_aggregator is not None
    with pytest.raises(InvalidInputError, match="not both"):
        KyutaiTTSService(
            engine=tiny_engine, aggregate_sentences=True, text_aggregation_mode=TextAggregationMode.TOKEN
        )
    for bad in (0, -1.0, math.nan, "3"):
        with pytest.raises(InvalidInputError, match="max_lead_s"):
            KyutaiTTSService(engine=tiny_engine, max_lead_s=bad)


async def test_voice_keyword_speaks_in_that_voice(tiny_engine: Any) -> None:
    voice = "vctk/p225_023.wav"

    async def script(bot: Bot) -> None:
        await bot.say()
        await bot.recorder.wait_for(lambda: bool(bot.recorder.down(LLMFullResponseEndFrame)), "the reply")

    bot = await run_bot(tiny_engine, [tokens_of(SECOND)], script, voice=voice)
    expected = tiny_engine.synthesize(SECOND, SessionOptions(temperature=0.0, voice=voice))
    assert audio_of(bot.recorder.down()) == pcm16(expected.pcm)


async def test_pacing_keeps_the_engine_a_bounded_lead_ahead_of_playback(
    tiny_engine: Any, probe: EngineProbe
) -> None:
    clock = ManualClock()
    lead_frames = 5
    max_lead_s = (lead_frames - 0.5) * FRAME_DURATION_S  # half a frame off: no float ties
    marks: dict[str, int] = {}

    async def script(bot: Bot) -> None:
        rec = bot.recorder

        def frames() -> int:
            return len(rec.down(TTSAudioRawFrame))

        await bot.say()
        # Playback time stands still: the reply may run max_lead_s ahead of it, and no further.
        await rec.wait_for(lambda: frames() == lead_frames, "the first max_lead_s of audio")
        # The engine goes on with another utterance to its end; the paced one must not follow.
        await asyncio.to_thread(tiny_engine.synthesize, "One more.", GREEDY_OPTIONS)
        marks["frames"] = frames()
        marks["chunks"] = probe.chunks[probe.session(0)]
        # Two frames have played: two more may be made.
        clock.advance(2 * FRAME_DURATION_S)
        await rec.wait_for(lambda: frames() >= lead_frames + 2, "more audio as playback goes on")
        await asyncio.to_thread(tiny_engine.synthesize, "One more.", GREEDY_OPTIONS)
        marks["frames_later"] = frames()
        # Playback goes on (a frame at a time, faster than real time): the reply runs to its end.
        while not rec.down(LLMFullResponseEndFrame):
            clock.advance(FRAME_DURATION_S)
            await asyncio.sleep(0.001)

    bot = await run_bot(tiny_engine, [tokens_of(FIRST)], script, clock=clock, max_lead_s=max_lead_s)
    assert marks["frames"] == lead_frames
    # What the engine made but the service held back: its small buffer, and the frame in hand.
    assert marks["chunks"] <= lead_frames + 3, marks
    assert marks["frames_later"] == lead_frames + 2, marks
    expected = pcm16(tiny_engine.synthesize(FIRST, GREEDY_OPTIONS).pcm)
    assert_same_audio(audio_of(bot.recorder.down()), expected, lsb=8)
    assert bot.assistant_messages() == [FIRST]


class SoundCard(BaseOutputTransport):
    """Pipecat's own output transport path (its audio queue, 80 ms chunks, bot-speaking events, timed
    text) into a device that plays a chunk per tick the test grants; playing it moves the pipeline
    clock by the chunk's length, so playback time is what the transport actually wrote."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(
            TransportParams(
                audio_out_enabled=True,
                audio_out_sample_rate=SAMPLE_RATE,
                audio_out_10ms_chunks=round(FRAME_DURATION_S * 100),  # one engine frame per write
                audio_out_end_silence_secs=0,
                audio_out_write_timeout_secs=HANG_GUARD_S,  # a device that waits is not a dead peer
            )
        )
        self.clock = clock
        self.ticks = asyncio.Semaphore(0)
        self.played = 0  # chunks written to the device

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        await self.ticks.acquire()
        self.clock.advance(len(frame.audio) / (2 * frame.sample_rate * frame.num_channels))
        self.played += 1
        return True

    def play(self, chunks: int) -> None:
        for _ in range(chunks):
            self.ticks.release()


async def test_pacing_follows_what_the_output_transport_plays(tiny_engine: Any, probe: EngineProbe) -> None:
    # Short: Pipecat's transport releases each word at its PTS with a real-time sleep.
    reply = "Sure, here is the plan for today, step by step."
    clock = ManualClock()
    card = SoundCard(clock)
    lead_frames = 5
    max_lead_s = (lead_frames - 0.5) * FRAME_DURATION_S  # half a frame off: no float ties
    total = len(tiny_engine.synthesize(reply, GREEDY_OPTIONS).pcm) // FRAME_SIZE
    leads: list[int] = []

    async def script(bot: Bot) -> None:
        rec = bot.recorder

        def made() -> int:
            return len(rec.down(TTSAudioRawFrame))

        async def settled() -> None:
            # The engine finishes another utterance meanwhile: a session not held back would run on.
            await asyncio.to_thread(tiny_engine.synthesize, "One more.", GREEDY_OPTIONS)
            leads.append(made() - card.played)

        await bot.say()
        await rec.wait_for(lambda: made() == lead_frames, "the first max_lead_s of audio")
        await settled()  # nothing played yet: the reply stays max_lead_s ahead
        card.play(2)
        await rec.wait_for(lambda: card.played == 2 and made() == 2 + lead_frames, "two frames more")
        await settled()
        while card.played < total:  # the device plays on, a chunk at a time, to the end
            card.play(1)
            want = card.played + 1
            await rec.wait_for(
                lambda want=want: card.played == want and made() >= min(total, want + lead_frames),
                "the device to play a chunk, and the reply to go on as far ahead",
            )
            leads.append(made() - card.played)
            if card.played == total // 2:
                await settled()
        card.play(TAIL_TICKS)  # whatever Pipecat writes at the end plays at once

    bot = await run_bot(
        tiny_engine, [tokens_of(reply)], script, clock=clock, output=card, max_lead_s=max_lead_s
    )
    # Never further ahead of what the device played than max_lead_s, and that far whenever the
    # engine had time to get there (each settled point).
    assert max(leads) == lead_frames, leads
    assert leads.count(lead_frames) >= 3 and len(leads) > total, leads
    expected = pcm16(tiny_engine.synthesize(reply, GREEDY_OPTIONS).pcm)
    assert_same_audio(audio_of(bot.recorder.down()), expected, lsb=8)
    assert bot.assistant_messages() == [reply]


async def test_end_frame_without_llm_end_speaks_the_last_word(tiny_engine: Any) -> None:
    text = "Let me think about that for a sec"

    async def script(bot: Bot) -> None:
        await bot.say()
        await bot.recorder.wait_for(lambda: bot.llm.pushed == [len(tokens_of(text))], "the LLM's last token")

    bot = await run_bot(tiny_engine, [Unfinished(tokens_of(text))], script, end=EndFrame())
    assert audio_of(bot.recorder.down()) == pcm16(tiny_engine.synthesize(text, GREEDY_OPTIONS).pcm)
    assert [w.text for w in bot.recorder.down(TTSTextFrame)][-1] == "sec"
    assert tiny_engine.active_sessions == 0
