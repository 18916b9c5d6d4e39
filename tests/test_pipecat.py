"""KyutaiTTSService in real Pipecat pipelines, on the tiny random-weight checkpoint (CPU).

The only test double is `ScriptedLLM`, which stands in for an LLM service: it answers each context
with a scripted reply streamed token by token. Aggregators, the TTS base class, the pipeline worker
and runner are Pipecat's own.

No test depends on how fast the machine is: order in time is asserted in engine steps and in the
order of the frames the TTS pushed, driven by the engine's step observer (`EngineProbe` parks the
engine at an exact step) and by a scripted LLM that waits for pipeline events instead of sleeping.
Every wait is for an event; its deadline (`HANG_GUARD_S`) only turns a hang into a failure. Wall-clock
timeouts that the code under test could lean on (Pipecat's idle timeout of an audio context, the
engine's queue timeout) are made effectively infinite, so that only the right mechanism can pass.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pipecat.clocks.base_clock import BaseClock
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

from kyutai_tts_plugin.engine import EngineStep, SessionStep, TTSEngine
from kyutai_tts_plugin.errors import EngineFailure, InvalidInputError
from kyutai_tts_plugin.pipecat import KyutaiTTSService
from kyutai_tts_plugin.testing import HANG_GUARD_S, StepRecorder
from kyutai_tts_plugin.types import SessionEvent, SessionOptions, TTSSession

GREEDY = KyutaiTTSService.Settings(temperature=0.0)
NEVER_S = 1e6  # a wall-clock timeout no test may rely on ("effectively infinite")


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait until `condition` holds; the deadline is a hang guard, never what a test measures."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANG_GUARD_S
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"waited {HANG_GUARD_S:.0f} s for {what}: it never happened")
        await asyncio.sleep(0.005)


async def guarded(awaitable: Awaitable[Any], what: str) -> Any:
    """Await `awaitable` under the hang guard."""
    try:
        return await asyncio.wait_for(awaitable, timeout=HANG_GUARD_S)
    except TimeoutError:
        raise AssertionError(f"waited {HANG_GUARD_S:.0f} s for {what}: it never happened") from None


def emits_audio(step: SessionStep) -> bool:
    """Whether this step of a session produced an 80 ms audio chunk (the tests use n_q >= 2).

    A chunk is decoded once the delayed acoustic codebooks are generated: from then on, every step of
    the session yields one chunk, emitted before the step observers run.
    """
    return step.audio[0] >= 0 and step.audio[1] >= 0


class EngineProbe:
    """Watches the engine behind the pipeline step by step, and parks it at an exact step.

    `recorder` records every session step; `sessions` lists the engine's session ids in the order
    they first stepped (in remote mode too: the server's sessions run on this engine); `chunks`
    counts each session's audio chunks. `park_at_chunk(k, n)` parks the worker right after the step
    at which the k-th session emits its n-th chunk: that chunk (and every word timing due before it)
    has reached the session, and no later step has run. While parked, cancels, flushes and pushes
    still work (the worker holds no lock there), so a test acts between two exact steps.
    """

    def __init__(self, engine: TTSEngine) -> None:
        self._cv = threading.Condition()
        self.sessions: list[str] = []
        self.chunks: dict[str, int] = {}
        self._park_at: tuple[int, int] | None = None
        self._parked_at: int | None = None
        self._closed = False
        self.recorder = StepRecorder(engine)  # added first: it has seen the step the probe parks after
        self._remove = engine.add_step_observer(self._watch)

    def _watch(self, step: EngineStep) -> None:
        with self._cv:
            for s in step.sessions:
                if s.session_id not in self.chunks:
                    self.sessions.append(s.session_id)
                    self.chunks[s.session_id] = 0
                self.chunks[s.session_id] += emits_audio(s)
            if self._park_at is None or self._closed:
                return
            k, n = self._park_at
            if k < len(self.sessions) and self.chunks[self.sessions[k]] >= n:
                self._park_at = None
                self._parked_at = step.index
                self._cv.notify_all()
                self._cv.wait_for(lambda: self._parked_at is None or self._closed)

    def session(self, k: int) -> str:
        with self._cv:
            assert k < len(self.sessions), f"the engine ran {len(self.sessions)} sessions, not {k + 1}"
            return self.sessions[k]

    def park_at_chunk(self, k: int, n: int) -> None:
        """Park the worker after the step at which the k-th session emits its n-th audio chunk."""
        with self._cv:
            self._park_at = (k, n)

    async def parked(self) -> int:
        """Wait until the worker is parked; the index of the engine step it is parked after."""

        def wait() -> int:
            with self._cv:
                if not self._cv.wait_for(lambda: self._parked_at is not None, timeout=HANG_GUARD_S):
                    raise AssertionError(f"the engine never reached the step to park at {self._park_at}")
                assert self._parked_at is not None
                return self._parked_at

        return await asyncio.to_thread(wait)

    def release(self) -> None:
        """Let the parked worker go on (nothing if it is not parked)."""
        with self._cv:
            self._parked_at = None
            self._cv.notify_all()

    async def run_to_chunk(self, k: int, n: int) -> int:
        """Let the engine run until the k-th session emits its n-th chunk, and park it there."""
        self.park_at_chunk(k, n)
        self.release()
        return await self.parked()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._park_at = None
            self._parked_at = None
            self._cv.notify_all()
        self._remove()
        self.recorder.close()


@pytest.fixture
def probe(tiny_engine: TTSEngine) -> Any:
    engine_probe = EngineProbe(tiny_engine)
    try:
        yield engine_probe
    finally:
        engine_probe.close()  # never leave the shared engine parked behind a failed test


class ManualClock(BaseClock):
    """The pipeline clock, moved only by the test: "playback" time (word PTS, pacing) is in the
    test's hands, never in the machine's speed. It starts at 1 s and stays there until `advance`."""

    def __init__(self) -> None:
        self.now_ns = 1_000_000_000

    def get_time(self) -> int:
        return self.now_ns

    def start(self) -> None:
        pass

    def advance(self, seconds: float) -> None:
        self.now_ns += round(seconds * 1e9)


@dataclass
class Unfinished:
    """A scripted reply whose LLM stops without ending the response (no LLMFullResponseEndFrame)."""

    tokens: list[str]


Hold = Callable[[int, int], Awaitable[None]]


class ScriptedLLM(FrameProcessor):
    """Stands in for an LLM service: answers each context frame with the next scripted reply.

    The reply is pushed from `process_frame`, token by token, like a real LLM service, so an
    interruption cancels it mid-reply. There is no delay between tokens: a test that needs the LLM
    to be still talking passes `hold(reply, token)`, awaited before each token, which waits for the
    pipeline event the test is about. `pushed[r]` counts the tokens of reply r pushed so far.
    """

    def __init__(self, replies: Sequence[Sequence[str] | Unfinished], hold: Hold | None = None) -> None:
        super().__init__()
        self._replies = list(replies)
        self._hold = hold
        self.pushed: list[int] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if not isinstance(frame, LLMContextFrame):
            await self.push_frame(frame, direction)
            return
        reply = self._replies.pop(0)
        tokens = reply.tokens if isinstance(reply, Unfinished) else reply
        index = len(self.pushed)
        self.pushed.append(0)
        await self.push_frame(LLMFullResponseStartFrame())
        for i, token in enumerate(tokens):
            if self._hold is not None:
                await self._hold(index, i)
            await asyncio.sleep(0)  # one token per frame, as a streaming LLM sends them
            await self.push_frame(LLMTextFrame(token))
            self.pushed[index] += 1
        if not isinstance(reply, Unfinished):
            await self.push_frame(LLMFullResponseEndFrame())


@dataclass
class Pushed:
    frame: Frame
    direction: FrameDirection


class Recorder(BaseObserver):
    """Records, in order, every frame the TTS service pushes (both directions)."""

    def __init__(self, tts: FrameProcessor) -> None:
        super().__init__()
        self.tts = tts
        self.pushed: list[Pushed] = []

    async def on_push_frame(self, data: FramePushed) -> None:
        if data.source is self.tts:
            self.pushed.append(Pushed(data.frame, data.direction))

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

    def index(self, kind: type, nth: int = 0, **attrs: Any) -> int:
        """Position in `pushed` of the nth frame of this kind (with these attributes)."""
        found = [
            i
            for i, p in enumerate(self.pushed)
            if isinstance(p.frame, kind) and all(getattr(p.frame, k) == v for k, v in attrs.items())
        ]
        assert len(found) > nth, f"no {kind.__name__} {attrs} number {nth} was pushed"
        return found[nth]

    async def wait_for(self, predicate: Callable[[], bool], what: str = "the pipeline") -> None:
        await until(predicate, what)


@dataclass
class Bot:
    tts: KyutaiTTSService
    llm: ScriptedLLM
    context: LLMContext
    recorder: Recorder
    worker: PipelineWorker
    clock: ManualClock

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
    hold: Callable[[Bot, int, int], Awaitable[None]] | None = None,
    end: Frame | None = None,
    clock: ManualClock | None = None,
    output: FrameProcessor | None = None,
    **tts_kwargs: Any,
) -> Bot:
    """Run user aggregator -> scripted LLM -> Kyutai TTS -> assistant aggregator until `script` ends,
    then send `end` (an EndFrame by default) and wait for the pipeline to finish.

    Pipecat's idle timeout of an audio context (`stop_frame_timeout_s`, 3 s) is made effectively
    infinite unless a test passes one: a slow step must not end a context, and no test may pass
    because a timeout ended what the service should have ended. The pipeline clock is a
    `ManualClock`: it only moves when the test says so. `output` (an output transport) goes right
    after the TTS, as in an agent's pipeline."""
    clock = clock or ManualClock()
    context = LLMContext()
    aggregators = LLMContextAggregatorPair(context)
    bot_ref: list[Bot] = []
    llm_hold: Hold | None = None
    if hold is not None:
        hook = hold

        async def llm_hold(reply: int, token: int) -> None:
            await hook(bot_ref[0], reply, token)

    llm = ScriptedLLM(replies, llm_hold)
    tts_kwargs.setdefault("stop_frame_timeout_s", NEVER_S)
    # No output transport here plays the audio: pacing to the pipeline clock would only slow tests
    # down. The tests of pacing set it.
    tts_kwargs.setdefault("max_lead_s", None)
    tts = KyutaiTTSService(engine=engine, settings=settings, **tts_kwargs)
    recorder = Recorder(tts=tts)
    middle = [tts] if output is None else [tts, output]
    pipeline = Pipeline([aggregators.user(), llm, *middle, aggregators.assistant()])
    worker = PipelineWorker(
        pipeline,
        params=PipelineParams(enable_metrics=True, enable_usage_metrics=True),
        observers=[recorder],
        cancel_on_idle_timeout=False,
        clock=clock,
    )
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def _started(worker: PipelineWorker, frame: Frame) -> None:
        started.set()

    bot = Bot(tts, llm, context, recorder, worker, clock)
    bot_ref.append(bot)

    async def drive() -> None:
        try:
            await guarded(started.wait(), "the pipeline to start")
            await script(bot)
        except BaseException:
            await worker.cancel()  # don't leave the pipeline running behind a failed test
            raise
        await worker.queue_frame(end or EndFrame())

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    running = asyncio.ensure_future(runner.run())
    try:
        await drive()
    except BaseException:
        await guarded(running, "the cancelled pipeline to finish")
        raise
    await guarded(running, f"the pipeline to finish after the {type(end or EndFrame()).__name__}")
    return bot


def tokens_of(text: str, size: int = 3) -> list[str]:
    """Cut text into LLM-like fragments of `size` characters: words split anywhere."""
    return [text[i : i + size] for i in range(0, len(text), size)]


def complete_words(tokens: Sequence[str]) -> list[str]:
    """The words these tokens complete (a word is complete once whitespace follows it)."""
    return re.findall(r"\S+(?=\s)", "".join(tokens))


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
    all_words = TEXT.split()
    words_seen: list[tuple[int, list[str]]] = []  # (tokens pushed so far, words the engine has)
    last_token_at: list[int] = []  # how many frames the TTS had pushed when the last token went out

    def engine_words(bot: Bot) -> list[str] | None:
        # The in-process session shows the words it was given (a remote one does not).
        sessions = [s.session for s in bot.tts._streams.values() if hasattr(s.session, "words")]
        return sessions[0].words if sessions else None

    async def hold(bot: Bot, reply: int, token: int) -> None:
        words = engine_words(bot)
        if words is not None:
            words_seen.append((token, words))
        if token == len(tokens) - 1:
            # The LLM holds back its last token until the TTS has pushed audio: on any machine, the
            # test passes only if audio is produced while the LLM is still talking.
            rec = bot.recorder
            await until(lambda: bool(rec.down(TTSAudioRawFrame)), "audio before the LLM's last token")
            last_token_at.append(len(rec.pushed))
            if backend is tiny_engine:
                # Every word the LLM completed has reached the engine, none held back for later.
                complete = complete_words(tokens[:-1])
                await until(lambda: engine_words(bot) == complete, f"the engine to have the words {complete}")
                words_seen.append((token, complete))

    async def script(bot: Bot) -> None:
        await bot.say()
        await bot.recorder.wait_for(lambda: bool(bot.recorder.down(LLMFullResponseEndFrame)))

    bot = await run_bot(backend, [tokens], script, hold=hold)
    rec = bot.recorder
    expected = SessionOptions(temperature=0.0)
    reference = tiny_engine.synthesize(TEXT, expected)

    # The engine received whole words while the LLM was streaming, never a fragment.
    assert [w for _, w in words_seen if w] or backend is not tiny_engine, "no word before the LLM finished"
    for n, words in words_seen:
        assert words == all_words[: len(words)]
        assert len(words) <= len(complete_words(tokens[:n]))

    # The first audio frame left the TTS before the LLM's last token.
    assert last_token_at and rec.index(TTSAudioRawFrame) < last_token_at[0]

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
    tiny_engine: Any, backend: Any, probe: EngineProbe
) -> None:
    first_tokens = tokens_of(FIRST)
    stall_at = len(first_tokens) - 10  # the LLM is still writing the second sentence when interrupted
    marks: dict[str, int] = {}

    async def hold(bot: Bot, reply: int, token: int) -> None:
        if reply == 0 and token == stall_at:
            # Until the interruption cancels the reply (the event is never set).
            await guarded(asyncio.Event().wait(), "the interruption to cancel the LLM's reply")

    async def script(bot: Bot) -> None:
        rec = bot.recorder
        # Interrupt once words of the unfinished second sentence have been played, with the engine
        # parked between two steps: the interruption must free the slot without any further step.
        probe.park_at_chunk(0, 1)
        await bot.say()
        # The engine goes chunk by chunk, each chunk's frames pushed before the next step.
        chunks = 0
        while len(rec.down(TTSTextFrame)) < 5:
            chunks += 1
            marks["parked_at"] = await probe.run_to_chunk(0, chunks)
            await rec.wait_for(lambda n=chunks: len(rec.down(TTSAudioRawFrame)) >= n, f"audio chunk {chunks}")
        marks["steps"] = probe.recorder.count(probe.session(0))
        await bot.send(InterruptionFrame())
        await rec.wait_for(lambda: bool(rec.down(InterruptionFrame)), "the interruption to pass the TTS")
        if backend is tiny_engine:
            assert tiny_engine.active_sessions == 0  # freed before the interruption went on
        await until(lambda: tiny_engine.active_sessions == 0, "the server to free the slot")
        assert probe.recorder.count(probe.session(0)) == marks["steps"]
        probe.release()
        await bot.say()
        await rec.wait_for(
            lambda: len(rec.down(TTSStoppedFrame)) >= 1 and bool(rec.down(LLMFullResponseEndFrame)),
            "the second turn",
        )

    bot = await run_bot(backend, [first_tokens, tokens_of(SECOND)], script, hold=hold)
    rec = bot.recorder
    first_ctx, second_ctx = contexts_in_order(rec.down())
    interruption = rec.index(InterruptionFrame)
    before = [p.frame for p in rec.pushed[:interruption]]
    after = [p.frame for p in rec.pushed[interruption:]]

    # The cancelled session never stepped again, although the engine went on to speak the next turn
    # (every step of which came after the interruption).
    first, second = probe.session(0), probe.session(1)
    assert probe.recorder.count(first) == marks["steps"]
    assert min(probe.recorder.engine_indices(second)) > marks["parked_at"]
    # Nothing of the interrupted context after the interruption: every audio and word frame after it
    # belongs to the next turn, and there is no stop frame for the interrupted one.
    assert not of_context(after, first_ctx)
    assert all(f.context_id == second_ctx for f in after if isinstance(f, (TTSAudioRawFrame, TTSTextFrame)))

    # The context holds exactly the words that were played, including those of the unfinished sentence
    # (which the LLM was still writing: it had sent `stall_at` tokens and never sent more).
    assert bot.llm.pushed[0] == stall_at < len(first_tokens)
    heard = [f for f in before if isinstance(f, TTSTextFrame)]
    played_s = len([f for f in before if isinstance(f, TTSAudioRawFrame)]) * 0.08
    assert len(heard) >= 5 and heard[2].text == "This"
    for w in heard:
        assert (w.pts - heard[0].pts) / 1e9 <= played_s  # its audio had started when it was reported
    heard_text = " ".join(w.text for w in heard)
    assert FIRST.startswith(heard_text)
    assert bot.assistant_messages()[0] == heard_text

    # The next turn starts clean: its own context, exactly its one-shot audio, the whole text.
    assert second_ctx != first_ctx
    reference = tiny_engine.synthesize(SECOND, SessionOptions(temperature=0.0))
    assert audio_of(of_context(after, second_ctx)) == pcm16(reference.pcm)
    assert bot.assistant_messages() == [heard_text, SECOND]
    assert tiny_engine.active_sessions == 0
    assert not rec.up(ErrorFrame)


