"""KyutaiTTSService in real Pipecat pipelines, on the tiny random-weight checkpoint (CPU).

The only test double is `ScriptedLLM`, which stands in for an LLM service: it answers each context
with a scripted reply streamed token by token. Aggregators, the TTS base class, the pipeline worker
and runner are Pipecat's own.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    ErrorFrame,
    Frame,
    InterruptionFrame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMMessagesAppendFrame,
    LLMTextFrame,
    MetricsFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    TTSUpdateSettingsFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData, TTSUsageMetricsData
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from kyutai_tts_plugin.errors import EngineFailure, InvalidInputError
from kyutai_tts_plugin.pipecat import KyutaiTTSService
from kyutai_tts_plugin.types import SessionEvent, SessionOptions, TTSSession

GREEDY = KyutaiTTSService.Settings(temperature=0.0)


@dataclass
class Unfinished:
    """A scripted reply whose LLM stops without ending the response (no LLMFullResponseEndFrame)."""

    tokens: list[str]


class ScriptedLLM(FrameProcessor):
    """Stands in for an LLM service: answers each context frame with the next scripted reply.

    The reply is pushed from `process_frame`, token by token, like a real LLM service, so an
    interruption cancels it mid-reply.
    """

    def __init__(self, replies: Sequence[Sequence[str] | Unfinished], token_delay_s: float = 0.02) -> None:
        super().__init__()
        self._replies = list(replies)
        self._delay = token_delay_s
        self.token_times: list[list[float]] = []  # monotonic time each token was pushed, per reply

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if not isinstance(frame, LLMContextFrame):
            await self.push_frame(frame, direction)
            return
        reply = self._replies.pop(0)
        tokens = reply.tokens if isinstance(reply, Unfinished) else reply
        times: list[float] = []
        self.token_times.append(times)
        await self.push_frame(LLMFullResponseStartFrame())
        for token in tokens:
            await asyncio.sleep(self._delay)
            times.append(time.monotonic())
            await self.push_frame(LLMTextFrame(token))
        if not isinstance(reply, Unfinished):
            await self.push_frame(LLMFullResponseEndFrame())


@dataclass
class Pushed:
    frame: Frame
    direction: FrameDirection
    at: float


class Recorder(BaseObserver):
    """Records, in order, every frame the TTS service pushes (both directions)."""

    def __init__(self, tts: FrameProcessor) -> None:
        super().__init__()
        self.tts = tts
        self.pushed: list[Pushed] = []

    async def on_push_frame(self, data: FramePushed) -> None:
        if data.source is self.tts:
            self.pushed.append(Pushed(data.frame, data.direction, time.monotonic()))

    def down(self, *types: type) -> list[Frame]:
        return [
            p.frame
            for p in self.pushed
            if p.direction == FrameDirection.DOWNSTREAM and (not types or isinstance(p.frame, types))
        ]

    def up(self, *types: type) -> list[Frame]:
        return [
            p.frame
            for p in self.pushed
            if p.direction == FrameDirection.UPSTREAM and (not types or isinstance(p.frame, types))
        ]

    def first(self, kind: type, **attrs: Any) -> Pushed:
        for p in self.pushed:
            if isinstance(p.frame, kind) and all(getattr(p.frame, k) == v for k, v in attrs.items()):
                return p
        raise AssertionError(f"no {kind.__name__} {attrs} was pushed")

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "timed out waiting for the pipeline"
            await asyncio.sleep(0.005)


@dataclass
class Bot:
    tts: KyutaiTTSService
    llm: ScriptedLLM
    context: LLMContext
    recorder: Recorder
    worker: PipelineWorker

    async def say(self, user_text: str = "hi") -> None:
        """Add a user message and run the LLM, as the user aggregator does after a user turn."""
        await self.worker.queue_frame(
            LLMMessagesAppendFrame([{"role": "user", "content": user_text}], run_llm=True)
        )

    async def send(self, frame: Frame) -> None:
        await self.worker.queue_frame(frame)

    def assistant_messages(self) -> list[str]:
        return [m["content"] for m in self.context.get_messages() if m.get("role") == "assistant"]


async def run_bot(
    engine: Any,
    replies: Sequence[Sequence[str] | Unfinished],
    script: Callable[[Bot], Awaitable[None]],
    *,
    settings: KyutaiTTSService.Settings | None = GREEDY,
    token_delay_s: float = 0.02,
    end: Frame | None = None,
    timeout_s: float = 60.0,
    **tts_kwargs: Any,
) -> Bot:
    """Run user aggregator -> scripted LLM -> Kyutai TTS -> assistant aggregator until `script` ends,
    then send `end` (an EndFrame by default) and wait for the pipeline to finish."""
    context = LLMContext()
    aggregators = LLMContextAggregatorPair(context)
    llm = ScriptedLLM(replies, token_delay_s)
    tts = KyutaiTTSService(engine=engine, settings=settings, **tts_kwargs)
    recorder = Recorder(tts=tts)
    pipeline = Pipeline([aggregators.user(), llm, tts, aggregators.assistant()])
    worker = PipelineWorker(
        pipeline,
        params=PipelineParams(enable_metrics=True, enable_usage_metrics=True),
        observers=[recorder],
        cancel_on_idle_timeout=False,
    )
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def _started(worker: PipelineWorker, frame: Frame) -> None:
        started.set()

    bot = Bot(tts, llm, context, recorder, worker)

    async def drive() -> None:
        try:
            await asyncio.wait_for(started.wait(), timeout=10)
            await script(bot)
        except BaseException:
            await worker.cancel()  # don't leave the pipeline running behind a failed test
            raise
        await worker.queue_frame(end or EndFrame())

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await asyncio.wait_for(asyncio.gather(runner.run(), drive()), timeout=timeout_s)
    return bot


def tokens_of(text: str, size: int = 3) -> list[str]:
    """Cut text into LLM-like fragments of `size` characters: words split anywhere."""
    return [text[i : i + size] for i in range(0, len(text), size)]


def audio_of(frames: Sequence[Frame]) -> bytes:
    return b"".join(f.audio for f in frames if isinstance(f, TTSAudioRawFrame))


def pcm16(pcm: np.ndarray) -> bytes:
    return (np.clip(pcm, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def assert_same_audio(got: bytes, expected: bytes, lsb: int = 0) -> None:
    """Equal 16-bit audio, to within `lsb` steps (sessions batched together differ by rounding)."""
    a, b = np.frombuffer(got, "<i2").astype(int), np.frombuffer(expected, "<i2").astype(int)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.abs(a - b).max(initial=0) <= lsb


def of_context(frames: Sequence[Frame], context_id: str) -> list[Frame]:
    return [f for f in frames if getattr(f, "context_id", None) == context_id]


# -- streaming from the LLM -----------------------------------------------------------------------

TEXT = "Hello there, friend! It costs 42 dollars, or 3.5 euros. Shall we go now? Yes, we shall go."


async def test_llm_tokens_stream_to_the_engine_as_whole_words(tiny_engine: Any, backend: Any) -> None:
    tokens = tokens_of(TEXT)
    words_seen: list[tuple[int, list[str]]] = []  # (tokens pushed so far, words the engine has)

    async def script(bot: Bot) -> None:
        await bot.say()
        while len(bot.llm.token_times) == 0 or len(bot.llm.token_times[0]) < len(tokens):
            await asyncio.sleep(0.01)
            # The in-process session shows the words it was given (a remote one does not).
            sessions = [s.session for s in bot.tts._streams.values() if hasattr(s.session, "words")]
            if sessions:
                words_seen.append((len(bot.llm.token_times[0]), sessions[0].words))
        await bot.recorder.wait_for(lambda: bool(bot.recorder.down(LLMFullResponseEndFrame)))

    bot = await run_bot(backend, [tokens], script, token_delay_s=0.04)
    rec = bot.recorder
    expected = SessionOptions(temperature=0.0)
    reference = tiny_engine.synthesize(TEXT, expected)

    # The engine received whole words while the LLM was still streaming, never a fragment.
    all_words = TEXT.split()
    mid_stream = [(n, w) for n, w in words_seen if 0 < n < len(tokens) and w]
    assert mid_stream or backend is not tiny_engine, "the engine received no word before the LLM finished"
    for n, words in words_seen:
        assert words == all_words[: len(words)]
        if n < len(tokens):  # the end of the response flushes the last word
            assert len(words) <= len(re.findall(r"\S+(?=\s)", "".join(tokens[:n])))

    # The first audio frame left the TTS before the LLM's last token.
    first_audio = rec.first(TTSAudioRawFrame)
    assert first_audio.at < bot.llm.token_times[0][-1]

    # Exactly the audio of the one-shot synthesis, as one context bracketed by started/stopped.
    down = rec.down()
    started = rec.down(TTSStartedFrame)
    assert len(started) == 1 and len(rec.down(TTSStoppedFrame)) == 1
    context_id = started[0].context_id
    assert audio_of(of_context(down, context_id)) == pcm16(reference.pcm)
    assert all(f.sample_rate == 24000 and f.num_channels == 1 for f in rec.down(TTSAudioRawFrame))
    kinds = [
        type(f) for f in down if isinstance(f, (TTSStartedFrame, TTSStoppedFrame, LLMFullResponseEndFrame))
    ]
    assert kinds == [TTSStartedFrame, TTSStoppedFrame, LLMFullResponseEndFrame]

    # Word frames: the engine's words, at the engine's times on the audio timeline.
    words = rec.down(TTSTextFrame)
    assert [w.text for w in words] == [t.text.strip() for t in reference.words]
    base = words[0].pts - round(reference.words[0].start_s * 1e9)
    for w, t in zip(words, reference.words, strict=True):
        assert abs(w.pts - base - t.start_s * 1e9) < 1e3, (w.text, w.pts - base, t.start_s)
    assert bot.assistant_messages() == [TEXT]

    # Metrics: TTFB once, usage once with the whole text.
    metrics = [d for f in rec.down(MetricsFrame) for d in f.data]
    assert any(isinstance(d, TTFBMetricsData) and d.value > 0 for d in metrics)
    usage = [d for d in metrics if isinstance(d, TTSUsageMetricsData)]
    assert [d.value for d in usage] == [len(TEXT)]
    assert tiny_engine.active_sessions == 0
    assert not rec.up(ErrorFrame)


# -- interruption ---------------------------------------------------------------------------------

FIRST = (
    "Hello there. This second sentence keeps going on and on, with many more words than anyone would "
    "want to hear in one breath, because the model that writes it is in no hurry to reach its end at all"
)
SECOND = "Sorry, go ahead."


async def test_interruption_mid_sentence_keeps_the_heard_words_and_frees_the_slot(
    tiny_engine: Any, backend: Any
) -> None:
    marks: dict[str, int] = {}

    async def script(bot: Bot) -> None:
        rec = bot.recorder
        await bot.say()
        # Interrupt once words of the unfinished second sentence have been played.
        await rec.wait_for(lambda: len(rec.down(TTSTextFrame)) >= 5)
        marks["tokens_sent"] = len(bot.llm.token_times[0])
        await bot.send(InterruptionFrame())
        await rec.wait_for(lambda: bool(rec.down(InterruptionFrame)))
        marks["interrupted"] = len(rec.pushed)
        await rec.wait_for(lambda: tiny_engine.active_sessions == 0, timeout=2)
        await asyncio.sleep(0.3)  # anything late from the cancelled session would show up here
        marks["second"] = len(rec.pushed)
        await bot.say()
        await rec.wait_for(
            lambda: len(rec.down(TTSStoppedFrame)) >= 1 and bool(rec.down(LLMFullResponseEndFrame))
        )

    first_tokens = tokens_of(FIRST)
    bot = await run_bot(backend, [first_tokens, tokens_of(SECOND)], script, token_delay_s=0.06)
    rec = bot.recorder
    first_ctx = rec.down(TTSStartedFrame)[0].context_id
    before = [p.frame for p in rec.pushed[: marks["interrupted"]]]
    after = [p.frame for p in rec.pushed[marks["interrupted"] :]]

    # Nothing of the interrupted context after the interruption: no audio, no words, no stop frame.
    assert not [f for f in after if getattr(f, "context_id", None) == first_ctx]
    assert not [
        f
        for f in rec.pushed[marks["interrupted"] : marks["second"]]
        if isinstance(f.frame, (TTSAudioRawFrame, TTSTextFrame))
    ]

    # The context holds exactly the words that were played, including those of the unfinished sentence
    # (which the LLM was still writing).
    assert marks["tokens_sent"] < len(first_tokens) - 10
    heard = [f for f in before if isinstance(f, TTSTextFrame)]
    played_s = len([f for f in before if isinstance(f, TTSAudioRawFrame)]) * 0.08
    assert len(heard) >= 5 and heard[2].text == "This"
    for w in heard:
        assert (w.pts - heard[0].pts) / 1e9 <= played_s  # its audio had started when it was reported
    heard_text = " ".join(w.text for w in heard)
    assert FIRST.startswith(heard_text)
    assert bot.assistant_messages()[0] == heard_text

    # The next turn starts clean: its own context, exactly its one-shot audio, the whole text.
    second_ctx = rec.down(TTSStartedFrame)[1].context_id
    assert second_ctx != first_ctx
    reference = tiny_engine.synthesize(SECOND, SessionOptions(temperature=0.0))
    assert audio_of(of_context(after, second_ctx)) == pcm16(reference.pcm)
    assert bot.assistant_messages() == [heard_text, SECOND]
    assert tiny_engine.active_sessions == 0
    assert not rec.up(ErrorFrame)


async def test_interruption_before_any_audio_and_between_flush_and_drain(tiny_engine: Any) -> None:
    async def script(bot: Bot) -> None:
        rec = bot.recorder
        await bot.say()  # interrupted after its first word reached the engine, before any audio
        await rec.wait_for(lambda: bool(bot.tts._streams))
        await bot.send(InterruptionFrame())
        await rec.wait_for(lambda: tiny_engine.active_sessions == 0, timeout=2)
        await bot.say()  # interrupted after the LLM finished, while the engine still speaks the rest
        await rec.wait_for(lambda: any(s.flushed for s in bot.tts._streams.values()))
        await bot.send(InterruptionFrame())
        await rec.wait_for(lambda: tiny_engine.active_sessions == 0, timeout=2)
        await bot.say()
        await rec.wait_for(lambda: len(rec.down(TTSStoppedFrame)) >= 1)

    bot = await run_bot(
        tiny_engine, [tokens_of(FIRST), tokens_of(SECOND, 1), tokens_of(SECOND)], script, token_delay_s=0.01
    )
    rec = bot.recorder
    # Only the last turn completed; the two interrupted ones pushed no stop frame.
    assert len(rec.down(TTSStoppedFrame)) == 1
    last_ctx = rec.down(TTSStoppedFrame)[0].context_id
    reference = tiny_engine.synthesize(SECOND, SessionOptions(temperature=0.0))
    assert audio_of(of_context(rec.down(), last_ctx)) == pcm16(reference.pcm)
    assert bot.assistant_messages()[-1] == SECOND
    assert tiny_engine.active_sessions == 0
    assert not rec.up(ErrorFrame)


# -- turns, speak frames, settings ----------------------------------------------------------------


def contexts_in_order(frames: Sequence[Frame]) -> list[str]:
    return [f.context_id for f in frames if isinstance(f, TTSStartedFrame)]


def assert_contexts_do_not_interleave(frames: Sequence[Frame]) -> None:
    """Each context's frames form one block, from its TTSStartedFrame to its TTSStoppedFrame."""
    owner = [
        getattr(f, "context_id", None)
        for f in frames
        if isinstance(f, (TTSAudioRawFrame, TTSStartedFrame, TTSStoppedFrame, TTSTextFrame))
    ]
    blocks = [c for i, c in enumerate(owner) if i == 0 or c != owner[i - 1]]
    assert len(blocks) == len(set(blocks)), blocks


