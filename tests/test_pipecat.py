"""KyutaiTTSService in real Pipecat pipelines, on the tiny random-weight checkpoint (CPU).

The only test double is `ScriptedLLM`, which stands in for an LLM service: it answers each context
with a scripted reply streamed token by token. Aggregators, the TTS base class, the pipeline worker
and runner are Pipecat's own.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
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

from kyutai_tts_plugin.errors import InvalidInputError
from kyutai_tts_plugin.pipecat import KyutaiTTSService
from kyutai_tts_plugin.types import SessionOptions

GREEDY = KyutaiTTSService.Settings(temperature=0.0)


class ScriptedLLM(FrameProcessor):
    """Stands in for an LLM service: answers each context frame with the next scripted reply.

    The reply is pushed from `process_frame`, token by token, like a real LLM service, so an
    interruption cancels it mid-reply.
    """

    def __init__(self, replies: Sequence[Sequence[str]], token_delay_s: float = 0.02) -> None:
        super().__init__()
        self._replies = [list(r) for r in replies]
        self._delay = token_delay_s
        self.token_times: list[list[float]] = []  # monotonic time each token was pushed, per reply

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if not isinstance(frame, LLMContextFrame):
            await self.push_frame(frame, direction)
            return
        tokens = self._replies.pop(0)
        times: list[float] = []
        self.token_times.append(times)
        await self.push_frame(LLMFullResponseStartFrame())
        for token in tokens:
            await asyncio.sleep(self._delay)
            times.append(time.monotonic())
            await self.push_frame(LLMTextFrame(token))
        await self.push_frame(LLMFullResponseEndFrame())


@dataclass
class Pushed:
    frame: Frame
    direction: FrameDirection
    at: float


@dataclass
class Recorder(BaseObserver):
    """Records, in order, every frame the TTS service pushes (both directions)."""

    tts: FrameProcessor | None = None
    pushed: list[Pushed] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

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
        await self.worker.queue_frame(LLMMessagesAppendFrame([{"role": "user", "content": user_text}], run_llm=True))

    async def send(self, frame: Frame) -> None:
        await self.worker.queue_frame(frame)

    def assistant_messages(self) -> list[str]:
        return [m["content"] for m in self.context.get_messages() if m.get("role") == "assistant"]


async def run_bot(
    engine: Any,
    replies: Sequence[Sequence[str]],
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
        await asyncio.wait_for(started.wait(), timeout=10)
        await script(bot)
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


def of_context(frames: Sequence[Frame], context_id: str) -> list[Frame]:
    return [f for f in frames if getattr(f, "context_id", None) == context_id]


# -- streaming from the LLM -----------------------------------------------------------------------

TEXT = "Hello there, friend! It costs 42 dollars, or 3.5 euros. Shall we go now? Yes, we shall go."


async def test_llm_tokens_stream_to_the_engine_as_whole_words(tiny_engine: Any) -> None:
    tokens = tokens_of(TEXT)
    words_seen: list[tuple[int, list[str]]] = []  # (tokens pushed so far, words the engine has)

    async def script(bot: Bot) -> None:
        await bot.say()
        while len(bot.llm.token_times) == 0 or len(bot.llm.token_times[0]) < len(tokens):
            await asyncio.sleep(0.01)
            sessions = [s.session for s in bot.tts._streams.values() if s.session is not None]
            if sessions:
                words_seen.append((len(bot.llm.token_times[0]), sessions[0].words))
        await bot.recorder.wait_for(lambda: bool(bot.recorder.down(LLMFullResponseEndFrame)))

    bot = await run_bot(tiny_engine, [tokens], script, token_delay_s=0.04)
    rec = bot.recorder
    expected = SessionOptions(temperature=0.0)
    reference = tiny_engine.synthesize(TEXT, expected)

    # The engine received whole words while the LLM was still streaming, never a fragment.
    all_words = TEXT.split()
    mid_stream = [(n, w) for n, w in words_seen if 0 < n < len(tokens) and w]
    assert mid_stream, "the engine received no word before the LLM finished"
    for n, words in words_seen:
        assert words == all_words[: len(words)]
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
    kinds = [type(f) for f in down if isinstance(f, (TTSStartedFrame, TTSStoppedFrame, LLMFullResponseEndFrame))]
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