async def test_interruption_before_any_audio_and_between_flush_and_drain(
    tiny_engine: Any, probe: EngineProbe
) -> None:
    first_tokens = tokens_of(FIRST)
    # The first reply stalls before the token that completes its second word: the engine has one word,
    # too few to take a single step (it looks two words ahead), so it cannot have made any audio.
    stall_at = next(n for n in range(len(first_tokens)) if len(complete_words(first_tokens[: n + 1])) == 2)
    marks: dict[str, int] = {}

    async def hold(bot: Bot, reply: int, token: int) -> None:
        if reply == 0 and token == stall_at:
            # Until the interruption cancels the reply (the event is never set).
            await guarded(asyncio.Event().wait(), "the interruption to cancel the LLM's reply")

    async def interrupt(bot: Bot, nth: int) -> None:
        rec = bot.recorder
        await bot.send(InterruptionFrame())
        await rec.wait_for(lambda: len(rec.down(InterruptionFrame)) == nth, f"interruption {nth}")
        assert tiny_engine.active_sessions == 0  # freed before the interruption went on

    async def script(bot: Bot) -> None:
        rec = bot.recorder
        # 1. Interrupted after its first word reached the engine, before any audio.
        await bot.say()
        await rec.wait_for(
            lambda: (
                [s.session.words for s in bot.tts._streams.values()] == [["Hello"]]
                and bool(rec.down(TTSStartedFrame))
            ),
            "the first word to reach the engine",
        )
        await interrupt(bot, 1)
        assert not rec.down(TTSAudioRawFrame)
        # 2. Interrupted after the LLM finished, while the engine still speaks the rest: parked right
        # after the step that produced the second reply's first audio.
        probe.park_at_chunk(0, 1)
        await bot.say()
        marks["parked_at"] = await probe.parked()
        await rec.wait_for(lambda: bool(rec.down(TTSAudioRawFrame)), "the second reply's first audio")
        (stream,) = bot.tts._streams.values()
        assert stream.flushed and not stream.done
        marks["second_steps"] = probe.recorder.count(probe.session(0))
        await interrupt(bot, 2)
        assert probe.recorder.count(probe.session(0)) == marks["second_steps"]
        probe.release()
        await bot.say()
        await rec.wait_for(lambda: len(rec.down(TTSStoppedFrame)) >= 1, "the third reply")

    bot = await run_bot(
        tiny_engine, [first_tokens, tokens_of(SECOND, 1), tokens_of(SECOND)], script, hold=hold
    )
    rec = bot.recorder
    first_ctx, second_ctx, last_ctx = contexts_in_order(rec.down())
    # The first session never stepped; the second never stepped again while the engine spoke the
    # third reply, every step of which came after the interruption.
    assert bot.llm.pushed[0] == stall_at
    second, third = probe.sessions
    assert probe.recorder.count(second) == marks["second_steps"]
    assert min(probe.recorder.engine_indices(third)) > marks["parked_at"]
    # Only the last turn completed; the two interrupted ones pushed no stop frame, and nothing of them
    # came after their interruption.
    assert [f.context_id for f in rec.down(TTSStoppedFrame)] == [last_ctx]
    assert not of_context([p.frame for p in rec.pushed[rec.index(InterruptionFrame, 0) :]], first_ctx)
    assert not of_context([p.frame for p in rec.pushed[rec.index(InterruptionFrame, 1) :]], second_ctx)
    assert not audio_of(of_context(rec.down(), first_ctx))
    assert len(audio_of(of_context(rec.down(), second_ctx))) == 3840  # the one chunk before the park
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
    bot = await run_bot(tiny_engine, replies, script)
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
    assert "temperature=-1 is out of range" in errors[0] and "previous settings stay" in errors[0]
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