async def test_back_to_back_replies_speak_frame_empty_and_emoji_replies(tiny_engine: Any) -> None:
    a, b, speak = "First reply, quite short.", "And a second one right after it.", "Good morning to you."

    async def script(bot: Bot) -> None:
        await bot.say()
        await bot.say()
        await bot.send(TTSSpeakFrame(speak))
        await bot.say()  # empty reply
        await bot.say()  # emoji only
        await bot.recorder.wait_for(lambda: len(bot.recorder.down(LLMFullResponseEndFrame)) == 4)

    replies = [tokens_of(a), tokens_of(b), [], ["😀", " 🎉"]]
    bot = await run_bot(tiny_engine, replies, script, token_delay_s=0.005)
    rec = bot.recorder
    down = rec.down()
    ids = contexts_in_order(down)
    assert len(ids) == 4 and len(set(ids)) == 4
    assert [f.context_id for f in rec.down(TTSStoppedFrame)] == ids
    assert_contexts_do_not_interleave(down)
    greedy = SessionOptions(temperature=0.0)
    for context_id, text in zip(ids[:3], (a, b, speak), strict=True):
        # These sessions overlap in the engine's batch, so the rounding may differ slightly.
        expected = pcm16(tiny_engine.synthesize(text, greedy).pcm)
        assert_same_audio(audio_of(of_context(down, context_id)), expected, lsb=8)
        assert " ".join(f.text for f in of_context(down, context_id) if isinstance(f, TTSTextFrame)) == text
    # A reply with nothing speakable is one 80 ms frame of silence, not a failed synthesis.
    assert audio_of(of_context(down, ids[3])) == bytes(3840)
    assert not rec.up(ErrorFrame) and bot.tts.is_usable
    # Each reply ends after its own audio; the empty reply produces no TTS frames at all.
    ends = [i for i, f in enumerate(down) if isinstance(f, LLMFullResponseEndFrame)]
    stops = [i for i, f in enumerate(down) if isinstance(f, TTSStoppedFrame)]
    assert stops[0] < ends[0] < stops[1] < ends[1] < stops[2] < ends[2] < ends[3] and stops[3] < ends[3]
    assert bot.assistant_messages() == [a, b, speak, "😀 🎉"]
    assert tiny_engine.active_sessions == 0


