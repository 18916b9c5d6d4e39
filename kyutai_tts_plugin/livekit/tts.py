"""LiveKit Agents TTS for Kyutai's streaming model.

`stream()` hands every LLM delta straight to an engine session (no sentence buffering: the engine's
3-word lookahead is the only wait); `end_input()` flushes it. Each 80 ms chunk leaves as one audio
frame, preceded by the `TimedString` of any word starting in it, carrying the original LLM text with
its whitespace, so the chat history reads as the LLM wrote it and is cut to what was heard.

Failures surface as LiveKit's own plugins report them, so `conn_options` retries and `FallbackAdapter`
work unchanged: no free slot or an unreachable server -> `APIConnectionError`; waiting for a slot
(in the engine's queue, or a server's: until its ``Ready``) longer than `conn_options.timeout` ->
`APITimeoutError`; a bad option -> `APIError(retryable=False)`; anything unexpected (an engine or
device error) -> `APIError`. A `RemoteTTS` failure maps by its `RemoteErrorKind`.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

try:
    from livekit import rtc
    from livekit.agents import (
        DEFAULT_API_CONNECT_OPTIONS,
        APIConnectionError,
        APIConnectOptions,
        APIError,
        APITimeoutError,
        tts,
        utils,
    )
    from livekit.agents.types import NOT_GIVEN, NotGivenOr, TimedString
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("the LiveKit adapter needs: pip install 'kyutai-tts-plugin[livekit]'") from exc

from ..adapter_support import EMPTY_REPLY_PCM16, EngineLoader, session_options, slot_taken
from ..checkpoint import DEFAULT_MODEL_REPO, DEFAULT_VOICE_REPO
from ..errors import (
    CheckpointError,
    EngineFullError,
    EngineTimeoutError,
    InvalidInputError,
    KyutaiTTSError,
    RemoteError,
    RemoteErrorKind,
)
from ..types import FRAME_SIZE, SAMPLE_RATE, AudioChunk, SessionOptions, TTSBackend, TTSSession, WordTiming

# The environment variables that name the model and the voices: read by `TTS()` and by the
# `download-files` hook alike, so the command fetches what the agent will load.
MODEL_ENV = "KYUTAI_TTS_MODEL"
VOICES_ENV = "KYUTAI_TTS_VOICES"


def configured_model() -> str:
    """The model `TTS()` loads by default: ``$KYUTAI_TTS_MODEL``, else ``kyutai/tts-1.6b-en_fr``."""
    return os.environ.get(MODEL_ENV) or DEFAULT_MODEL_REPO


def configured_voice_repo() -> str:
    """The voices `TTS()` uses by default: ``$KYUTAI_TTS_VOICES``, else ``kyutai/tts-voices``."""
    return os.environ.get(VOICES_ENV) or DEFAULT_VOICE_REPO


def model_label(model: str | os.PathLike[str]) -> str:
    """The name metrics report for a model: its repo id, never a path of this machine.

    A local directory is named by the repo it was downloaded from when it sits in the Hugging Face
    cache (``.../models--kyutai--tts-1.6b-en_fr/snapshots/<rev>``), else by its own name.
    """
    text = os.fspath(model)
    if not os.path.isdir(text):
        return text  # a repo id
    path = Path(text).resolve()
    for part in reversed(path.parts):
        if part.startswith("models--"):
            return part[len("models--") :].replace("--", "/")
    return path.name


@dataclass(frozen=True)
class _Options:
    voice: str | None
    cfg_coef: float
    temperature: float
    n_q: int
    padding_bonus: float

    def session_options(self) -> SessionOptions:
        # The one shared check (adapter_support -> SessionOptions.validate): a bad value is refused
        # when it is set, with a message naming the option, not when a turn is spoken.
        return session_options(**asdict(self))


class TTS(tts.TTS):
    """Kyutai DSM-TTS (``kyutai/tts-1.6b-en_fr``) for `AgentSession(tts=...)`."""

    def __init__(
        self,
        *,
        engine: TTSBackend | None = None,
        model: str | os.PathLike[str] | None = None,
        voice_repo: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        engine_kwargs: dict[str, Any] | None = None,
        voice: str | None = None,
        cfg_coef: float = 2.0,
        temperature: float = 0.6,
        n_q: int = 32,
        padding_bonus: float = 0.0,
    ) -> None:
        """Create the TTS.

        Args:
            engine: a loaded `TTSEngine` (or `RemoteTTS`). When None, the process-wide shared engine
                for `model` is loaded in a background thread (`prewarm()` starts it early).
            model: repo id or local directory; default ``$KYUTAI_TTS_MODEL``, else
                ``kyutai/tts-1.6b-en_fr`` (what ``python -m livekit.agents download-files`` fetches).
                With `engine` given it only names the model in metrics.
            voice_repo: default ``$KYUTAI_TTS_VOICES``, else ``kyutai/tts-voices``.
            device, dtype, engine_kwargs: how to load the shared engine.
            voice, cfg_coef, temperature, n_q, padding_bonus: per-stream options (see `update_options`).
        """
        super().__init__(
            capabilities=tts.TTSCapabilities(streaming=True, aligned_transcript=True),
            sample_rate=SAMPLE_RATE,
            num_channels=1,
        )
        resolved_model = model if model is not None else configured_model()
        self._engine_args = dict(
            model=resolved_model,
            voice_repo=voice_repo if voice_repo is not None else configured_voice_repo(),
            device=device,
            dtype=dtype,
            **(engine_kwargs or {}),
        )
        self._model_name = (
            model_label(resolved_model) if engine is None or model is not None else "kyutai-tts"
        )
        self._opts = _Options(voice, cfg_coef, temperature, n_q, padding_bonus)
        self._opts.session_options()
        self._loader = EngineLoader(self._engine_args, engine)
        self._streams: weakref.WeakSet[SynthesizeStream] = weakref.WeakSet()

    @property
    def model(self) -> str:
        return self._model_name

    @property
    def provider(self) -> str:
        return "kyutai"

    def update_options(
        self,
        *,
        voice: NotGivenOr[str | None] = NOT_GIVEN,
        cfg_coef: NotGivenOr[float] = NOT_GIVEN,
        temperature: NotGivenOr[float] = NOT_GIVEN,
        n_q: NotGivenOr[int] = NOT_GIVEN,
        padding_bonus: NotGivenOr[float] = NOT_GIVEN,
    ) -> None:
        """Change options for streams created from now on (running streams keep theirs)."""
        changes = dict(
            voice=voice, cfg_coef=cfg_coef, temperature=temperature, n_q=n_q, padding_bonus=padding_bonus
        )
        opts = replace(self._opts, **{k: v for k, v in changes.items() if utils.is_given(v)})
        opts.session_options()
        self._opts = opts

    def prewarm(self) -> None:
        """Start loading the engine in a background thread; returns at once."""
        self._loader.start()

    async def _get_engine(self) -> TTSBackend:
        # The load runs in a thread, never on the event loop (it takes tens of seconds). A failed
        # load is not cached: the next stream loads again (the files may have appeared since).
        try:
            return await self._loader.get()
        except Exception as exc:
            raise _load_error(exc, self._engine_args["model"]) from exc

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> tts.ChunkedStream:
        return self._synthesize_with_stream(text, conn_options=conn_options)

    def stream(self, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS) -> SynthesizeStream:
        stream = SynthesizeStream(tts=self, conn_options=conn_options)
        self._streams.add(stream)
        return stream

    async def aclose(self) -> None:
        """Close every open stream (their engine sessions end and free their slots). A shared or
        injected engine stays up: other TTS instances may use it."""
        streams = list(self._streams)
        self._streams.clear()
        await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
        await super().aclose()


def _load_error(exc: BaseException, model: str | os.PathLike[str]) -> APIError:
    what = f"Kyutai TTS could not load its model ({model_label(model)}): {exc}"
    if isinstance(exc, KyutaiTTSError):
        # Missing or bad files: retrying at once cannot help; the next stream loads again.
        return APIError(
            f"{what} (prepare the machine with `python -m livekit.agents download-files`)", retryable=False
        )
    if isinstance(exc, OSError):  # network / Hub unreachable while downloading
        return APIConnectionError(what)
    return APIError(what)


def _api_error(exc: Exception) -> APIError:
    """The LiveKit error for an engine or server failure, retryable where LiveKit's plugins retry."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineTimeoutError):
        return APITimeoutError(f"Kyutai TTS: {exc}")
    if isinstance(exc, EngineFullError):
        return APIConnectionError(f"Kyutai TTS: {exc}")
    if isinstance(exc, (InvalidInputError, CheckpointError)):
        return APIError(f"Kyutai TTS: {exc}", retryable=False)  # the same request fails the same way
    if isinstance(exc, RemoteError):
        what = f"Kyutai TTS server: {exc}"
        if exc.kind in (RemoteErrorKind.CONNECT_FAILED, RemoteErrorKind.CONNECTION_LOST):
            return APIConnectionError(what)  # as LiveKit's plugins report them: retried
        if exc.kind is RemoteErrorKind.TIMEOUT:
            return APITimeoutError(what)
        # A refusal of the request itself fails again as is; one for the server's own reasons (an
        # engine error, a close code) is like the plugins' "connection closed unexpectedly": retried.
        return APIError(what, retryable=exc.kind is not RemoteErrorKind.BAD_REQUEST)
    if isinstance(exc, KyutaiTTSError):
        return APIError(f"Kyutai TTS: {exc}")
    return APIError(f"Kyutai TTS failed unexpectedly: {type(exc).__name__}: {exc}")


