"""Pipecat service for Kyutai's streaming TTS.

Each Pipecat audio context (one LLM turn, or one ``TTSSpeakFrame``) is one engine session: LLM
tokens go to the session as they stream (token aggregation: the engine's 3-word lookahead is the only
wait), the end of the LLM response flushes it, and a consumer task turns the session's 80 ms chunks
and word timings into audio frames and word timestamps on that context. Interruption cancels the
session, which stops its audio and frees its engine slot at once.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

try:
    from pipecat.frames.frames import (
        CancelFrame,
        EndFrame,
        ErrorFrame,
        Frame,
        StartFrame,
        TTSAudioRawFrame,
        TTSStoppedFrame,
    )
    from pipecat.services.settings import NOT_GIVEN, TTSSettings
    from pipecat.services.tts_service import TextAggregationMode, TTSService
    from pipecat.utils.tracing.service_decorators import traced_tts
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("the Pipecat adapter needs: pip install 'kyutai-tts-plugin[pipecat]'") from exc

from ..checkpoint import DEFAULT_MODEL_REPO, DEFAULT_VOICE_REPO
from ..errors import KyutaiTTSError
from ..types import FRAME_SIZE, SAMPLE_RATE, AudioChunk, SessionOptions, TTSBackend, TTSSession


@dataclass
class KyutaiTTSSettings(TTSSettings):
    """Runtime settings (applied from the next utterance).

    Parameters:
        cfg_coef: classifier-free-guidance strength the model was distilled for (1.0 to 4.0).
        temperature: sampling temperature; 0 is greedy.
        n_q: audio codebooks generated (fewer is faster, lower quality).
        padding_bonus: > 0 speaks slower, < 0 faster.
    """

    cfg_coef: float | Any = field(default_factory=lambda: NOT_GIVEN)
    temperature: float | Any = field(default_factory=lambda: NOT_GIVEN)
    n_q: int | Any = field(default_factory=lambda: NOT_GIVEN)
    padding_bonus: float | Any = field(default_factory=lambda: NOT_GIVEN)


class KyutaiTTSService(TTSService):
    """Kyutai DSM-TTS (``kyutai/tts-1.6b-en_fr``) in-process (or through `RemoteTTS`)."""

    Settings = KyutaiTTSSettings
    _settings: KyutaiTTSSettings

    def __init__(
        self,
        *,
        engine: TTSBackend | None = None,
        model: str | os.PathLike[str] = DEFAULT_MODEL_REPO,
        voice_repo: str | os.PathLike[str] = DEFAULT_VOICE_REPO,
        device: str = "cpu",
        dtype: str = "float32",
        engine_kwargs: dict[str, Any] | None = None,
        settings: KyutaiTTSSettings | None = None,
        text_aggregation_mode: TextAggregationMode = TextAggregationMode.TOKEN,
        **kwargs: Any,
    ) -> None:
        """Create the service.

        Args:
            engine: a loaded `TTSEngine` (or a `RemoteTTS`). When None, the process-wide shared engine
                for `model` is loaded in a thread during `setup`, never on the event loop.
            model: Hugging Face repo id or local directory, used when `engine` is None.
            voice_repo: voices repo id or local directory, used when `engine` is None.
            device: "cpu" or "cuda", used when `engine` is None.
            dtype: "float32" or "bfloat16", used when `engine` is None.
            engine_kwargs: more `TTSEngine.from_pretrained` arguments (max_sessions, quantize, ...).
            settings: runtime settings (voice, cfg_coef, temperature, n_q, padding_bonus).
            text_aggregation_mode: TOKEN (default) hands every LLM token to the engine at once.
            **kwargs: passed to `TTSService`.
        """
        defaults = SessionOptions()
        store = KyutaiTTSSettings(
            model=str(model) if engine is None else "kyutai-tts",
            voice=None,
            language=None,
            cfg_coef=defaults.cfg_coef,
            temperature=defaults.temperature,
            n_q=defaults.n_q,
            padding_bonus=defaults.padding_bonus,
        )
        if settings is not None:
            store.apply_update(settings)
        super().__init__(
            text_aggregation_mode=text_aggregation_mode,
            push_text_frames=False,  # word timestamps drive the text frames
            push_start_frame=True,
            push_stop_frames=True,
            pause_frame_processing=False,  # our audio always carries its context id
            sample_rate=SAMPLE_RATE,
            settings=store,
            **kwargs,
        )
        self._engine: TTSBackend | None = engine
        self._engine_args = dict(
            model=model, voice_repo=voice_repo, device=device, dtype=dtype, **(engine_kwargs or {})
        )
        self._sessions: dict[str, TTSSession] = {}
        self._consumers: dict[str, asyncio.Task[None]] = {}

    @property
    def engine(self) -> TTSBackend | None:
        return self._engine

    def can_generate_metrics(self) -> bool:
        return True

    @property
    def supports_processing_metrics(self) -> bool:
        return False  # run_tts returns before synthesis ends

    async def setup(self, setup: Any) -> None:
        await super().setup(setup)
        if self._engine is None:
            from ..engine import shared_engine

            self._engine = await asyncio.to_thread(shared_engine, **self._engine_args)

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        if self._engine is None:  # setup was skipped (e.g. an unusual runner): load off the loop
            from ..engine import shared_engine

            self._engine = await asyncio.to_thread(shared_engine, **self._engine_args)

    async def stop(self, frame: EndFrame) -> None:
        # End open sessions first: the base waits for every open context to finish playing.
        for session in list(self._sessions.values()):
            session.flush()
        await super().stop(frame)
        await self._release_all()

    async def cancel(self, frame: CancelFrame) -> None:
        await self._release_all()
        await super().cancel(frame)

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._release_all()

    def _options(self) -> SessionOptions:
        s = self._settings
        return SessionOptions(
            voice=s.voice or None,
            cfg_coef=float(s.cfg_coef),
            temperature=float(s.temperature),
            n_q=int(s.n_q),
            padding_bonus=float(s.padding_bonus),
        )

    @traced_tts
    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        """Hand `text` (a token, a sentence or a whole speak request) to the context's session."""
        try:
            session = self._sessions.get(context_id)
            if session is None:
                assert self._engine is not None, "the engine is loaded in setup()"
                session = self._engine.open_session(self._options())
                self._sessions[context_id] = session
                self._consumers[context_id] = self.create_task(
                    self._consume(context_id, session), name=f"kyutai-tts-{context_id}"
                )
            session.push_text(text)
        except KyutaiTTSError as exc:
            yield ErrorFrame(error=f"Kyutai TTS: {exc}")
            return
        yield None

    async def flush_audio(self, context_id: str | None = None) -> None:
        """End of text for this context: speak the rest, then the context closes."""
        session = self._sessions.get(context_id) if context_id else None
        if session is not None:
            session.flush()

    async def on_audio_context_interrupted(self, context_id: str) -> None:
        await self._release(context_id)
        await super().on_audio_context_interrupted(context_id)

    async def _consume(self, context_id: str, session: TTSSession) -> None:
        spoke = False
        try:
            async for event in session:
                if isinstance(event, AudioChunk):
                    spoke = True
                    frame = TTSAudioRawFrame(event.pcm16(), SAMPLE_RATE, 1, context_id=context_id)
                    await self.append_to_audio_context(context_id, frame)
                else:
                    await self.add_word_timestamps([(event.word, event.start_s)], context_id)
            if not spoke:
                # Nothing speakable (only emoji or punctuation): close with 80 ms of silence, or Pipecat
                # counts a failed synthesis and eventually marks the service unusable.
                silence = TTSAudioRawFrame(bytes(2 * FRAME_SIZE), SAMPLE_RATE, 1, context_id=context_id)
                await self.append_to_audio_context(context_id, silence)
        except KyutaiTTSError as exc:
            await self.push_error(error_msg=f"Kyutai TTS: {exc}", exception=exc)
        finally:
            if self._sessions.get(context_id) is session:
                del self._sessions[context_id]
                self._consumers.pop(context_id, None)
                if self.audio_context_available(context_id):
                    await self.append_to_audio_context(context_id, TTSStoppedFrame(context_id=context_id))
                    await self.remove_audio_context(context_id)

    async def _release(self, context_id: str) -> None:
        session = self._sessions.pop(context_id, None)
        task = self._consumers.pop(context_id, None)
        if session is not None:
            session.cancel()
        if task is not None:
            await self.cancel_task(task)

    async def _release_all(self) -> None:
        for context_id in list(self._sessions):
            await self._release(context_id)

    async def _update_settings(self, delta: TTSSettings) -> dict[str, Any]:
        changed = await super()._update_settings(delta)
        if "model" in changed:
            logger.warning(f"{self}: changing the model needs a new KyutaiTTSService; ignored")
        return changed