async def test_settings_apply_from_the_next_utterance_and_bad_values_are_rejected(tiny_engine: Any) -> None:
    voice = "vctk/p225_023.wav"
    texts = ["One two three four.", "Five six seven eight.", "Nine ten eleven twelve."]

    async def script(bot: Bot) -> None:
        rec = bot.recorder
        await bot.say()
        await bot.send(
            TTSUpdateSettingsFrame(delta=KyutaiTTSService.Settings(voice=voice, padding_bonus=1.0))
        )
        await bot.say()
        await bot.send(TTSUpdateSettingsFrame(delta=KyutaiTTSService.Settings(temperature=-1.0, n_q=4)))
        await bot.send(TTSUpdateSettingsFrame(delta=KyutaiTTSService.Settings(voice="no/such-voice")))
        await bot.say()
        await rec.wait_for(lambda: len(rec.down(TTSStoppedFrame)) == 3)

    bot = await run_bot(tiny_engine, [tokens_of(t) for t in texts], script)
    rec = bot.recorder
    ids = contexts_in_order(rec.down())
    new = SessionOptions(temperature=0.0, voice=voice, padding_bonus=1.0)
    old = SessionOptions(temperature=0.0)
    # Consecutive replies overlap in the engine's batch: equal to within rounding.
    assert_same_audio(
        audio_of(of_context(rec.down(), ids[0])), pcm16(tiny_engine.synthesize(texts[0], old).pcm), 8
    )
    second = audio_of(of_context(rec.down(), ids[1]))
    assert_same_audio(second, pcm16(tiny_engine.synthesize(texts[1], new).pcm), 8)
    assert second != pcm16(tiny_engine.synthesize(texts[1], old).pcm)
    # The out-of-range update was refused as a whole; the unknown voice was reported when it was
    # first needed, and the utterance was spoken with the previous settings.
    errors = [f.error for f in rec.up(ErrorFrame)]
    assert len(errors) == 2, errors
    assert "temperature must be >= 0" in errors[0] and "previous settings stay" in errors[0]
    assert "no/such-voice" in errors[1] and "TTSUpdateSettingsFrame" in errors[1]
    assert_same_audio(
        audio_of(of_context(rec.down(), ids[2])), pcm16(tiny_engine.synthesize(texts[2], new).pcm), 8
    )
    assert (bot.tts._settings.voice, bot.tts._settings.n_q, bot.tts._settings.temperature) == (voice, 32, 0.0)
    assert bot.tts.is_usable and tiny_engine.active_sessions == 0