def _opens_on_loop(engine: TTSBackend) -> bool:
    """Whether `open_session` must run on the event loop (the remote client ties its session to the
    running loop and does no blocking work there). The in-process engine may resolve voices on the
    Hub inside `open_session`, so it is called from a thread."""
    try:
        from ..remote import RemoteTTS
    except ImportError:  # pragma: no cover - aiohttp/msgpack missing: no remote backend either
        return False
    return isinstance(engine, RemoteTTS)


def _slot_timeout(engine: TTSBackend, timeout: float) -> APITimeoutError:
    if _opens_on_loop(engine):
        return APITimeoutError(
            f"Kyutai TTS: the TTS server gave no engine slot (no Ready) within conn_options.timeout "
            f"({timeout:g} s): it is busy, or slow to answer"
        )
    return APITimeoutError(
        f"Kyutai TTS: no free engine slot within conn_options.timeout ({timeout:g} s); the engine is busy"
    )


def _cancel_opened_session(opening: asyncio.Future[TTSSession]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().cancel()


class SynthesizeStream(tts.SynthesizeStream):
    def __init__(self, *, tts: TTS, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, conn_options=conn_options)
        self._kyutai = tts
        self._opts = tts._opts  # a snapshot: later update_options() calls do not affect this stream

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        output_emitter.initialize(
            request_id=utils.shortuuid(),
            sample_rate=SAMPLE_RATE,
            num_channels=1,
            mime_type="audio/pcm",
            stream=True,
        )
        session: TTSSession | None = None
        forward: asyncio.Task[None] | None = None
        try:
            engine = await self._kyutai._get_engine()
            opened = asyncio.Event()

            async def open_session() -> TTSSession:
                options = self._opts.session_options()
                if _opens_on_loop(engine):
                    return engine.open_session(options)
                opening = asyncio.ensure_future(asyncio.to_thread(engine.open_session, options))
                try:
                    return await asyncio.shield(opening)
                except asyncio.CancelledError:
                    # Interrupted while the thread opens it: the session it opens must not keep a
                    # slot with nobody reading it.
                    opening.add_done_callback(_cancel_opened_session)
                    raise

            async def forward_text() -> None:
                nonlocal session
                held = ""  # whitespace that came before the first word: it belongs to the transcript
                try:
                    # Read the channel at call time: a retry replays the input into a new one.
                    async for data in self._input_ch:
                        if isinstance(data, self._FlushSentinel):
                            if session is None:
                                continue  # a flush before any text ends nothing: the text comes next
                            break  # one stream = one segment in livekit-agents 1.8
                        if session is None:
                            if not data.strip():
                                held += data
                                continue
                            session = await open_session()
                            output_emitter.start_segment(segment_id=utils.shortuuid())
                            self._mark_started()
                            opened.set()
                            data, held = held + data, ""
                        session.push_text(data)
                    if session is not None:
                        session.flush()
                finally:
                    opened.set()

            forward = asyncio.create_task(forward_text())
            await opened.wait()
            if forward.done() and forward.exception() is not None:
                forward.result()
            if session is None:
                return  # blank input: nothing to say, no segment
            started = asyncio.get_running_loop().time()
            try:
                await asyncio.wait_for(slot_taken(session), self._conn_options.timeout)
            except asyncio.TimeoutError:
                raise _slot_timeout(engine, self._conn_options.timeout) from None
            self._acquire_time = asyncio.get_running_loop().time() - started
            spoke = await self._receive(session, output_emitter)
            await forward
            if not spoke:
                # Only emoji / punctuation: end the segment with 80 ms of silence so the framework
                # does not treat it as a failed synthesis and retry.
                output_emitter.push_frame(rtc.AudioFrame(EMPTY_REPLY_PCM16, SAMPLE_RATE, 1, FRAME_SIZE))
            output_emitter.end_segment()
        except Exception as exc:
            raise _api_error(exc) from exc
        finally:
            # Cancellation (interruption, aclose) lands here too: stop the audio and free the slot.
            if session is not None:
                session.cancel()
            if forward is not None:
                await utils.aio.cancel_and_wait(forward)

    async def _receive(self, session: TTSSession, output_emitter: tts.AudioEmitter) -> bool:
        """Forward the session's audio and word timings; True if any audio came."""
        spoke = False
        async for event in session:
            if isinstance(event, AudioChunk):
                spoke = True
                output_emitter.push_frame(rtc.AudioFrame(event.pcm16(), SAMPLE_RATE, 1, FRAME_SIZE))
            elif event.text:
                output_emitter.push_timed_transcript(_timed_string(event))
            # A timing without text is the tail of a word that normalization split in pieces
            # ("https://x" -> "https", "//x"): its text went with the first piece, whose caption
            # stays open until the next word starts.
        return spoke


def _timed_string(event: WordTiming) -> TimedString:
    if event.word != event.text.strip():
        # The first piece of a split word (or a rewritten one): its end is the end of the first piece
        # only, so leave the span open; the next word's start closes it.
        return TimedString(event.text, start_time=event.start_s)
    return TimedString(event.text, start_time=event.start_s, end_time=event.end_s)