async def test_end_frame_mid_utterance_finishes_promptly(tiny_engine: Any, probe: EngineProbe) -> None:
    text = "Let me think about that for a sec"

    async def script(bot: Bot) -> None:
        await bot.say()
        n = len(tokens_of(text))
        await bot.recorder.wait_for(lambda: bot.llm.pushed == [n], "the LLM's last token")

    # The LLM never ends its response, and Pipecat's idle timeout of the context is effectively
    # infinite (run_bot): only the EndFrame flushing the open session can end the turn, and the
    # pipeline must finish within the hang guard.
    bot = await run_bot(tiny_engine, [Unfinished(tokens_of(text))], script)
    rec = bot.recorder
    assert [type(f) for f in rec.down(TTSStartedFrame, TTSStoppedFrame, EndFrame)] == [
        TTSStartedFrame,
        TTSStoppedFrame,
        EndFrame,
    ]
    # The last word ("sec", which no whitespace ended) is spoken too, in exactly the steps of the
    # one-shot synthesis of that text.
    spoken = text
    (session,) = probe.sessions
    steps = probe.recorder.count(session)
    expected = tiny_engine.synthesize(spoken, SessionOptions(temperature=0.0))
    assert audio_of(rec.down()) == pcm16(expected.pcm)
    assert steps == probe.recorder.count(probe.session(1))
    assert tiny_engine.active_sessions == 0 and not bot.tts._streams