def test_bad_constructor_arguments_raise_clear_errors(tiny_engine: Any) -> None:
    bad = [
        {"settings": KyutaiTTSService.Settings(temperature=-0.5)},
        {"settings": KyutaiTTSService.Settings(n_q=0)},
        {"settings": KyutaiTTSService.Settings(cfg_coef="strong")},
        {"sample_rate": 16000},
    ]
    for kwargs in bad:
        with pytest.raises(InvalidInputError, match="temperature|n_q|cfg_coef|16000"):
            KyutaiTTSService(engine=tiny_engine, **kwargs)


# -- ending ---------------------------------------------------------------------------------------


async def test_end_frame_mid_utterance_finishes_promptly(tiny_engine: Any) -> None:
    text = "Let me think about that for a sec"

    async def script(bot: Bot) -> None:
        await bot.say()
        n = len(tokens_of(text))
        await bot.recorder.wait_for(lambda: bool(bot.llm.token_times) and len(bot.llm.token_times[0]) == n)

    t0 = time.monotonic()
    bot = await run_bot(tiny_engine, [Unfinished(tokens_of(text))], script, token_delay_s=0.01)
    ended = time.monotonic()
    rec = bot.recorder
    # No idle-timeout wait (3 s): the open session is flushed by the EndFrame; the partial last word
    # ("sec", which no whitespace ended) is dropped.
    assert ended - bot.llm.token_times[0][-1] < 2.0, ended - t0
    assert [type(f) for f in rec.down(TTSStartedFrame, TTSStoppedFrame, EndFrame)] == [
        TTSStartedFrame,
        TTSStoppedFrame,
        EndFrame,
    ]
    spoken = "Let me think about that for a"
    expected = pcm16(tiny_engine.synthesize(spoken, SessionOptions(temperature=0.0)).pcm)
    assert audio_of(rec.down()) == expected
    assert tiny_engine.active_sessions == 0 and not bot.tts._streams


