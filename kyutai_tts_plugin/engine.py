"""The in-process engine: one model on one device, many streaming sessions stepped in one batch.

A single worker thread owns the device. Each open session holds a *slot* (a row of every cache);
at each iteration the worker steps every session that has enough text (3 pending words, or flushed)
and whose consumer keeps up, in one batched forward pass. Sessions join and leave at any step.
Callers never block on the model: ``push_text``/``flush``/``cancel`` only queue work for the worker.
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import itertools
import logging
import os
import random
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
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
    CheckpointError,
    EngineFailure,
    EngineFullError,
    EngineTimeoutError,
    InvalidInputError,
    SessionClosedError,
    VoiceNotFoundError,
)
from .generator import Generator, SlotSettings
from .hardware import resolve_device, resolve_dtype
from .lm import ZERO_TOKEN, LMModel, LMShape, load_lm, quantize_int8
from .mimi import MimiConfig, MimiModel
from .text import RawWord, TextTokenizer, WordChunker, normalize_word_text
from .types import (
    FRAME_DURATION_S,
    FRAME_SIZE,
    SAMPLE_RATE,
    AudioChunk,
    SessionEvent,
    SessionOptions,
    VoicePrompt,
    WordTiming,
)
from .voice_prompt import (
    EMBEDDING_MODEL,
    PROMPT_MODEL,
    PromptEncoder,
    is_audio_path,
    local_audio_file,
    read_audio,
)

logger = logging.getLogger(__name__)

REAL_TIME_CHECK_STEPS = 25  # 2 s of steps: enough to tell a slow engine from one slow step
FINAL_PADDING = 4  # steps generated after the end of speech, as in the reference
# Consecutive failed engine steps (or slot joins) after which the engine calls itself unhealthy: one
# failure may be a session's own doing, a run of them with nothing succeeding between is the device.
MAX_CONSECUTIVE_FAILURES = 3
TIMEOUT_POLL_S = 1.0  # how often an idle worker looks for idle / over-long sessions
# Voices whose cross-attention keys/values stay cached (a joining session copies them into its slot,
# so an evicted voice costs only a reload): about 80 MB each for the 1.6B model in bfloat16.
VOICE_CACHE_SIZE = 16
# States after a voice prompt's steps kept for reuse: for a 10 s prompt with the 0.75B model in bfloat16,
# about 12 MB of KV cells and 8 MB of Mimi decoder state per slot (two slots with CFG).
PROMPT_STATE_CACHE_SIZE = 16

CrossKV = list[tuple[torch.Tensor, torch.Tensor]]  # per backbone layer: a voice's (keys, values)
CLOSED_MESSAGE = "the engine is closed; create a new TTSEngine"


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
    """One streamed utterance. See `kyutai_tts_plugin.types.TTSSession` for the contract.

    What the caller holds: the engine keeps only the session's state (`_Session`), so a session
    dropped without flush or cancel is garbage-collected and its slot is freed (nobody can read it).
    """

    def __init__(self, engine: TTSEngine, options: SessionOptions, voices: list[str]) -> None:
        self._core = core = _Session(engine, options, voices)
        # Not `core.cancel`: a finalizer may run inside the garbage collector on any thread, even one
        # holding the engine's or the session's lock. It only marks the state; the worker frees the slot.
        finalizer = weakref.finalize(self, _abandon, core)
        finalizer.atexit = False

    @property
    def id(self) -> str:
        return self._core.id

    @property
    def options(self) -> SessionOptions:
        return self._core.options

    @property
    def words(self) -> list[str]:
        """The whole words received so far (a word is complete once whitespace follows it)."""
        return self._core.words

    @property
    def is_finished(self) -> bool:
        return self._core.is_finished

    @property
    def max_buffered_frames(self) -> int | None:
        """Unread events beyond which this session is not stepped (None: the engine's
        `max_buffered_s`): a reader that paces itself (an adapter following playback) paces the engine."""
        return self._core.max_buffered_frames

    @max_buffered_frames.setter
    def max_buffered_frames(self, frames: int | None) -> None:
        self._core.max_buffered_frames = frames

    def push_text(self, fragment: str) -> None:
        """Append raw text, split anywhere (LLM token fragments)."""
        self._core.push_text(fragment)

    def next_turn(self) -> None:
        """Dialog: the text pushed from now on is spoken by the other speaker."""
        self._core.next_turn()

    def flush(self) -> None:
        """The text is complete: speak the rest (without clipping the last word), then end."""
        self._core.flush()

    def cancel(self) -> None:
        """Stop now. Pending audio is dropped, the stream ends and the slot is freed within one step."""
        self._core.cancel()

    def __iter__(self) -> Iterator[SessionEvent]:
        yield from self._core  # a generator of the handle: iterating keeps the session alive

    async def __aiter__(self) -> AsyncIterator[SessionEvent]:  # type: ignore[override]
        async for event in self._core:
            yield event

    def __getattr__(self, name: str) -> Any:
        if name == "_core":  # not set yet (a failed __init__): no recursion
            raise AttributeError(name)
        return getattr(self._core, name)  # the state's internals, for the engine's tests


def _abandon(core: _Session) -> None:
    if not core._finished:
        core._cancelled = True


class _Session:
    """The engine's side of a session (see `StreamingSession`, which callers hold)."""

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
        # Pushes chunk and tokenize under this lock, not the engine's, so one session's large input
        # never stops the worker; it keeps one session's pushes in order.
        self._push_lock = threading.Lock()
        self._pause_s = 0.0  # total of the session's break tags (capped by engine.max_pause_s)
        self._voice_ready = False  # its voice's cross-attention keys/values are in the engine cache
        # A model with audio-prompt voices: the prompt as given (read at open when it is a local file or
        # PCM), then its Mimi codes [dep_q, frames] once the loader has encoded it.
        self._prompt: VoicePrompt | None = None
        self._prefix: torch.Tensor | None = None
        self._prefix_key = ""  # content hash of the prefix codes
        now = engine._timeout_clock()
        self._opened_at = now  # for engine.max_session_s
        self._active_at = now  # last push, flush or read: for engine.idle_timeout_s
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
        self._engine._check_usable()
        with self._push_lock:
            self._check_open("push_text")
            self._active_at = self._engine._timeout_clock()
            self._deliver(self._tokenize(self._chunker.push(fragment)))

    def next_turn(self) -> None:
        """Dialog: the text pushed from now on is spoken by the other speaker."""
        self._engine._check_usable()
        with self._push_lock:
            self._check_open("next_turn")
            self._active_at = self._engine._timeout_clock()
            units = self._tokenize(self._chunker.finish())
            self._chunker = WordChunker()
            self._turn += 1
            self._turn_has_word = False
            self._deliver(units)

    def flush(self) -> None:
        """The text is complete: speak the rest (without clipping the last word), then end."""
        self._engine._check_usable()
        with self._push_lock:
            if self._cancelled or self._flushed or self._finished:
                return
            self._active_at = self._engine._timeout_clock()
            self._deliver(self._tokenize(self._chunker.finish()), flush=True)

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
                    self._active_at = self._engine._timeout_clock()
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
                    self._active_at = self._engine._timeout_clock()
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
        if self._finished:
            raise SessionClosedError(
                f"{what}: session {self._id} has ended ({self._error}); open a new session for new text"
            )

    def _tokenize(self, units: Sequence[RawWord]) -> list[tuple[dsm.Entry | None, str, str | None]]:
        """(entry or None for text-only, raw text, spoken word or None) per unit; no engine lock held."""
        engine = self._engine
        out: list[tuple[dsm.Entry | None, str, str | None]] = []
        for unit in units:
            if unit.break_s is not None:
                self._pause_s += unit.break_s
                if self._pause_s > engine.max_pause_s:
                    error = InvalidInputError(
                        f"the pauses of session {self._id} add up to more than {engine.max_pause_s:g} s "
                        "(the engine's max_pause_s); the session was ended: open a new one with fewer "
                        "or shorter <break> tags"
                    )
                    self._abort(error)
                    raise error
                steps = int(round(unit.break_s * engine.frame_rate))
                out.append((dsm.Entry((), "", steps), unit.text, None))
                continue
            pieces = normalize_word_text(unit.word).split()
            raw = unit.text
            if not pieces:
                out.append((None, raw, None))
            for piece in pieces:
                tokens = engine.tokenizer.encode_word(piece)
                if not tokens:
                    out.append((None, raw, None))  # nothing speakable: keep the text for timings
                else:
                    if engine.multi_speaker and not self._turn_has_word:
                        marker = dsm.MAIN_SPEAKER if self._turn % 2 == 0 else dsm.OTHER_SPEAKER
                        tokens = [marker, *tokens]
                    self._turn_has_word = True
                    padding = max(0, engine.padding_between + len(tokens) - 1)
                    out.append((dsm.Entry(tuple(tokens), piece, padding), raw, piece))
                raw = ""
        return out

    def _deliver(self, units: list[tuple[dsm.Entry | None, str, str | None]], flush: bool = False) -> None:
        """Hand tokenized units to the worker: the only part of a push under the engine lock."""
        engine = self._engine
        with engine._cv:
            if self._cancelled or self._finished:
                return  # cancelled or ended by another thread meanwhile: the text has nowhere to go
            self._inbox.extend((entry, raw) for entry, raw, _ in units)
            self._words.extend(word for _, _, word in units if word is not None)
            if flush:
                self._flushed = True
            engine._cv.notify_all()

    def _abort(self, error: BaseException) -> None:
        """End this session with `error` and free its slot (events already made are still read)."""
        with self._engine._cv:
            self._engine._release(self)
            self._engine._cv.notify_all()
        self._end(error)

    def _emit(self, events: Sequence[SessionEvent]) -> None:
        if not events:
            return
        with self._cv:
            if self._cancelled or self._finished:
                return
            # Audio being made counts as progress: a reader waiting for it is not idle.
            self._active_at = self._engine._timeout_clock()
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
    null_row: int | None = None  # the generator slot of its CFG null branch (real CFG only)
    prefix_frames: int = 0  # frames of its voice prompt: steps with the text held at zero, audio not sent
    # Its prompt's kept state (see reuse_prompt_steps): prompt content, CFG or not, codebooks.
    prompt_state_key: tuple[str, bool, int] | None = None


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
        idle_timeout_s: float | None = 60.0,
        max_session_s: float | None = 900.0,
        max_pause_s: float = 60.0,
        compile: bool = False,
        reuse_prompt_steps: bool = True,
    ) -> None:
        if max_sessions < 1:
            raise InvalidInputError("max_sessions must be at least 1")
        for name, value in (("idle_timeout_s", idle_timeout_s), ("max_session_s", max_session_s)):
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise InvalidInputError(
                    f"{name}={value!r}: use a number of seconds > 0, or None for no limit"
                )
        if not (isinstance(max_pause_s, (int, float)) and max_pause_s >= 0):
            raise InvalidInputError(f"max_pause_s={max_pause_s!r}: use a number of seconds >= 0")
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
        self.idle_timeout_s = idle_timeout_s
        self.max_session_s = max_session_s
        self.max_pause_s = float(max_pause_s)
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
        # What config.json says a voice is: a speaker embedding (cross-attention), or an audio prompt
        # forced as a prefix, with real CFG when the model has no distilled `cfg` conditioner.
        self.voice_kind = "embedding" if self.multi_speaker else "prompt"
        self.real_cfg = self.voice_kind == "prompt" and not model.cfg_values()
        # A prompt may fill half of the attention window, so the voice stays in view while it speaks.
        self.max_prompt_frames = shape.context // 2 if self.voice_kind == "prompt" else 0
        self.max_prompt_s = self.max_prompt_frames / self.frame_rate
        self._prompts = (
            PromptEncoder(mimi, shape.dep_q, self.max_prompt_s) if self.voice_kind == "prompt" else None
        )
        self._max_delay = max(shape.delays)
        # A voice prompt's steps depend on the prompt alone (text held at zero, audio forced, what is
        # sampled thrown away): the state after them is kept per (prompt, CFG or not) and a session
        # with the same prompt (and codebooks, and CFG or not) starts from it instead of recomputing them.
        self.reuse_prompt_steps = reuse_prompt_steps
        self._prompt_states: OrderedDict[tuple[str, bool, int], list[dict[str, Any]]] = OrderedDict()
        # With real CFG a session may take two generator slots (itself and its null branch).
        rows = max_sessions * (2 if self.real_cfg else 1)
        self.generator = Generator(
            model,
            mimi,
            rows,
            device,
            self.delay_steps,
            compile=compile,
            max_prefix_frames=self.max_prompt_frames,
        )
        self._cross_cache: OrderedDict[tuple[str, ...], CrossKV] = OrderedDict()
        self._cross_lock = threading.Lock()  # the loader thread fills the cache, the worker reads it
        self._cv = threading.Condition()
        self._slots: list[StreamingSession | None] = [None] * max_sessions
        self._waiting: deque[StreamingSession] = deque()
        self._closed = False
        self.healthy = True  # False once steps keep failing (a device error): see health_error
        self.health_error: str | None = None
        self._failures = 0  # consecutive failed steps / joins
        self._observers: list[StepObserver] = []
        self._clock: Callable[[], float] = time.perf_counter  # tests drive it
        # Idle and duration limits read their own clock: `_clock` times steps, and tests that drive it
        # count its calls per step.
        self._timeout_clock: Callable[[], float] = time.monotonic
        # Voices are resolved (maybe downloaded) and loaded here, never on the caller's thread nor
        # on the worker, so neither open_session nor other sessions' steps wait for them.
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kyutai-tts-voices")
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

        Its config.json decides what a voice is: a speaker embedding of `voice_repo`
        (``kyutai/tts-1.6b-en_fr``), or an audio prompt (``kyutai/tts-0.75b-en-public``: a voice name
        of `voice_repo`'s audio files, a WAV/FLAC/MP3 path or a `VoicePrompt`, with real CFG).

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
        self._check_usable()
        prompt = self._prompt_of(options)
        voice = options.voice if isinstance(options.voice, str) and options.voice else None
        voices = [voice or self.default_voice]
        if options.other_voice is not None:
            voices.append(options.other_voice)
        if self.voices.directory is not None and prompt is None:
            # A local directory is a file check (no network): an unknown voice is refused at once,
            # with close matches. A Hub voice is resolved by the loader; its iterator raises then.
            for v in voices:
                self.voices.resolve(v)
        handle = StreamingSession(self, options, voices)
        session = handle._core
        session._prompt = prompt
        if self.voice_kind == "prompt":
            session._voice_ready = False  # the loader encodes its prompt (or finds it in the cache)
        else:
            session._voice_ready = tuple(voices) in self._cross_cache
        with self._cv:
            self._check_usable()
            # Admission is asynchronous (the worker moves sessions into slots), so count both.
            taken = sum(s is not None for s in self._slots) + len(self._waiting)
            if taken >= self.max_sessions + self.max_waiting:
                raise EngineFullError(
                    f"engine full: {self.max_sessions} sessions are speaking and {self.max_waiting} are "
                    "waiting; retry later, or raise max_sessions / max_waiting when creating the engine"
                )
            self._waiting.append(session)
            if not session._voice_ready:
                self._loader.submit(self._load_voice_prompt if self._prompts else self._load_voices, session)
            self._cv.notify_all()
        return handle

    def synthesize(
        self,
        text: str,
        options: SessionOptions | None = None,
        on_chunk: Callable[[AudioChunk], None] | None = None,
    ) -> Synthesis:
        """Whole text in, whole audio and word timings out (blocks until done)."""
        session = self.open_session(options)
        try:
            session.push_text(text)
            session.flush()
            return _collect(session, on_chunk)
        finally:
            session.cancel()  # frees the slot if anything above raised; nothing once it has ended

    def synthesize_dialog(self, turns: Sequence[str], options: SessionOptions | None = None) -> Synthesis:
        """Two-speaker dialog: turns alternate between `options.voice` and `options.other_voice`."""
        session = self.open_session(options)
        try:
            for i, turn in enumerate(turns):
                if i:
                    session.next_turn()
                session.push_text(turn)
            session.flush()
            return _collect(session, None)
        finally:
            session.cancel()  # frees the slot if anything above raised; nothing once it has ended

    def close(self) -> None:
        """Stop the worker thread; open sessions end with `EngineFailure`. Idempotent."""
        with self._cv:
            self._closed = True
            sessions = [s for s in self._slots if s is not None] + list(self._waiting)
            self._slots = [None] * self.max_sessions
            self._waiting.clear()
            self._cv.notify_all()
        self._loader.shutdown(wait=False, cancel_futures=True)
        for s in sessions:
            s._end(EngineFailure("the engine was closed"))
        if threading.current_thread() is not self._worker:
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
        # n_q above the checkpoint's codebooks means all of them (the default, 32, asks the 16-codebook
        # model for its 16), so that one set of options serves both model kinds.
        n_q_max = max(shape.dep_q, SessionOptions.n_q)
        bounds = {"n_q_max": n_q_max, "audio_vocab": shape.card, "text_vocab": shape.text_card}
        o.validate(cfg_values=self.model.cfg_values(), **bounds)
        if self.voice_kind == "embedding":
            for name in ("voice", "other_voice"):
                v = getattr(o, name)
                audio_file = isinstance(v, str) and local_audio_file(v) is not None
                if isinstance(v, VoicePrompt) or audio_file:
                    raise InvalidInputError(
                        f"{name}={v!r} is an audio prompt, but {EMBEDDING_MODEL}. Voice cloning from audio "
                        "needs a model that takes audio prompts, such as kyutai/tts-0.75b-en-public"
                    )
        else:
            if o.other_voice is not None:
                raise InvalidInputError(
                    f"other_voice is set, but {PROMPT_MODEL}: it speaks with one voice; leave other_voice "
                    "unset (dialogs need a model with speaker embeddings, such as kyutai/tts-1.6b-en_fr)"
                )
            if isinstance(o.voice, str) and o.voice.endswith(".safetensors"):
                raise InvalidInputError(
                    f"voice={o.voice!r} is a speaker-embedding file, but {PROMPT_MODEL}: give a WAV, FLAC or "
                    "MP3 file of the speaker (1 s or more), raw PCM (VoicePrompt), or a voice name"
                )

    def _prompt_of(self, o: SessionOptions) -> VoicePrompt | None:
        """The session's voice prompt when it is given as PCM or a local audio file (read now, so that
        an unreadable, empty, too short or too long prompt is refused at open), else None."""
        if self._prompts is None:
            return None
        if isinstance(o.voice, VoicePrompt):
            prompt = o.voice
            shown = "the voice prompt (VoicePrompt)"
        elif isinstance(o.voice, str) and is_audio_path(o.voice) and local_audio_file(o.voice) is not None:
            prompt = read_audio(o.voice)
            shown = f"voice prompt {o.voice!r}"
        else:
            return None
        from .voice_prompt import prompt_pcm

        prompt_pcm(prompt, self.max_prompt_s, shown)  # the checks only; the loader encodes
        return prompt

    def _check_usable(self) -> None:
        if self._closed:
            raise EngineFailure(CLOSED_MESSAGE)
        if not self.healthy:
            raise EngineFailure(
                f"the engine is unhealthy: its steps keep failing ({self.health_error}); check the device "
                "and create a new TTSEngine (restart the server)"
            )

    def _notify_worker(self) -> None:
        """Make the worker look at its sessions now (tests call it after moving `_timeout_clock`)."""
        with self._cv:
            self._cv.notify_all()

    def _load_voices(self, s: StreamingSession) -> None:
        """Loader thread: the session's voice keys/values into the cache, then it may take a slot."""
        key = tuple(s._voices)
        try:
            if s._cancelled or s._finished:
                return
            with torch.no_grad():
                self._prepare_voice(key)
        except Exception as exc:  # this session's voice only: it alone ends
            if not isinstance(exc, (VoiceNotFoundError, EngineFailure)):
                logger.exception("loading voice %r failed", key)
                exc = EngineFailure(f"voice {', '.join(key)!r} could not be loaded ({type(exc).__name__})")
            s._abort(exc)
            return
        with self._cv:
            s._voice_ready = True
            self._cv.notify_all()

    def _load_voice_prompt(self, s: StreamingSession) -> None:
        """Loader thread: the session's voice prompt read (a voice name), checked and Mimi-encoded (or
        found in the cache by content), then it may take a slot."""
        assert self._prompts is not None
        try:
            if s._cancelled or s._finished:
                return
            prompt, shown = s._prompt, "the voice prompt (VoicePrompt)"
            if prompt is None:
                name = s._voices[0]
                path = local_audio_file(name) or self.voices.resolve(name)  # VoiceNotFoundError
                shown = f"voice {name!r}"
                # A library voice's message names the voice, not the file (a server's paths are private).
                prompt = read_audio(path, shown=name)
            with torch.no_grad():
                codes = self._prompts.codes(prompt, shown)
        except Exception as exc:  # this session's voice only: it alone ends
            if not isinstance(exc, (VoiceNotFoundError, EngineFailure, InvalidInputError)):
                logger.exception("loading voice prompt of session %s failed", s.id)
                exc = EngineFailure(f"the voice prompt could not be encoded ({type(exc).__name__})")
            s._abort(exc)
            return
        key = hashlib.sha256(codes.cpu().numpy().tobytes()).hexdigest()
        with self._cv:
            s._prefix = codes
            s._prefix_key = key
            s._voice_ready = True
            self._cv.notify_all()

    def _prepare_voice(self, key: tuple[str, ...]) -> CrossKV:
        """The voices' cross-attention keys/values, from the cache or loaded into it (LRU)."""
        with self._cross_lock:
            kv = self._cross_cache.get(key)
            if kv is not None:
                self._cross_cache.move_to_end(key)
                return kv
        dim = self.model.shape.conditioners["speaker_wavs"]["tensor"]["dim"]
        embeddings = []
        for name in key:
            path = self.voices.resolve(name)  # VoiceNotFoundError with close matches
            try:
                embeddings.append(load_voice_embedding(path, dim))
            except (CheckpointError, OSError) as exc:
                # The message says the voice's name, not the file's path (a server's paths are private);
                # the log has both.
                logger.warning("voice %r cannot be loaded from %s: %s", name, path, exc)
                raise EngineFailure(
                    f"voice {name!r} cannot be loaded: its file is truncated, unreadable or made for another "
                    "model; choose another voice, or re-download this one (the engine's log names the file)"
                ) from None
        memory = self.model.speaker_memory(embeddings, self.max_speakers)
        kv = self.model.cross_kv(memory)
        with self._cross_lock:
            self._cross_cache[key] = kv
            while len(self._cross_cache) > VOICE_CACHE_SIZE:
                self._cross_cache.popitem(last=False)
        return kv

    def _wake(self) -> None:
        if self.max_buffered_frames is not None:
            with self._cv:
                self._cv.notify_all()

    # -- the worker ---------------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            ready: list[StreamingSession] = []
            try:
                with self._cv:
                    if self._closed:
                        return
                    self._admit()
                    ready = [s for s in self._slots if s is not None and self._ready(s)]
                    if not ready:
                        self._cv.wait(timeout=self._poll_s())
                        continue
                self._iteration(ready)
                self._failures = 0
            except Exception as exc:  # a bug or device error: fail these sessions, keep serving others
                logger.exception("engine step failed")
                self._failed(ready, exc)

    def _poll_s(self) -> float | None:
        if self._waiting or self.max_buffered_frames:
            return 0.05
        # Occupied slots are looked at every second: idle and over-long sessions, abandoned ones.
        return TIMEOUT_POLL_S if any(s is not None for s in self._slots) else None

    def _failed(self, sessions: list[StreamingSession], exc: BaseException) -> None:
        """A step (or join) failed: end its sessions; after several in a row, the engine is unhealthy."""
        # The exception's text goes to the log only: it may name files of the machine.
        error = EngineFailure(
            f"the engine failed while stepping ({type(exc).__name__}); the engine's log has the details"
        )
        with self._cv:
            self._failures += 1
            if self._failures >= MAX_CONSECUTIVE_FAILURES and self.healthy:
                self.healthy = False
                self.health_error = (
                    f"{MAX_CONSECUTIVE_FAILURES} steps failed in a row, the last with {type(exc).__name__}"
                )
                logger.error("the engine is unhealthy: %s; it refuses new sessions", self.health_error)
                sessions = [*sessions, *(s for s in self._slots if s is not None), *self._waiting]
                self._slots = [None] * self.max_sessions
                self._waiting.clear()
                try:
                    self._check_usable()
                except EngineFailure as unhealthy:
                    error = unhealthy
            for s in sessions:
                self._release(s)
        for s in sessions:
            s._end(error)

    def _admit(self) -> None:
        """Move waiting sessions into free slots, expire those that waited too long, drop cancelled."""
        now = time.monotonic()
        for s in [*self._slots, *self._waiting]:
            if s is not None and s._flushed and not s._words and not s._finished:
                s._end()  # nothing speakable (empty, whitespace, emoji): no audio, clean end
        self._expire(self._timeout_clock())
        for s in self._slots:
            if s is not None and (s._cancelled or s._finished):
                self._release(s)
        still: deque[StreamingSession] = deque()
        for s in list(self._waiting):
            if s._cancelled or s._finished:
                continue
            free = next((i for i, x in enumerate(self._slots) if x is None), None)
            if free is None or not s._voice_ready:
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
            s._active_at = self._timeout_clock()  # time spent queued is not idleness
            try:
                s.run = self._start_run(s, free)
            except Exception as exc:  # confined to this session (a device error counts towards health)
                logger.exception("session %s could not join the batch", s.id)
                self._slots[free] = None
                self._failed([s], exc)
                if not self.healthy:
                    return  # every session has ended
        self._waiting = still
        self._cv.notify_all()  # for whoever waits on sessions joining or leaving (tests, monitors)
        for s in self._slots:
            if s is not None and s.run is not None:
                self._take_inbox(s)

    def _expire(self, now: float) -> None:
        """End the sessions holding a slot with no progress for idle_timeout_s, or open max_session_s."""
        for s in self._slots:
            if s is None or s._finished or s._cancelled:
                continue
            error: EngineTimeoutError | None = None
            if self.max_session_s is not None and now - s._opened_at > self.max_session_s:
                error = EngineTimeoutError(
                    f"session {s.id} ran for more than {self.max_session_s:g} s (the engine's max_session_s) "
                    "and was ended; split long texts over several sessions"
                )
            elif self.idle_timeout_s is not None and now - s._active_at > self.idle_timeout_s:
                error = EngineTimeoutError(
                    f"session {s.id} had no text, flush or read for {self.idle_timeout_s:g} s (the engine's "
                    "idle_timeout_s) and was ended to free its slot; flush or cancel sessions when done"
                )
            if error is not None:
                self._release(s)
                s._end(error)

    def _free_rows(self, count: int) -> list[int]:
        """The `count` lowest generator slots no session holds (sessions in `_slots` with a run)."""
        used: set[int] = set()
        for x in self._slots:
            if x is not None and x.run is not None:
                used.add(x.run.row)
                if x.run.null_row is not None:
                    used.add(x.run.null_row)
        free = [i for i in range(self.generator.lm_state.batch_size) if i not in used]
        if len(free) < count:
            raise RuntimeError(f"no {count} free generator slots for a session")  # sized so it never is
        return free[:count]

    def _start_run(self, s: StreamingSession, slot: int) -> _SlotRun:
        o = s.options
        cfg = self.real_cfg and o.cfg_coef != 1.0  # moshi: a coefficient of 1 runs without CFG
        rows = self._free_rows(2 if cfg else 1)
        row, null_row = rows[0], (rows[1] if cfg else None)
        settings = SlotSettings(
            temperature=o.temperature,
            top_k=o.top_k,
            temperature_text=o.temperature,
            top_k_text=o.top_k_text,
            n_q=min(o.n_q, self.model.shape.dep_q),
            padding_bonus=o.padding_bonus,
            seed=o.seed if o.seed is not None else random.randrange(2**63),
        )
        cond_sum = self.model.condition_sum(o.cfg_coef if self.model.cfg_values() else None)
        cross = self._voice_kv(tuple(s._voices)) if self.multi_speaker else None
        prefix = s._prefix
        self.generator.join(
            row,
            settings,
            cond_sum.to(self.device),
            cross,
            prefix=prefix,
            null_row=null_row,
            cfg_coef=float(o.cfg_coef) if cfg else 1.0,
        )
        run = _SlotRun(
            row=row,
            dsm_state=self.machine.new_state(),
            settings=settings,
            voice_key=tuple(s._voices),
            null_row=null_row,
            prefix_frames=0 if prefix is None else int(prefix.shape[-1]),
            prompt_state_key=(
                (s._prefix_key, cfg, settings.n_q) if prefix is not None and self.reuse_prompt_steps else None
            ),
        )
        saved = self._prompt_states.get(run.prompt_state_key) if run.prompt_state_key else None
        if saved is not None:
            self._prompt_states.move_to_end(run.prompt_state_key)  # type: ignore[arg-type]
            self.generator.load_rows(rows, saved)
            run.step = saved[0]["step"]
        return run

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
        if s._flushed or run.step < run.prefix_frames:
            return True  # flushed; or still in its voice prompt, where the text is held at zero
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
                and s.run.step < s.run.prefix_frames + self.delay_steps - 1
                and not s._cancelled
                and self._ready(s)
            ]
            if not early or len(early) == len(ready):
                break
            self._step(early)
        self._step([s for s in ready if not s._cancelled and self._ready(s)])

    def _voice_kv(self, key: tuple[str, ...]) -> CrossKV:
        # Normally a cache hit (the loader thread prepared it); a reload if it was evicted since.
        return self._prepare_voice(key)

    def _step(self, sessions: list[StreamingSession]) -> None:
        if not sessions:
            return
        started = self._clock()
        runs = [s.run for s in sessions]
        assert all(r is not None for r in runs)
        runs_: list[_SlotRun] = runs  # type: ignore[assignment]
        gen = self.generator
        # Every slot of the span is computed; those not in `sessions` are masked (fed -1).
        rows = [r.row for r in runs_] + [r.null_row for r in runs_ if r.null_row is not None]
        span = gen.span_for(rows)
        sampled_span = gen.text_step(span)
        sampled_all = [sampled_span[r.row] for r in runs_]
        # During a voice prompt the text is held at the zero token and the state machine waits.
        fed = [
            self.machine.process(r.step, r.dsm_state, t) if r.step >= r.prefix_frames else ZERO_TOKEN
            for r, t in zip(runs_, sampled_all, strict=True)
        ]
        fed_span = [-1] * span
        active_span = [False] * span
        for r, f in zip(runs_, fed, strict=True):
            fed_span[r.row] = f
            active_span[r.row] = True
            if r.null_row is not None:
                active_span[r.null_row] = True

        deep = [r for r in runs_ if r.step >= self.delay_steps]
        # Frame t - max_delay is complete now: its semantic token is from then, acoustic from now.
        decode = [i for i, r in enumerate(runs_) if r.step - self._max_delay >= self.delay_steps]
        audio_span, pcm_np = gen.audio_step(
            fed_span, max((r.settings.n_q for r in deep), default=0), bool(decode), active_span
        )
        audio_host = audio_span[[r.row for r in runs_]].tolist()
        chunks: dict[int, AudioChunk] = {}
        for i in decode:
            # A voice prompt's own frames are decoded (the decoder's state needs them) but not sent:
            # the session's audio timeline starts after them.
            index = runs_[i].step - self._max_delay - self.delay_steps - runs_[i].prefix_frames
            if index >= 0:
                chunks[i] = AudioChunk(pcm_np[runs_[i].row].copy(), index * FRAME_DURATION_S)

        observed: list[SessionStep] = []
        # Being stepped is progress (idle_timeout_s counts waiting for text or a reader, not a slow
        # or compiling step).
        stepped_at = self._timeout_clock()
        for i, (s, r) in enumerate(zip(sessions, runs_, strict=True)):
            s._active_at = stepped_at
            if self._observers:
                observed.append(
                    SessionStep(s.id, r.step, sampled_all[i], fed[i], tuple(audio_host[i]), r.dsm_state)
                )
            r.step += 1
            key = r.prompt_state_key
            if key is not None and r.step == r.prefix_frames and key not in self._prompt_states:
                kept = [r.row] if r.null_row is None else [r.row, r.null_row]
                self._prompt_states[key] = gen.save_rows(kept)
                while len(self._prompt_states) > PROMPT_STATE_CACHE_SIZE:
                    self._prompt_states.popitem(last=False)

        for i, (s, r) in enumerate(zip(sessions, runs_, strict=True)):
            events: list[SessionEvent] = []
            chunk = chunks.get(i)
            events.extend(self._prompt_timed(r, s, chunk))
            if chunk is not None:
                events.append(chunk)
            s._emit(events)
            end = r.dsm_state.end_step
            if end is not None and r.step >= end + self.delay_steps + FINAL_PADDING + self._max_delay:
                s._emit(self._prompt_timed(r, s, None, final=True))
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

    def _prompt_timed(
        self, r: _SlotRun, s: StreamingSession, chunk: AudioChunk | None, final: bool = False
    ) -> list[WordTiming]:
        """`_word_timings` on the session's timeline: the DSM steps count the voice prompt's frames,
        the audio sent does not, so both are moved back by the prompt's length."""
        if not r.prefix_frames:
            return self._word_timings(r, s, chunk, final)
        shift = r.prefix_frames * FRAME_DURATION_S
        at_steps = None if chunk is None else AudioChunk(chunk.pcm, chunk.start_s + shift)
        return [
            replace(w, start_s=max(0.0, w.start_s - shift), end_s=max(0.0, w.end_s - shift))
            for w in self._word_timings(r, s, at_steps, final)
        ]

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
        """Word timings due before `chunk`: every word starting at or before it whose end is known.

        A word ends where the next one starts. A word that lasts longer than the text-to-audio delay
        (a URL) would get its timing only after its audio began, were its end taken from the next
        word's start; but its end is already fixed when its tokens outlast the padding the model may
        choose, and the state machine says so (`next_start`): it is timed with its first frame.
        """
        st = r.dsm_state
        out: list[WordTiming] = []
        limit = float("inf") if final else (chunk.start_s + FRAME_DURATION_S / 2 if chunk else -1.0)
        while r.words_timed < len(st.transcript):
            word, step = st.transcript[r.words_timed]
            start = step * FRAME_DURATION_S
            if start > limit:
                break
            last = r.words_timed + 1 == len(st.transcript)
            # Text may still come while the session is not flushed, or is flushed but not yet taken in.
            more_text = not s._flushed or bool(s._inbox)
            if not last:
                end_step: int | None = st.transcript[r.words_timed + 1][1]
            else:
                end_step = self.machine.next_start(r.step, st, more_text)
            if end_step is None:
                break
            text = r.raw_texts.popleft() if r.raw_texts else ""
            if last and (st.end_step is not None or not (more_text or any(e.tokens for e in st.entries))):
                # The last word (no word follows once the end is known; the text was flushed, so
                # its tail is in pending_raw): trailing whitespace / unspoken characters go with it.
                text += r.pending_raw
                r.pending_raw = ""
            out.append(WordTiming(word, start, end_step * FRAME_DURATION_S, text))
            r.words_timed += 1
        return out


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