async def test_cancel_frame_mid_utterance_stops_at_once(tiny_engine: Any, probe: EngineProbe) -> None:
    marks: dict[str, int] = {}

    async def script(bot: Bot) -> None:
        # The engine is parked right after the step that made the third audio chunk; the CancelFrame
        # follows. The pipeline must finish while the engine stays parked: the cancel waits for no
        # engine step.
        probe.park_at_chunk(0, 3)
        await bot.say()
        marks["parked_at"] = await probe.parked()
        await bot.recorder.wait_for(lambda: len(bot.recorder.down(TTSAudioRawFrame)) == 3, "3 audio frames")
        marks["steps"] = probe.recorder.count(probe.session(0))

    try:
        bot = await run_bot(tiny_engine, [tokens_of(FIRST)], script, end=CancelFrame())
        # Still parked: the slot was freed by the cancel itself.
        assert tiny_engine.active_sessions == 0
    finally:
        probe.release()
    rec = bot.recorder
    cancel_index = rec.index(CancelFrame)
    assert not [p for p in rec.pushed[cancel_index:] if isinstance(p.frame, (TTSAudioRawFrame, TTSTextFrame))]
    assert not rec.down(TTSStoppedFrame)
    assert not bot.tts._streams
    # The engine went on (a new utterance, every step of it after the park); the cancelled session
    # never stepped again.
    tiny_engine.synthesize("One more.", SessionOptions(temperature=0.0))
    cancelled, later = probe.sessions
    assert probe.recorder.count(cancelled) == marks["steps"]
    assert min(probe.recorder.engine_indices(later)) > marks["parked_at"]