async def test_cancel_frame_mid_utterance_stops_at_once(tiny_engine: Any) -> None:
    cancelled_at: list[float] = []

    async def script(bot: Bot) -> None:
        await bot.say()
        await bot.recorder.wait_for(lambda: len(bot.recorder.down(TTSAudioRawFrame)) >= 3)
        cancelled_at.append(time.monotonic())

    bot = await run_bot(tiny_engine, [tokens_of(FIRST)], script, token_delay_s=0.01, end=CancelFrame())
    assert time.monotonic() - cancelled_at[0] < 1.0
    rec = bot.recorder
    cancel_index = next(i for i, p in enumerate(rec.pushed) if isinstance(p.frame, CancelFrame))
    assert not [p for p in rec.pushed[cancel_index:] if isinstance(p.frame, (TTSAudioRawFrame, TTSTextFrame))]
    assert not rec.down(TTSStoppedFrame)
    assert tiny_engine.active_sessions == 0 and not bot.tts._streams


# -- errors ---------------------------------------------------------------------------------------


async def test_engine_full_is_an_error_frame_and_the_pipeline_keeps_going(tiny_engine: Any) -> None:
    # Take every slot and every place in the wait queue.
    blockers = []
    try:
        while True:
            blockers.append(tiny_engine.open_session())
    except Exception as exc:
        assert type(exc).__name__ == "EngineFullError"

    async def script(bot: Bot) -> None:
        rec = bot.recorder
        await bot.say()
        await rec.wait_for(lambda: len(rec.down(TTSStoppedFrame)) == 1)
        for session in blockers:
            session.cancel()
        await bot.say()
        await rec.wait_for(lambda: len(rec.down(TTSStoppedFrame)) == 2)

    try:
        bot = await run_bot(tiny_engine, [tokens_of("Nobody hears this."), tokens_of(SECOND)], script)
    finally:
        for session in blockers:
            session.cancel()
    rec = bot.recorder
    errors = rec.up(ErrorFrame)
    assert len(errors) == 1
    assert errors[0].error.startswith("Kyutai TTS: engine full") and "max_sessions" in errors[0].error
    assert not errors[0].category.is_permanent and bot.tts.is_usable
    failed, spoken = contexts_in_order(rec.down())
    assert audio_of(of_context(rec.down(), failed)) == bytes(3840)  # closed at once, no timeout
    assert audio_of(of_context(rec.down(), spoken)) == pcm16(
        tiny_engine.synthesize(SECOND, SessionOptions(temperature=0.0)).pcm
    )
    assert tiny_engine.active_sessions == 0


