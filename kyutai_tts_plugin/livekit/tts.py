"""LiveKit Agents TTS for Kyutai's streaming model.

`stream()` hands every LLM delta straight to an engine session (no sentence buffering: the engine's
3-word lookahead is the only wait); `end_input()` flushes it. Each 80 ms chunk leaves as one audio
frame, preceded by the `TimedString` of any word starting in it, carrying the original LLM text with
its whitespace, so the chat history reads as the LLM wrote it and is cut to what was heard.
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass, replace
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

from ..checkpoint import DEFAULT_MODEL_REPO, DEFAULT_VOICE_REPO
from ..errors import EngineFullError, EngineTimeoutError, KyutaiTTSError
from ..types import FRAME_SIZE, SAMPLE_RATE, AudioChunk, SessionOptions, TTSBackend, TTSSession


@dataclass(frozen=True)
class _Options:
    voice: str | None
    cfg_coef: float
    temperature: float
    n_q: int
    padding_bonus: float

    def session_options(self) -> SessionOptions:
        return SessionOptions(
            voice=self.voice,
            cfg_coef=self.cfg_coef,
            temperature=self.temperature,
            n_q=self.n_q,
            padding_bonus=self.padding_bonus,
        )


class TTS(tts.TTS):
    """Kyutai DSM-TTS (``kyutai/tts-1.6b-en_fr``) for `AgentSession(tts=...)`."""

    def __init__(
        self,
        *,
        engine: TTSBackend | None = None,
        model: str | os.PathLike[str] = DEFAULT_MODEL_REPO,
        voice_repo: str | os.PathLike[str] = DEFAULT_VOICE_REPO,
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
            model, voice_repo, device, dtype, engine_kwargs: how to load that shared engine.
            voice, cfg_coef, temperature, n_q, padding_bonus: per-stream options (see `update_options`).
        """
        super().__init__(
            capabilities=tts.TTSCapabilities(streaming=True, aligned_transcript=True),
            sample_rate=SAMPLE_RATE,
            num_channels=1,
        )
        self._engine = engine
        self._engine_args = dict(
            model=model, voice_repo=voice_repo, device=device, dtype=dtype, **(engine_kwargs or {})
        )
        self._model_name = str(model) if engine is None else "kyutai-tts"
        self._opts = _Options(voice, cfg_coef, temperature, n_q, padding_bonus)
        self._loading: threading.Thread | None = None
        self._load_error: BaseException | None = None
        self._loaded = threading.Event()
        if engine is not None:
            self._loaded.set()

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
        self._opts = replace(self._opts, **{k: v for k, v in changes.items() if utils.is_given(v)})

    def prewarm(self) -> None:
        """Start loading the engine in a background thread; returns at once."""
        if self._engine is None and self._loading is None:
            self._loading = threading.Thread(target=self._load, name="kyutai-tts-load", daemon=True)
            self._loading.start()

    def _load(self) -> None:
        from ..engine import shared_engine

        try:
            self._engine = shared_engine(**self._engine_args)
        except BaseException as exc:  # reported to the streams that wait for it
            self._load_error = exc
        finally:
            self._loaded.set()

    async def _get_engine(self) -> TTSBackend:
        self.prewarm()
        await asyncio.to_thread(self._loaded.wait)
        if self._load_error is not None:
            raise APIError(f"Kyutai TTS could not load its model: {self._load_error}", retryable=False)
        assert self._engine is not None
        return self._engine

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> tts.ChunkedStream:
        return self._synthesize_with_stream(text, conn_options=conn_options)

    def stream(self, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS) -> SynthesizeStream:
        return SynthesizeStream(tts=self, conn_options=conn_options)


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
        engine = await self._kyutai._get_engine()
        session: TTSSession | None = None
        opened = asyncio.Event()

        async def forward_text() -> None:
            nonlocal session
            try:
                # Read the channel at call time: a retry replays the input into a new one.
                async for data in self._input_ch:
                    if isinstance(data, self._FlushSentinel):
                        break  # one stream = one segment in livekit-agents 1.8
                    if session is None:
                        if not data.strip():
                            continue
                        session = engine.open_session(self._opts.session_options())
                        output_emitter.start_segment(segment_id=utils.shortuuid())
                        self._mark_started()
                        opened.set()
                    session.push_text(data)
                if session is not None:
                    session.flush()
            finally:
                opened.set()

        forward = asyncio.create_task(forward_text())
        try:
            await opened.wait()
            if forward.done() and forward.exception() is not None:
                forward.result()
            if session is None:
                return  # blank input: nothing to say, no segment
            spoke = False
            async for event in session:
                if isinstance(event, AudioChunk):
                    spoke = True
                    output_emitter.push_frame(rtc.AudioFrame(event.pcm16(), SAMPLE_RATE, 1, FRAME_SIZE))
                else:
                    output_emitter.push_timed_transcript(
                        TimedString(event.text, start_time=event.start_s, end_time=event.end_s)
                    )
            await forward
            if not spoke:
                # Only emoji / punctuation: end the segment with 80 ms of silence so the framework
                # does not treat it as a failed synthesis and retry.
                output_emitter.push_frame(rtc.AudioFrame(bytes(2 * FRAME_SIZE), SAMPLE_RATE, 1, FRAME_SIZE))
            output_emitter.end_segment()
        except EngineFullError as exc:
            raise APIConnectionError(f"Kyutai TTS: {exc}") from exc
        except EngineTimeoutError as exc:
            raise APITimeoutError(f"Kyutai TTS: {exc}") from exc
        except KyutaiTTSError as exc:
            raise APIError(f"Kyutai TTS: {exc}", retryable=False) from exc
        finally:
            # Cancellation (interruption) lands here too: stop the audio and free the slot at once.
            if session is not None:
                session.cancel()
            await utils.aio.cancel_and_wait(forward)