# -- errors ---------------------------------------------------------------------------------------


async def test_engine_full_is_an_error_frame_and_the_pipeline_keeps_going(
    tiny_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Take every slot and every place in the wait queue; none of the waiting ones may time out and
    # make room, however slow the run.
    monkeypatch.setattr(tiny_engine, "queue_timeout_s", math.inf)
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


async def test_the_model_loads_in_the_background_without_delaying_the_pipeline(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kyutai_tts_plugin.engine as engine_module
    from kyutai_tts_plugin.engine import TTSEngine

    # The model load is held until the test lets it go: the pipeline must start, and the first
    # utterance begin, while the model is still loading, however fast the load would be.
    may_load = threading.Event()
    load = engine_module.shared_engine

    def held_load(*args: Any, **kwargs: Any) -> TTSEngine:
        if not may_load.wait(timeout=HANG_GUARD_S):
            raise AssertionError("the test never let the model load")
        return load(*args, **kwargs)

    monkeypatch.setattr(engine_module, "shared_engine", held_load)
    loaded_at_start: list[bool] = []

    async def script(bot: Bot) -> None:
        loaded_at_start.append(bot.tts.engine is not None)
        await bot.say()
        # The utterance has started (its context is open, text reached the service) and waits.
        await bot.recorder.wait_for(lambda: bool(bot.recorder.down(TTSStartedFrame)), "the utterance")
        loaded_at_start.append(bot.tts.engine is not None)
        may_load.set()
        await bot.recorder.wait_for(lambda: len(bot.recorder.down(TTSStoppedFrame)) == 1, "the utterance")

    try:
        bot = await run_bot(
            None, [tokens_of(SECOND)], script, model=tiny_checkpoint, voice_repo=tiny_checkpoint / "voices"
        )
    finally:
        may_load.set()
    engine = bot.tts.engine
    assert isinstance(engine, TTSEngine)
    try:
        assert loaded_at_start == [False, False]
        expected = engine.synthesize(SECOND, SessionOptions(temperature=0.0))
        assert audio_of(bot.recorder.down()) == pcm16(expected.pcm)
        assert not bot.recorder.up(ErrorFrame)
    finally:
        engine.close()