class FlakyBackend:
    """A `TTSBackend` whose next session fails after a few events, as a broken engine would."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.fail_next = True

    @property
    def sample_rate(self) -> int:
        return self.engine.sample_rate

    def list_voices(self) -> list[str]:
        return self.engine.list_voices()

    def open_session(self, options: SessionOptions | None = None) -> TTSSession:
        session = self.engine.open_session(options)
        if self.fail_next:
            self.fail_next = False
            return FailingSession(session)
        return session


class FailingSession:
    def __init__(self, session: TTSSession) -> None:
        self.session = session
        self.id = session.id
        self.push_text = session.push_text
        self.flush = session.flush
        self.cancel = session.cancel

    async def __aiter__(self) -> AsyncIterator[SessionEvent]:
        n = 0
        async for event in self.session:
            yield event
            n += 1
            if n == 4:
                self.session.cancel()
                raise EngineFailure("the engine failed while stepping: RuntimeError('boom')")


async def test_engine_failure_mid_stream_is_an_error_frame_and_the_next_turn_works(tiny_engine: Any) -> None:
    async def script(bot: Bot) -> None:
        rec = bot.recorder
        await bot.say()
        await rec.wait_for(
            lambda: len(rec.down(TTSStoppedFrame)) == 1 and bool(rec.down(LLMFullResponseEndFrame))
        )
        await bot.say()
        await rec.wait_for(lambda: len(rec.down(TTSStoppedFrame)) == 2)

    bot = await run_bot(FlakyBackend(tiny_engine), [tokens_of(TEXT), tokens_of(SECOND)], script)
    rec = bot.recorder
    errors = rec.up(ErrorFrame)
    assert [e.error for e in errors] == ["Kyutai TTS: the engine failed while stepping: RuntimeError('boom')"]
    assert bot.tts.is_usable
    failed, spoken = contexts_in_order(rec.down())
    assert (
        0
        < len(audio_of(of_context(rec.down(), failed)))
        < len(pcm16(tiny_engine.synthesize(TEXT, SessionOptions(temperature=0.0)).pcm))
    )
    assert audio_of(of_context(rec.down(), spoken)) == pcm16(
        tiny_engine.synthesize(SECOND, SessionOptions(temperature=0.0)).pcm
    )
    assert tiny_engine.active_sessions == 0


async def test_a_model_that_cannot_load_is_reported_per_utterance(tmp_path: Path) -> None:
    async def script(bot: Bot) -> None:
        await bot.say()
        await bot.recorder.wait_for(lambda: len(bot.recorder.down(TTSStoppedFrame)) == 1)

    bot = await run_bot(None, [["Hello ", "there."]], script, model=tmp_path)
    errors = [e.error for e in bot.recorder.up(ErrorFrame)]
    assert len(errors) == 1 and errors[0].startswith("Kyutai TTS:") and "config.json" in errors[0], errors


async def test_the_model_loads_in_the_background_without_delaying_the_pipeline(tiny_checkpoint: Path) -> None:
    from kyutai_tts_plugin.engine import TTSEngine

    loaded_at_start: list[bool] = []

    async def script(bot: Bot) -> None:
        loaded_at_start.append(bot.tts.engine is not None)
        await bot.say()
        await bot.recorder.wait_for(lambda: len(bot.recorder.down(TTSStoppedFrame)) == 1)

    bot = await run_bot(
        None, [tokens_of(SECOND)], script, model=tiny_checkpoint, voice_repo=tiny_checkpoint / "voices"
    )
    engine = bot.tts.engine
    assert isinstance(engine, TTSEngine)
    try:
        assert loaded_at_start == [False]
        expected = engine.synthesize(SECOND, SessionOptions(temperature=0.0))
        assert audio_of(bot.recorder.down()) == pcm16(expected.pcm)
        assert not bot.recorder.up(ErrorFrame)
    finally:
        engine.close()
