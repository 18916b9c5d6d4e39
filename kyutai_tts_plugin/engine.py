"""The in-process engine: one model on one device, many streaming sessions stepped in one batch.

A single worker thread owns the device. Each open session holds a *slot* (a row of every cache);
at each iteration the worker steps every session that has enough text (3 pending words, or flushed)
and whose consumer keeps up, in one batched forward pass. Sessions join and leave at any step.
Callers never block on the model: ``push_text``/``flush``/``cancel`` only queue work for the worker.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import os
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import dsm
from .checkpoint import (
    DEFAULT_MODEL_REPO,
    DEFAULT_VOICE,
    DEFAULT_VOICE_REPO,
    VoiceLibrary,
    load_safetensors,
    load_voice_embedding,
    resolve_checkpoint,
)
from .errors import (
    EngineFailure,
    EngineFullError,
    EngineTimeoutError,
    InvalidInputError,
    SessionClosedError,
)
from .generator import Generator, SlotSettings
from .hardware import resolve_device, resolve_dtype
from .lm import LMModel, LMShape, Rows, load_lm, quantize_int8
from .mimi import MimiConfig, MimiModel
from .text import RawWord, TextTokenizer, WordChunker, normalize_word_text
from .types import (
    FRAME_DURATION_S,
    FRAME_SIZE,
    SAMPLE_RATE,
    AudioChunk,
    SessionEvent,
    SessionOptions,
    WordTiming,
)

logger = logging.getLogger(__name__)

REAL_TIME_CHECK_STEPS = 25  # 2 s of steps: enough to tell a slow engine from one slow step
FINAL_PADDING = 4  # steps generated after the end of speech, as in the reference


@dataclass
class Synthesis:
    """The result of a one-shot synthesis."""

    pcm: np.ndarray  # float32 mono at `sample_rate`
    sample_rate: int
    words: list[WordTiming]


@dataclass(frozen=True)
class SessionStep:
    """What one session did at one engine step."""

    session_id: str
    step: int  # the session's own step index (0 at its first step)
    sampled_text: int  # the text action the model sampled
    fed_text: int  # the (muxed) text token the state machine fed back
    audio: tuple[int, ...]  # one token per checkpoint codebook; -1 where none was generated
    dsm_state: dsm.DSMState  # live: read it once the session has ended


@dataclass(frozen=True)
class EngineStep:
    """One batched forward pass of the engine, as seen by step observers."""

    index: int  # counts the engine's steps from 0
    sessions: tuple[SessionStep, ...]


StepObserver = Callable[[EngineStep], None]


class StreamingSession:
    """One streamed utterance. See `kyutai_tts_plugin.types.TTSSession` for the contract."""

    _ids = itertools.count()

    def __init__(self, engine: TTSEngine, options: SessionOptions, voices: list[str]) -> None:
        self._engine = engine
        self.options = options
        self._id = f"kyutai-{next(self._ids)}"
        self._voices = voices
        self._chunker = WordChunker()
        self._words: list[str] = []
        self._inbox: list[tuple[dsm.Entry | None, str]] = []  # (entry or None for text-only, raw text)
        self._turn = 0
        self._turn_has_word = False
        self._flushed = False
        self._cancelled = False
        self._finished = False
        self._error: BaseException | None = None
        self._events: deque[SessionEvent] = deque()
        self._cv = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self.queued_at = time.monotonic()
        self.run: _SlotRun | None = None
        # Unread events beyond which this session is not stepped (None: the engine's setting), so
        # a reader that paces itself (an adapter following playback) also paces the engine.
        self.max_buffered_frames: int | None = None

    # -- the public contract ------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self._id

    @property
    def words(self) -> list[str]:
        """The whole words received so far (a word is complete once whitespace follows it)."""
        with self._engine._cv:
            return list(self._words)

    @property
    def is_finished(self) -> bool:
        return self._finished

    def push_text(self, fragment: str) -> None:
        """Append raw text, split anywhere (LLM token fragments)."""
        if not isinstance(fragment, str):
            raise InvalidInputError(f"push_text expects a str, got {type(fragment).__name__}")
        with self._engine._cv:
            self._check_open("push_text")
            self._add_units(self._chunker.push(fragment))
            self._engine._cv.notify_all()

    def next_turn(self) -> None:
        """Dialog: the text pushed from now on is spoken by the other speaker."""
        with self._engine._cv:
            self._check_open("next_turn")
            self._add_units(self._chunker.finish())
            self._chunker = WordChunker()
            self._turn += 1
            self._turn_has_word = False

    def flush(self) -> None:
        """The text is complete: speak the rest (without clipping the last word), then end."""
        with self._engine._cv:
            if self._cancelled or self._flushed:
                return
            self._add_units(self._chunker.finish())
            self._flushed = True
            self._engine._cv.notify_all()

    def cancel(self) -> None:
        """Stop now. Pending audio is dropped, the stream ends and the slot is freed within one step."""
        with self._engine._cv:
            if self._finished:
                return
            self._cancelled = True
            # The worker reuses a slot only from its next iteration, so releasing now is safe.
            self._engine._release(self)
            self._engine._cv.notify_all()
        with self._cv:
            self._events.clear()
        self._end()

    def __iter__(self) -> Iterator[SessionEvent]:
        while True:
            with self._cv:
                while not self._events and not self._finished:
                    self._cv.wait()
                if self._events:
                    event = self._events.popleft()
                else:
                    break
            self._engine._wake()
            yield event
        if self._error is not None:
            raise self._error

    async def __aiter__(self) -> AsyncIterator[SessionEvent]:  # type: ignore[override]
        loop = asyncio.get_running_loop()
        while True:
            with self._cv:
                if self._events:
                    event: SessionEvent | None = self._events.popleft()
                elif self._finished:
                    event = None
                else:
                    fut: asyncio.Future[None] = loop.create_future()
                    self._waiters.append((loop, fut))
                    event = None
            if event is not None:
                if self.max_buffered_frames is not None:
                    with self._engine._cv:
                        self._engine._cv.notify_all()  # room in the buffer: this session may step
                else:
                    self._engine._wake()
                yield event
                continue
            if self._finished and not self._events:
                break
            await fut
        if self._error is not None:
            raise self._error

    # -- internals ----------------------------------------------------------------------------

    def _check_open(self, what: str) -> None:
        if self._cancelled:
            raise SessionClosedError(
                f"{what}: session {self._id} was cancelled; open a new session for new text"
            )
        if self._flushed:
            raise SessionClosedError(
                f"{what}: session {self._id} was flushed; open a new session for new text"
            )

    def _add_units(self, units: Sequence[RawWord]) -> None:
        engine = self._engine
        for unit in units:
            if unit.break_s is not None:
                steps = int(round(unit.break_s * engine.frame_rate))
                self._inbox.append((dsm.Entry((), "", steps), unit.text))
                continue
            pieces = normalize_word_text(unit.word).split()
            raw = unit.text
            if not pieces:
                self._inbox.append((None, raw))
            for piece in pieces:
                tokens = engine.tokenizer.encode_word(piece)
                if not tokens:
                    self._inbox.append((None, raw))  # nothing speakable: keep the text for timings
                else:
                    if engine.multi_speaker and not self._turn_has_word:
                        marker = dsm.MAIN_SPEAKER if self._turn % 2 == 0 else dsm.OTHER_SPEAKER
                        tokens = [marker, *tokens]
                    self._turn_has_word = True
                    padding = max(0, engine.padding_between + len(tokens) - 1)
                    self._inbox.append((dsm.Entry(tuple(tokens), piece, padding), raw))
                    self._words.append(piece)
                raw = ""

    def _emit(self, events: Sequence[SessionEvent]) -> None:
        if not events:
            return
        with self._cv:
            if self._cancelled:
                return
            self._events.extend(events)
            self._notify()

    def _end(self, error: BaseException | None = None) -> None:
        with self._cv:
            if self._finished:
                return
            self._error = error
            self._finished = True
            self._notify()

    def _notify(self) -> None:
        self._cv.notify_all()
        waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, fut)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass

    def _buffered(self) -> int:
        with self._cv:
            return len(self._events)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


@dataclass
class _SlotRun:
    """The worker-side state of a session holding a slot."""

    row: int
    dsm_state: dsm.DSMState
    settings: SlotSettings
    voice_key: tuple[str, ...]
    step: int = 0
    raw_texts: deque[str] = field(default_factory=deque)  # raw text of each entry not yet timed
    pending_raw: str = ""
    words_timed: int = 0
    entries_with_tokens_pending: int = 0
    compute_s: float = 0.0  # wall time of the engine steps this session took part in
    warned_slow: bool = False


class TTSEngine:
    """Kyutai DSM-TTS loaded in this process. Thread-safe; one worker thread steps all sessions."""

    def __init__(
        self,
        model: LMModel,
        mimi: MimiModel,
        tokenizer: TextTokenizer,
        voices: VoiceLibrary,
        tts_config: dict[str, Any],
        *,
        device: torch.device,
        default_voice: str = DEFAULT_VOICE,
        max_sessions: int = 8,
        max_waiting: int = 16,
        queue_timeout_s: float = 30.0,
        max_buffered_s: float | None = None,
        interleave_text_only: int = 2,
        max_speakers: int = 5,
    ) -> None:
        if max_sessions < 1:
            raise InvalidInputError("max_sessions must be at least 1")
        self.model = model
        self.mimi = mimi
        self.tokenizer = tokenizer
        self.voices = voices
        self.device = device
        self.default_voice = default_voice
        self.max_sessions = max_sessions
        self.max_waiting = max_waiting
        self.queue_timeout_s = queue_timeout_s
        self.max_buffered_frames = (
            None if max_buffered_s is None else max(1, int(max_buffered_s / FRAME_DURATION_S))
        )
        self.interleave_text_only = interleave_text_only
        self.max_speakers = max_speakers
        self.frame_rate = mimi.frame_rate
        self.delay_steps = int(float(tts_config.get("audio_delay", 1.28)) * self.frame_rate)
        self.padding_between = 1
        shape = model.shape
        self.machine = dsm.StateMachine(
            text_card=shape.text_card + 1,
            second_stream_ahead=int(tts_config.get("second_stream_ahead", 0)),
        )
        self.multi_speaker = "speaker_wavs" in shape.conditioners
        self._max_delay = max(shape.delays)
        self.generator = Generator(model, mimi, max_sessions, device, self.delay_steps)
        self._cross_cache: dict[tuple[str, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._cv = threading.Condition()
        self._slots: list[StreamingSession | None] = [None] * max_sessions
        self._waiting: deque[StreamingSession] = deque()
        self._closed = False
        self._observers: list[StepObserver] = []
        self._clock: Callable[[], float] = time.perf_counter  # tests drive it
        self._step_index = 0
        self._worker = threading.Thread(target=self._loop, name="kyutai-tts-engine", daemon=True)
        self._worker.start()
        _open_engines.add(self)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike[str] = DEFAULT_MODEL_REPO,
        *,
        voice_repo: str | os.PathLike[str] = DEFAULT_VOICE_REPO,
        default_voice: str = DEFAULT_VOICE,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        revision: str | None = None,
        num_threads: int | None = None,
        quantize: str | None = None,
        **kwargs: Any,
    ) -> TTSEngine:
        """Load a checkpoint (Hugging Face repo id or local directory) and start the engine.

        `quantize="int8"` stores the large projections as int8 (opt-in CPU speed mode, not bit-exact;
        best with `dtype="bfloat16"`). `num_threads` sets torch's CPU thread count.
        """
        if quantize not in (None, "int8"):
            raise InvalidInputError(f"quantize={quantize!r} is not supported; use None or 'int8'")
        torch_dtype = resolve_dtype(dtype)
        dev = resolve_device(device)
        if num_threads is not None:
            if not isinstance(num_threads, int) or isinstance(num_threads, bool) or num_threads < 1:
                raise InvalidInputError(f"num_threads={num_threads!r}: use a whole number >= 1")
            torch.set_num_threads(num_threads)
        files = resolve_checkpoint(model, revision=revision)
        raw = files.config.raw
        with torch.device("meta"):
            lm = LMModel(LMShape.from_config(raw))
        lm = load_lm(lm, load_safetensors(files.lm_path), str(files.lm_path), torch_dtype, dev)
        if quantize == "int8":
            quantize_int8(lm)
        mimi_config = MimiConfig.from_dict(files.mimi_config) if files.mimi_config else None
        mimi = MimiModel.from_safetensors(files.mimi_path, mimi_config, device=dev)
        tokenizer = TextTokenizer.from_file(files.tokenizer_path)
        voices = VoiceLibrary(voice_repo, suffix=files.config.voice_suffix)
        tts_config = dict(raw.get("tts_config") or {})
        engine = cls(
            lm,
            mimi,
            tokenizer,
            voices,
            tts_config,
            device=dev,
            default_voice=default_voice,
            max_speakers=int(tts_config.get("max_speakers", 5)),
            **kwargs,
        )
        return engine

    @property
    def sample_rate(self) -> int:
        return SAMPLE_RATE

    @property
    def frame_size(self) -> int:
        return FRAME_SIZE

    def list_voices(self) -> list[str]:
        return self.voices.list()

    @property
    def active_sessions(self) -> int:
        """Sessions holding a slot or waiting for one."""
        with self._cv:
            return sum(s is not None for s in self._slots) + len(self._waiting)

    # -- sessions -----------------------------------------------------------------------------

    def open_session(self, options: SessionOptions | None = None, **overrides: Any) -> StreamingSession:
        """Open a streaming session; never blocks. See `SessionOptions` for the settings."""
        options = replace(options or SessionOptions(), **overrides)
        self._validate(options)
        voices = [options.voice or self.default_voice]
        if options.other_voice is not None:
            voices.append(options.other_voice)
        for v in voices:
            self.voices.resolve(v)  # raises VoiceNotFoundError with close matches
        session = StreamingSession(self, options, voices)
        with self._cv:
            if self._closed:
                raise EngineFailure("the engine is closed; create a new TTSEngine")
            # Admission is asynchronous (the worker moves sessions into slots), so count both.
            taken = sum(s is not None for s in self._slots) + len(self._waiting)
            if taken >= self.max_sessions + self.max_waiting:
                raise EngineFullError(
                    f"engine full: {self.max_sessions} sessions are speaking and {self.max_waiting} are "
                    "waiting; retry later, or raise max_sessions / max_waiting when creating the engine"
                )
            self._waiting.append(session)
            self._cv.notify_all()
        return session

    def synthesize(
        self,
        text: str,
        options: SessionOptions | None = None,
        on_chunk: Callable[[AudioChunk], None] | None = None,
    ) -> Synthesis:
        """Whole text in, whole audio and word timings out (blocks until done)."""
        session = self.open_session(options)
        session.push_text(text)
        session.flush()
        return _collect(session, on_chunk)

    def synthesize_dialog(self, turns: Sequence[str], options: SessionOptions | None = None) -> Synthesis:
        """Two-speaker dialog: turns alternate between `options.voice` and `options.other_voice`."""
        session = self.open_session(options)
        for i, turn in enumerate(turns):
            if i:
                session.next_turn()
            session.push_text(turn)
        session.flush()
        return _collect(session, None)

    def close(self) -> None:
        """Stop the worker thread; open sessions end with `EngineFailure`. Idempotent."""
        with self._cv:
            self._closed = True
            sessions = [s for s in self._slots if s is not None] + list(self._waiting)
            self._cv.notify_all()
        for s in sessions:
            s._end(EngineFailure("the engine was closed"))
        self._worker.join(timeout=10)

    def add_step_observer(self, observer: StepObserver) -> Callable[[], None]:
        """Call `observer` on the worker thread after every engine step; returns a function that removes it.

        For tests and benchmarks: the engine waits while an observer runs, so an observer that blocks
        holds the engine between two steps (this is how tests drive it step by step). Without
        observers the engine builds no step records.
        """
        with self._cv:
            self._observers.append(observer)

        def remove() -> None:
            with self._cv:
                if observer in self._observers:
                    self._observers.remove(observer)

        return remove

    def _validate(self, o: SessionOptions) -> None:
        shape = self.model.shape  # the one shared check (types.py), with this checkpoint's bounds
        bounds = {"n_q_max": shape.dep_q, "audio_vocab": shape.card, "text_vocab": shape.text_card}
        o.validate(cfg_values=self.model.cfg_values(), **bounds)

    def _wake(self) -> None:
        if self.max_buffered_frames is not None:
            with self._cv:
                self._cv.notify_all()

    # -- the worker ---------------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                if self._closed:
                    return
                self._admit()
                ready = [s for s in self._slots if s is not None and self._ready(s)]
                if not ready:
                    self._cv.wait(timeout=0.05 if self._waiting or self.max_buffered_frames else None)
                    continue
            try:
                self._iteration(ready)
            except Exception as exc:  # a bug or device error: fail these sessions, keep serving others
                logger.exception("engine step failed")
                with self._cv:
                    for s in ready:
                        self._release(s)
                for s in ready:
                    s._end(EngineFailure(f"the engine failed while stepping: {exc!r}"))

    def _admit(self) -> None:
        """Move waiting sessions into free slots, expire those that waited too long, drop cancelled."""
        now = time.monotonic()
        for s in [*self._slots, *self._waiting]:
            if s is not None and s._flushed and not s._words and not s._finished:
                s._end()  # nothing speakable (empty, whitespace, emoji): no audio, clean end
        for s in self._slots:
            if s is not None and (s._cancelled or s._finished):
                self._release(s)
        still: deque[StreamingSession] = deque()
        for s in self._waiting:
            if s._cancelled or s._finished:
                continue
            free = next((i for i, x in enumerate(self._slots) if x is None), None)
            if free is None:
                if now - s.queued_at > self.queue_timeout_s:
                    s._end(
                        EngineTimeoutError(
                            f"waited {self.queue_timeout_s:.0f} s for a free engine slot; the engine is "
                            "overloaded: retry, or raise max_sessions / queue_timeout_s"
                        )
                    )
                else:
                    still.append(s)
                continue
            self._slots[free] = s
            s.run = self._start_run(s, free)
        self._waiting = still
        for s in self._slots:
            if s is not None and s.run is not None:
                self._take_inbox(s)

    def _start_run(self, s: StreamingSession, row: int) -> _SlotRun:
        o = s.options
        settings = SlotSettings(
            temperature=o.temperature,
            top_k=o.top_k,
            temperature_text=o.temperature,
            top_k_text=o.top_k_text,
            n_q=o.n_q,
            padding_bonus=o.padding_bonus,
            seed=o.seed if o.seed is not None else random.randrange(2**63),
        )
        cond_sum = self.model.condition_sum(o.cfg_coef if self.model.cfg_values() else None)
        self.generator.join(row, settings, cond_sum.to(self.device))
        return _SlotRun(
            row=row, dsm_state=self.machine.new_state(), settings=settings, voice_key=tuple(s._voices)
        )

    def _take_inbox(self, s: StreamingSession) -> None:
        run = s.run
        assert run is not None
        for entry, raw in s._inbox:
            if entry is None or not entry.tokens:
                run.pending_raw += raw
                if entry is not None:
                    run.dsm_state.entries.append(entry)
                continue
            run.dsm_state.entries.append(entry)
            run.raw_texts.append(run.pending_raw + raw)
            run.pending_raw = ""
        s._inbox.clear()

    def _ready(self, s: StreamingSession) -> bool:
        run = s.run
        if run is None or s._cancelled or s._finished:
            return False
        limit = s.max_buffered_frames if s.max_buffered_frames is not None else self.max_buffered_frames
        if limit is not None and s._buffered() >= limit:
            return False
        if s._flushed:
            return True
        entries = run.dsm_state.entries
        if entries and not entries[0].tokens:
            return True  # a pause: no lookahead needed to consume it
        # The machine may pop the next word and needs the tokens of the word two further.
        with_tokens = sum(1 for e in entries if e.tokens)
        return with_tokens > self.machine.second_stream_ahead

    def _release(self, s: StreamingSession) -> None:
        for i, x in enumerate(self._slots):
            if x is s:
                self._slots[i] = None
        if s in self._waiting:
            self._waiting.remove(s)

    def _iteration(self, ready: list[StreamingSession]) -> None:
        # Sessions still in their text-only phase get extra cheap backbone-only steps first, so
        # their first audio comes sooner (as Kyutai's server does).
        for _ in range(self.interleave_text_only):
            early = [
                s
                for s in ready
                if s.run is not None
                and s.run.step < self.delay_steps - 1
                and not s._cancelled
                and self._ready(s)
            ]
            if not early or len(early) == len(ready):
                break
            self._step(early)
        self._step([s for s in ready if not s._cancelled and self._ready(s)])

    def _voice_kv(self, key: tuple[str, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        kv = self._cross_cache.get(key)
        if kv is None:
            dim = self.model.shape.conditioners["speaker_wavs"]["tensor"]["dim"]
            embeddings = [load_voice_embedding(self.voices.resolve(v), dim) for v in key]
            memory = self.model.speaker_memory(embeddings, self.max_speakers)
            kv = self._cross_cache[key] = self.model.cross_kv(memory)
        return kv

    def _step(self, sessions: list[StreamingSession]) -> None:
        if not sessions:
            return
        started = self._clock()
        runs = [s.run for s in sessions]
        assert all(r is not None for r in runs)
        runs_: list[_SlotRun] = runs  # type: ignore[assignment]
        dev = self.device
        rows = Rows.of([r.row for r in runs_], dev)
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, r in enumerate(runs_):
            groups.setdefault(r.voice_key, []).append(i)
        cross = [(self._voice_kv(k), torch.tensor(m, device=dev)) for k, m in groups.items()]
        sampled_all = self.generator.text_step(
            rows,
            [r.step for r in runs_],
            cross,
            _max_top_k([r.settings for r in runs_], text=True, vocab=self.model.shape.text_card),
        )
        fed = [self.machine.process(r.step, r.dsm_state, t) for r, t in zip(runs_, sampled_all, strict=True)]

        deep = [i for i, r in enumerate(runs_) if r.step >= self.delay_steps]
        # Frame t - max_delay is complete now: its semantic token is from then, acoustic from now.
        decode = [i for i in deep if runs_[i].step - self._max_delay >= self.delay_steps]
        audio_np, pcm_np = self.generator.audio_step(
            fed,
            deep,
            max((runs_[i].settings.n_q for i in deep), default=0),
            _max_top_k([runs_[i].settings for i in deep], text=False, vocab=self.model.shape.card),
            decode,
            [runs_[i].row for i in decode],
        )
        audio_host = audio_np.tolist()
        chunks: dict[int, AudioChunk] = {}
        for j, i in enumerate(decode):
            index = runs_[i].step - self._max_delay - self.delay_steps
            chunks[i] = AudioChunk(pcm_np[j], index * FRAME_DURATION_S)

        observed: list[SessionStep] = []
        for i, (s, r) in enumerate(zip(sessions, runs_, strict=True)):
            if self._observers:
                observed.append(
                    SessionStep(s.id, r.step, sampled_all[i], fed[i], tuple(audio_host[i]), r.dsm_state)
                )
            r.step += 1

        for i, (s, r) in enumerate(zip(sessions, runs_, strict=True)):
            events: list[SessionEvent] = []
            chunk = chunks.get(i)
            events.extend(self._word_timings(r, s, chunk))
            if chunk is not None:
                events.append(chunk)
            s._emit(events)
            end = r.dsm_state.end_step
            if end is not None and r.step >= end + self.delay_steps + FINAL_PADDING + self._max_delay:
                s._emit(self._word_timings(r, s, None, final=True))
                with self._cv:
                    self._release(s)
                s._end()

        self._check_real_time(sessions, self._clock() - started)
        index, self._step_index = self._step_index, self._step_index + 1
        if observed:
            step = EngineStep(index, tuple(observed))
            for observer in list(self._observers):
                try:
                    observer(step)
                except Exception:  # an observer's bug must not fail the sessions it watches
                    logger.exception("step observer %r failed", observer)

    def _check_real_time(self, sessions: list[StreamingSession], step_s: float) -> None:
        """Say once per session, in the log, when the engine makes its audio slower than it plays."""
        for s in sessions:
            r = s.run
            if r is None or r.warned_slow:
                continue
            r.compute_s += step_s
            if r.step >= REAL_TIME_CHECK_STEPS and r.compute_s > r.step * FRAME_DURATION_S:
                r.warned_slow = True
                rate = r.step * FRAME_DURATION_S / r.compute_s
                logger.warning(
                    "session %s is generated slower than real time (%.2fx: %.1f s of audio took %.1f s); "
                    "its listener will hear gaps. Use a GPU (device='cuda', dtype='bfloat16'); on a CPU, "
                    "dtype='bfloat16', fewer codebooks (n_q=8) or quantize='int8' are faster, or serve "
                    "fewer sessions at once",
                    s.id,
                    rate,
                    r.step * FRAME_DURATION_S,
                    r.compute_s,
                )

    def _word_timings(
        self, r: _SlotRun, s: StreamingSession, chunk: AudioChunk | None, final: bool = False
    ) -> list[WordTiming]:
        """Word timings due before `chunk`: every word starting at or before it whose end is known."""
        st = r.dsm_state
        out: list[WordTiming] = []
        limit = float("inf") if final else (chunk.start_s + FRAME_DURATION_S / 2 if chunk else -1.0)
        while r.words_timed < len(st.transcript):
            word, step = st.transcript[r.words_timed]
            start = step * FRAME_DURATION_S
            if start > limit:
                break
            if r.words_timed + 1 < len(st.transcript):
                end_step = st.transcript[r.words_timed + 1][1]
            elif st.end_step is not None:
                end_step = st.end_step
            else:
                break
            text = r.raw_texts.popleft() if r.raw_texts else ""
            if st.end_step is not None and r.words_timed + 1 == len(st.transcript):
                # The last word (no word follows once the end is known; the text was flushed, so
                # its tail is in pending_raw): trailing whitespace / unspoken characters go with it.
                text += r.pending_raw
                r.pending_raw = ""
            out.append(WordTiming(word, start, end_step * FRAME_DURATION_S, text))
            r.words_timed += 1
        return out


def _max_top_k(settings: Sequence[SlotSettings], text: bool, vocab: int) -> int:
    """The largest effective top-k among the sampled rows (the whole vocabulary for top-k 0)."""
    best = 1
    for st in settings:
        k = st.top_k_text if text else st.top_k
        t = st.temperature_text if text else st.temperature
        if t > 0:
            best = max(best, vocab if k <= 0 else min(k, vocab))
    return best


def _collect(session: StreamingSession, on_chunk: Callable[[AudioChunk], None] | None) -> Synthesis:
    pcm: list[np.ndarray] = []
    words: list[WordTiming] = []
    for event in session:
        if isinstance(event, AudioChunk):
            pcm.append(event.pcm)
            if on_chunk is not None:
                on_chunk(event)
        else:
            words.append(event)
    audio = np.concatenate(pcm) if pcm else np.zeros(0, dtype=np.float32)
    return Synthesis(audio.astype(np.float32, copy=False), SAMPLE_RATE, words)


# A daemon thread still inside torch when the interpreter exits aborts the process: stop them first.
_open_engines: weakref.WeakSet[TTSEngine] = weakref.WeakSet()


@atexit.register
def _close_open_engines() -> None:
    for engine in list(_open_engines):
        engine.close()


_shared: dict[tuple[Any, ...], TTSEngine] = {}
_shared_lock = threading.Lock()


def shared_engine(model: str | os.PathLike[str] = DEFAULT_MODEL_REPO, **kwargs: Any) -> TTSEngine:
    """The process-wide engine for these arguments, loaded on first use (blocking: call it from a
    thread, e.g. ``await asyncio.to_thread(shared_engine, ...)``, never on an event loop)."""
    key = (
        str(Path(model)) if os.path.isdir(model) else str(model),
        tuple(sorted((k, str(v)) for k, v in kwargs.items())),
    )
    with _shared_lock:
        engine = _shared.get(key)
        if engine is None or engine._closed:
            engine = _shared[key] = TTSEngine.from_pretrained(model, **kwargs)
        return engine
