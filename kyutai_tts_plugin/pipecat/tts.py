"""Pipecat service for Kyutai's streaming TTS (DSM, ``kyutai/tts-1.6b-en_fr``).

Each Pipecat audio context (one LLM turn, or one ``TTSSpeakFrame``) is one engine session. LLM text
reaches the session word by word as it streams, so the engine's own lookahead is the only wait; the
end of the LLM response flushes the session; a consumer task turns the session's 80 ms chunks and
word timings into audio frames and word timestamps on that context. An interruption cancels the
session, which stops its audio and frees its engine slot at once.

Why words rather than Pipecat's TOKEN mode: in TOKEN mode Pipecat regroups tokens into sentences and
only releases the word frames of a sentence once the sentence has ended, so after an interruption in
the middle of a sentence the assistant context misses every word of that sentence, even the ones
that were heard. Handing Pipecat whole words instead (a word is complete once whitespace follows it;
the engine cannot speak a partial word anyway) costs no latency and lets each word frame follow its
audio, so the context holds exactly what was played.

Silences are normal for this engine (the model loading, a wait for a free slot, an LLM stalled on a
tool call): the service keeps every open session's audio context alive, so Pipecat's idle timeout
never ends one. Each word is queued behind the audio frame it starts in and re-based, when Pipecat
times it, by the gaps (underruns) seen while pushing the audio, so captions and context follow what
was heard; text of a failed or lost session that no word timing covers is not committed. Each
utterance is generated at most ``max_lead_s`` ahead of its playback (by the pipeline clock).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

try:
    from pipecat.frames.frames import (
        CancelFrame,
        EndFrame,
        ErrorFrame,
        Frame,
        InterruptionFrame,
        StartFrame,
        TTSAudioRawFrame,
        TTSStoppedFrame,
        TTSTextFrame,
    )
    from pipecat.processors.frame_processor import FrameDirection
    from pipecat.services.settings import NOT_GIVEN, TTSSettings
    from pipecat.services.tts_service import TextAggregationMode, TTSService
    from pipecat.utils.context.word_timestamp_tracker import WordTimestamp
    from pipecat.utils.errors import ErrorCategory
    from pipecat.utils.text.base_text_aggregator import Aggregation, BaseTextAggregator, TextType
    from pipecat.utils.tracing.service_decorators import traced_tts
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the installed extras
    raise ModuleNotFoundError(
        f"{exc}. The Kyutai Pipecat service needs Pipecat: pip install 'kyutai-tts-plugin[pipecat]'"
    ) from exc

from ..adapter_support import (
    DEFAULT_MAX_LEAD_S,
    EMPTY_REPLY_PCM16,
    EngineLoader,
    check_max_lead_s,
    session_options,
    voice_from_kwargs,
)
from ..errors import (
    EngineFailure,
    EngineFullError,
    EngineTimeoutError,
    InvalidInputError,
    KyutaiTTSError,
    RemoteError,
    RemoteErrorKind,
)
from ..types import (
    FRAME_DURATION_S,
    SAMPLE_RATE,
    AudioChunk,
    SessionOptions,
    TTSBackend,
    TTSSession,
    WordTiming,
)

__all__ = ["KyutaiTTSService", "KyutaiTTSSettings"]

_NUMERIC_FIELDS = ("cfg_coef", "temperature", "n_q", "padding_bonus")


@dataclass
class KyutaiTTSSettings(TTSSettings):
    """Runtime settings of `KyutaiTTSService`; a change applies from the next utterance.

    Parameters:
        cfg_coef: Classifier-free-guidance strength; the checkpoint accepts 1.0 to 4.0 in 0.5 steps.
        temperature: Sampling temperature; 0 decodes greedily (deterministic).
        n_q: Audio codebooks generated, 1 to 32; fewer is faster and rougher.
        padding_bonus: Speaking pace: > 0 speaks slower (longer pauses), < 0 faster.
    """

    cfg_coef: float | Any = field(default_factory=lambda: NOT_GIVEN)
    temperature: float | Any = field(default_factory=lambda: NOT_GIVEN)
    n_q: int | Any = field(default_factory=lambda: NOT_GIVEN)
    padding_bonus: float | Any = field(default_factory=lambda: NOT_GIVEN)


class _WordAggregator(BaseTextAggregator):
    """Cuts streamed LLM text into whole words: a word is complete once whitespace follows it.

    While the service has text transforms or filters, it hands over whole sentences instead (from
    Pipecat's own sentence aggregator), as Pipecat's default mode does: a transform sees a unit it
    can work on (``**Very important**``, a ``## heading``), never a lone word.
    """

    _WORD = re.compile(r"\S+(?=\s)")

    def __init__(self, sentences: BaseTextAggregator, by_sentence: Callable[[], bool]) -> None:
        super().__init__(aggregation_type=TextType.WORD, language=sentences.language)
        self._sentences = sentences
        self._by_sentence = by_sentence
        self._text = ""

    @property
    def text(self) -> Aggregation:
        if self._by_sentence():
            return self._sentences.text
        return Aggregation(self._text.strip(), TextType.WORD)

    async def aggregate(self, text: str) -> AsyncIterator[Aggregation]:
        if self._by_sentence():
            if self._text:  # words held since transforms were added: they open the sentence
                text, self._text = self._text + text, ""
            async for sentence in self._sentences.aggregate(text):
                yield sentence
            return
        self._text += text
        while (match := self._WORD.search(self._text)) is not None:
            self._text = self._text[match.end() :]
            yield Aggregation(match.group(), TextType.WORD)

    async def flush(self) -> Aggregation | None:
        sentence = await self._sentences.flush()
        rest, self._text = self._text.strip(), ""
        if sentence is not None and sentence.text.strip():
            return sentence
        return Aggregation(rest, TextType.WORD) if rest else None

    async def handle_interruption(self) -> None:
        self._text = ""
        await self._sentences.handle_interruption()

    async def reset(self) -> None:
        self._text = ""
        await self._sentences.reset()


@dataclass
class _Stream:
    """The engine session behind one audio context, and where its audio stands in playback."""

    session: TTSSession | None  # None: being opened, or it could not be opened (error reported)
    consumer: asyncio.Task[None] | None = None
    text: str = ""
    flushed: bool = False  # the text is complete
    done: bool = False  # the session's event stream ended (or it never opened)
    got_audio: bool = False
    ended_ok: bool = False  # the session spoke all its text, with no error
    appended_s: float = 0.0  # audio handed to the audio context
    pushed_s: float = 0.0  # audio Pipecat pushed downstream (towards the output transport)
    play_end_ns: int | None = None  # clock time at which the pushed audio finishes playing
    shift_s: float = 0.0  # total gap (underruns) before the last pushed frame
    words_released: int = 0  # word timings whose audio was pushed, handed to Pipecat's word frames
    text_frames_passed: int = 0
    pushed: asyncio.Event = field(default_factory=asyncio.Event)

    def lead_s(self, now_ns: int) -> float:
        """Seconds of this context's audio generated but not yet played."""
        playing = 0.0 if self.play_end_ns is None else max(0.0, (self.play_end_ns - now_ns) / 1e9)
        return (self.appended_s - self.pushed_s) + playing


class _HeardWord(WordTimestamp):
    """A word timing, re-based onto the audio actually pushed when Pipecat reads it.

    Pipecat times a context's words from its first audio frame as if the audio played without a
    break; the service queues each word behind the audio frame it starts in, so when the playback
    task reads the time, every gap (underrun) before that frame is known and added.
    """

    def __init__(self, word: str, start_s: float, context_id: str, stream: _Stream) -> None:
        self.word = word
        self.context_id = context_id
        self.includes_inter_frame_spaces = False
        self._start_s = start_s
        self._stream = stream
        self._released = False

    @property  # type: ignore[override]
    def timestamp(self) -> float:
        if not self._released:
            self._released = True
            self._stream.words_released += 1
        return self._start_s + self._stream.shift_s

    def __repr__(self) -> str:
        return f"_HeardWord({self.word!r}, {self._start_s:.2f}, {self.context_id!r})"


class KyutaiTTSService(TTSService):
    """Kyutai streaming TTS in-process (or through any `TTSBackend`, e.g. a `RemoteTTS`).

    Drop it into a pipeline in place of any TTS service::

        tts = KyutaiTTSService(settings=KyutaiTTSService.Settings(voice="vctk/p225_023.wav"))
        pipeline = Pipeline([transport.input(), user_agg, llm, tts, transport.output(), assistant_agg])

    The model loads once per process (shared by every service built with the same arguments), in a
    background thread started by the constructor, so neither Pipecat's event loop nor the pipeline
    start waits for it; the first utterance waits if it is not ready yet. Pass ``engine=`` to use an
    engine (or a remote backend) loaded up front.

    Audio is 24 kHz mono; the output transport resamples it to its own rate. Word timestamps drive
    the text frames, so captions and the assistant context follow the audio, and after an
    interruption the context holds the words that were played. A reply with nothing speakable (only
    emoji, say) is voiced as one 80 ms frame of silence, so Pipecat does not take it for a failed
    synthesis.
    """

    Settings = KyutaiTTSSettings
    _settings: KyutaiTTSSettings

    def __init__(
        self,
        *,
        engine: TTSBackend | None = None,
        model: str | os.PathLike[str] | None = None,
        voice_repo: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        engine_kwargs: dict[str, Any] | None = None,
        settings: KyutaiTTSSettings | None = None,
        voice: str | None = None,
        voice_id: str | None = None,
        text_aggregation_mode: TextAggregationMode | None = None,
        aggregate_sentences: bool | None = None,
        max_lead_s: float | None = DEFAULT_MAX_LEAD_S,
        **kwargs: Any,
    ) -> None:
        """Initialize the Kyutai TTS service.

        Args:
            engine: A loaded backend: a `TTSEngine`, or a remote client with the same interface.
                When None, the process-wide shared engine for ``model`` is loaded in a background
                thread (see `kyutai_tts_plugin.engine.shared_engine`).
            model: Hugging Face repo id or local directory of the checkpoint, when ``engine`` is
                None. Defaults to ``kyutai/tts-1.6b-en_fr``.
            voice_repo: Hugging Face repo id or local directory of the voices, when ``engine`` is
                None. Defaults to ``kyutai/tts-voices``.
            device: Torch device for the engine, when ``engine`` is None ("cpu", "cuda").
            dtype: Weights dtype for the engine, when ``engine`` is None ("float32", "bfloat16").
            engine_kwargs: More `TTSEngine.from_pretrained` arguments (max_sessions, ...).
            settings: Runtime settings (voice, cfg_coef, temperature, n_q, padding_bonus). Unset
                fields keep the engine defaults. Later changes go through
                ``TTSUpdateSettingsFrame(delta=KyutaiTTSService.Settings(...))``.
            voice: The voice, as Pipecat's other TTS services take it (same as
                ``settings.voice``; giving two different voices is an error).
            voice_id: Same as ``voice``.
            text_aggregation_mode: None (default) hands the engine each word as soon as it is
                complete (whole sentences while ``text_transforms`` or ``text_filters`` are set,
                so that they see what they do in Pipecat's own services).
                ``TextAggregationMode.SENTENCE`` waits for whole sentences (more latency).
                ``TextAggregationMode.TOKEN`` uses Pipecat's token streaming, whose word frames
                wait for the end of each sentence (an interruption mid-sentence then loses that
                sentence's words from the context), and whose transforms see one token.
            aggregate_sentences: Pipecat's older form: True is ``TextAggregationMode.SENTENCE``,
                False the default word streaming.
            max_lead_s: How many seconds of audio an utterance may be generated ahead of its
                playback (by the pipeline clock); the engine pauses that utterance beyond it, so a
                barge-in throws away at most this much work. None: no limit.
            **kwargs: Passed to `TTSService` (``name``, ``text_transforms``, ...).

        Raises:
            InvalidInputError: A setting has the wrong type or is out of range, two different
                voices are given, both ``aggregate_sentences`` and ``text_aggregation_mode`` are
                given, or ``sample_rate`` is not the engine's 24 kHz.
        """
        sample_rate = kwargs.pop("sample_rate", None)
        if sample_rate not in (None, SAMPLE_RATE):
            raise InvalidInputError(
                f"KyutaiTTSService produces {SAMPLE_RATE} Hz audio; drop sample_rate={sample_rate} "
                "(the output transport resamples to its own rate)"
            )
        if aggregate_sentences is not None:
            if text_aggregation_mode is not None:
                raise InvalidInputError(
                    "KyutaiTTSService: give text_aggregation_mode or aggregate_sentences, not both "
                    "(aggregate_sentences is Pipecat's deprecated form)"
                )
            if not isinstance(aggregate_sentences, bool):
                raise InvalidInputError(
                    f"aggregate_sentences must be True or False, got {aggregate_sentences!r}"
                )
            text_aggregation_mode = TextAggregationMode.SENTENCE if aggregate_sentences else None
        self._max_lead_s = check_max_lead_s(max_lead_s)
        defaults = SessionOptions()
        store = KyutaiTTSSettings(
            model=os.fspath(model) if model is not None else "kyutai/tts-1.6b-en_fr",
            voice=None,
            language=None,  # the model speaks English and French without being told which
            cfg_coef=defaults.cfg_coef,
            temperature=defaults.temperature,
            n_q=defaults.n_q,
            padding_bonus=defaults.padding_bonus,
        )
        if settings is not None:
            store.apply_update(settings)
        store.voice = voice_from_kwargs(store.voice, voice=voice, voice_id=voice_id)
        problem = _settings_problem(store)
        if problem:
            raise InvalidInputError(f"KyutaiTTSService settings: {problem}")
        word_mode = text_aggregation_mode is None
        super().__init__(
            text_aggregation_mode=TextAggregationMode.SENTENCE if word_mode else text_aggregation_mode,
            push_text_frames=False,  # word timestamps drive the text frames
            push_start_frame=True,
            push_stop_frames=True,  # safety net; each context also gets an explicit stop frame
            pause_frame_processing=False,  # our audio always carries its context id
            append_trailing_space=True,  # so consecutive words reach the engine separated
            sample_rate=SAMPLE_RATE,
            settings=store,
            **kwargs,
        )
        self._word_aggregator: _WordAggregator | None = None
        if word_mode:
            # Pipecat has no word mode; its aggregator slot takes any BaseTextAggregator.
            self._word_aggregator = _WordAggregator(
                self._text_aggregator, lambda: bool(self._text_transforms or self._text_filters)
            )
            self._text_aggregator = self._word_aggregator
        engine_args: dict[str, Any] = {"device": device, "dtype": dtype, **(engine_kwargs or {})}
        if model is not None:
            engine_args["model"] = model
        if voice_repo is not None:
            engine_args["voice_repo"] = voice_repo
        self._loader = EngineLoader(engine_args, engine)
        self._loader.start()
        self._streams: dict[str, _Stream] = {}
        self._last_good_options: SessionOptions | None = None
        self._stopping = False
        self._keepalive_task: asyncio.Task[None] | None = None
        self._last_word_pts = 0  # as Pipecat's word timestamp tracker: the last word frame's PTS

    @property
    def engine(self) -> TTSBackend | None:
        """The backend, once loaded (None while the shared engine is still loading)."""
        return self._loader.engine

    async def wait_until_ready(self) -> TTSBackend:
        """Wait (without blocking the event loop) until the engine is loaded.

        Returns:
            The backend.

        Raises:
            KyutaiTTSError: The model could not be loaded (the message says why); the next
                utterance tries again.
        """
        return await self._loader.get()

    def can_generate_metrics(self) -> bool:
        """Check if this service can generate processing metrics.

        Returns:
            True: TTFB, TTFA and usage metrics are reported.
        """
        return True

    @property
    def supports_processing_metrics(self) -> bool:
        """Whether processing time means anything: no, `run_tts` returns before synthesis ends."""
        return False

    #
    # Lifecycle
    #

    async def start(self, frame: StartFrame) -> None:
        """Start the service; the engine keeps loading in the background if it is not ready.

        Args:
            frame: The start frame.
        """
        await super().start(frame)
        self._stopping = False
        if self._keepalive_task is None:
            self._keepalive_task = self.create_task(self._keep_contexts_alive(), name="kyutai-tts-keepalive")

    async def stop(self, frame: EndFrame) -> None:
        """Finish the open utterances, then stop.

        Args:
            frame: The end frame.
        """
        # The base waits for every open audio context to finish playing before it ends the turn,
        # and a turn the LLM never ended would only end on the idle timeout: speak the text still
        # held by the aggregator (the last word, which no whitespace ended) and flush the sessions
        # first. No new session opens afterwards.
        remaining = await self._text_aggregator.flush()
        if remaining is not None and self._turn_context_id:
            await self._handle_aggregated_text(self._aggregated_text_frame(remaining), self._turn_context_id)
        self._stopping = True
        for context_id, stream in list(self._streams.items()):
            await self._end_of_text(context_id, stream)
        await super().stop(frame)
        await self._release_all()

    async def cancel(self, frame: CancelFrame) -> None:
        """Stop every utterance at once.

        Args:
            frame: The cancel frame.
        """
        self._stopping = True
        await self._release_all()
        await super().cancel(frame)

    async def cleanup(self) -> None:
        """Release every engine session and task (idempotent)."""
        await super().cleanup()
        await self._release_all()

    async def push_frame(self, frame: Frame, direction: FrameDirection = FrameDirection.DOWNSTREAM) -> None:
        """Push a frame; follow each context's audio into playback, and hold back unheard text.

        Args:
            frame: The frame to push.
            direction: The direction to push it in.
        """
        if direction == FrameDirection.DOWNSTREAM:
            context_id = getattr(frame, "context_id", None)
            stream = self._streams.get(context_id) if context_id else None
            if isinstance(frame, TTSTextFrame):
                if frame.pts:
                    self._last_word_pts = max(self._last_word_pts, frame.pts)
                if stream is not None and not stream.ended_ok:
                    # Text no word timing accounted for, of a session that failed or was lost
                    # (Pipecat completes the context's text at its end): it was never heard, so
                    # it must not reach the assistant context.
                    if stream.text_frames_passed >= stream.words_released:
                        return
                    stream.text_frames_passed += 1
            elif isinstance(frame, TTSAudioRawFrame) and stream is not None:
                self._track_playback(stream, frame)
        await super().push_frame(frame, direction)

    def _track_playback(self, stream: _Stream, frame: TTSAudioRawFrame) -> None:
        """Where this frame plays: right after the previous one, or now if playback ran dry."""
        now = self.get_clock().get_time()
        duration = len(frame.audio) / (2 * frame.sample_rate * frame.num_channels)
        if stream.play_end_ns is None:
            # The first frame: Pipecat starts timing the context's words here (same baseline).
            stream.play_end_ns = max(self._last_word_pts, now)
        elif now > stream.play_end_ns:
            # An underrun: the listener heard a gap before this frame; later words shift by it.
            stream.shift_s += (now - stream.play_end_ns) / 1e9
            stream.play_end_ns = now
        stream.play_end_ns += round(duration * 1e9)
        stream.pushed_s += duration
        stream.pushed.set()

    async def _keep_contexts_alive(self) -> None:
        """Refresh every open session's audio context, so that Pipecat's idle timeout never ends
        one during a silence that is normal here: waiting for the model, a slot, or the LLM."""
        while True:
            # Often: a busy event loop may run the timeout before a late refresh.
            interval = min(0.5, self._stop_frame_timeout_s / 10)
            await asyncio.sleep(interval)
            for context_id, stream in list(self._streams.items()):
                if not stream.done and self.audio_context_available(context_id):
                    self._refresh_audio_context(context_id)

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Process a frame; after an interruption, also end sessions Pipecat no longer tracks.

        Args:
            frame: The frame to process.
            direction: The direction of the frame.
        """
        await super().process_frame(frame, direction)
        if isinstance(frame, InterruptionFrame):
            # `on_audio_context_interrupted` covers every registered context; a session whose
            # context Pipecat already ended (idle timeout) would otherwise keep its slot.
            live = set(self.get_audio_contexts())
            for context_id in [c for c in self._streams if c not in live]:
                await self._release(context_id)

    #
    # Synthesis
    #

    @traced_tts
    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        """Hand text (a word, a sentence or a whole speak request) to the context's session.

        Args:
            text: The text to speak.
            context_id: The audio context (one LLM turn or one speak request).

        Yields:
            None: the audio arrives from the session's consumer task.
        """
        stream = self._streams.get(context_id)
        if stream is None:
            if self._stopping:
                yield None
                return
            # Registered before the engine is ready, so that the keepalive covers the wait.
            stream = self._streams[context_id] = _Stream(session=None)
            try:
                await self._open(context_id, stream)
            except Exception as exc:
                # The rest of this context's text is ignored; the context closes when its text ends
                # (closing it now would let the next word reopen it and fail again).
                await self.push_error_frame(_error_frame(exc))
                stream.done = True
                yield None
                return
        if stream.session is not None and not stream.done and not stream.flushed:
            try:
                stream.session.push_text(text)
            except Exception as exc:  # e.g. a remote session whose connection dropped
                await self.push_error_frame(_error_frame(exc))
                stream.session.cancel()
                stream.done = True
            else:
                stream.text += text
        yield None

    async def flush_audio(self, context_id: str | None = None) -> None:
        """The text of this context is complete: the session speaks the rest, then ends.

        Args:
            context_id: The context to flush.
        """
        stream = self._streams.get(context_id) if context_id else None
        if stream is not None:
            await self._end_of_text(context_id, stream)

    async def on_turn_context_completed(self) -> None:
        """End of an LLM turn or speak request: make sure its session is flushed."""
        context_id = self._turn_context_id
        await super().on_turn_context_completed()
        # The base flushes only contexts still registered; one that ended on the idle timeout
        # would keep its session (and engine slot) open forever.
        stream = self._streams.get(context_id) if context_id else None
        if stream is not None and not stream.flushed:
            await self._end_of_text(context_id, stream)

    async def on_audio_context_interrupted(self, context_id: str) -> None:
        """Cancel the context's session: its audio stops and its engine slot is freed.

        Args:
            context_id: The interrupted context.
        """
        await self._release(context_id)
        await super().on_audio_context_interrupted(context_id)

    async def on_audio_context_completed(self, context_id: str) -> None:
        """Forget a context that finished playing.

        Args:
            context_id: The completed context.
        """
        stream = self._streams.get(context_id)
        if stream is not None and stream.done:
            del self._streams[context_id]
        await super().on_audio_context_completed(context_id)

    async def _update_settings(self, delta: TTSSettings) -> dict[str, Any]:
        """Apply a settings delta; bad values are reported and the previous ones kept.

        Args:
            delta: The settings delta.

        Returns:
            The changed fields with their previous values.
        """
        changed = await super()._update_settings(delta)
        problem = _settings_problem(self._settings)
        if problem:
            for name, previous in changed.items():
                setattr(self._settings, name, previous)
            await self.push_error(
                error_msg=f"Kyutai TTS: rejected settings update: {problem}; the previous settings stay",
                category=ErrorCategory.APPLICATION,
            )
            return {}
        self._warn_unhandled_updated_settings({"model", "language"} & changed.keys())
        return changed

    #
    # Internals
    #

    def _session_options(self) -> SessionOptions:
        s = self._settings
        return SessionOptions(
            voice=s.voice or None,
            cfg_coef=float(s.cfg_coef),
            temperature=float(s.temperature),
            n_q=int(s.n_q),
            padding_bonus=float(s.padding_bonus),
        )

    async def _open(self, context_id: str, stream: _Stream) -> None:
        engine = await self.wait_until_ready()
        options = self._session_options()
        try:
            session = engine.open_session(options)
        except InvalidInputError as exc:
            good = self._last_good_options
            if good is None or good == options:
                raise
            # A setting the engine rejects (unknown voice, unsupported cfg_coef...): keep talking
            # with the last settings that worked, and say what to fix.
            self._restore_settings(good)
            await self.push_error(
                error_msg=(
                    f"Kyutai TTS: {exc}. Speaking with the previous settings (voice={good.voice}, "
                    f"cfg_coef={good.cfg_coef}, n_q={good.n_q}); send a TTSUpdateSettingsFrame with "
                    "a valid value"
                ),
                exception=exc,
                category=ErrorCategory.APPLICATION,
            )
            options = good
            session = engine.open_session(options)
        self._last_good_options = options
        if self._max_lead_s is not None and hasattr(session, "max_buffered_frames"):
            # Pacing holds the events back; the engine must not run on into its own buffer.
            session.max_buffered_frames = 2
        stream.session = session
        stream.consumer = self.create_task(self._consume(context_id, stream), name=f"kyutai-tts-{context_id}")

    def _restore_settings(self, options: SessionOptions) -> None:
        self._settings.voice = options.voice
        for name in _NUMERIC_FIELDS:
            setattr(self._settings, name, getattr(options, name))

    async def _consume(self, context_id: str, stream: _Stream) -> None:
        """Move the session's audio and word timings into its audio context, in order."""
        assert stream.session is not None
        got_audio = False
        words: list[WordTiming] = []  # reported before the audio they start in
        try:
            async for event in stream.session:
                if isinstance(event, AudioChunk):
                    await self._pace(stream)
                    got_audio = True
                    audio = TTSAudioRawFrame(event.pcm16(), SAMPLE_RATE, 1, context_id=context_id)
                    await self.append_to_audio_context(context_id, audio)
                    stream.appended_s += FRAME_DURATION_S
                    # A word goes behind the frame it starts in: when Pipecat times it, the
                    # frame has been pushed, and any gap before it is known.
                    frame = _frame_index(event.start_s)
                    due = [w for w in words if _frame_index(w.start_s) <= frame]
                    words = [w for w in words if _frame_index(w.start_s) > frame]
                    await self._add_words(context_id, stream, due)
                else:
                    words.append(event)
            await self._add_words(context_id, stream, words)
            stream.ended_ok = True
        except Exception as exc:
            await self.push_error_frame(_error_frame(exc))
        stream.done = True
        stream.got_audio = got_audio
        # A session ends by itself only after its flush, unless it failed: then the context stays
        # open until its text ends, so that the turn's later words do not reopen it.
        if stream.flushed:
            await self._close_context(context_id, got_audio)

    async def _add_words(self, context_id: str, stream: _Stream, words: list[WordTiming]) -> None:
        for word in words:
            # Report the text as the LLM wrote it (punctuation and all), which is what Pipecat
            # matches against; the unspeakable characters before a word ride with it.
            label = word.text.strip()
            if label and self.audio_context_available(context_id):
                await self.append_to_audio_context(
                    context_id, _HeardWord(label, word.start_s, context_id, stream)
                )

    async def _pace(self, stream: _Stream) -> None:
        """Wait while this utterance is `max_lead_s` or more ahead of its playback."""
        if self._max_lead_s is None:
            return
        clock = self.get_clock()
        while (lead := stream.lead_s(clock.get_time())) >= self._max_lead_s:
            stream.pushed.clear()
            # Woken by a frame pushed to playback, or when enough of it has played.
            wait = min(max(lead - self._max_lead_s, 0.01), 0.5)
            try:
                await asyncio.wait_for(stream.pushed.wait(), timeout=wait)
            except TimeoutError:
                pass

    async def _close_context(self, context_id: str, got_audio: bool) -> None:
        if not self.audio_context_available(context_id):
            return
        if not got_audio:
            # Pipecat reports a context that ends without audio as a failed synthesis and, after a
            # few in a row, stops using the service; a reply with nothing to say is not a failure.
            silence = TTSAudioRawFrame(EMPTY_REPLY_PCM16, SAMPLE_RATE, 1, context_id=context_id)
            await self.append_to_audio_context(context_id, silence)
        await self.append_to_audio_context(context_id, TTSStoppedFrame(context_id=context_id))
        await self.remove_audio_context(context_id)

    async def _end_of_text(self, context_id: str, stream: _Stream) -> None:
        """No more text for this context: the session speaks the rest (or the failed one closes)."""
        if stream.flushed:
            return
        stream.flushed = True
        if stream.text.strip():
            await self.start_tts_usage_metrics(stream.text.strip())
        if stream.done:
            await self._close_context(context_id, stream.got_audio)
        elif stream.session is not None:
            stream.session.flush()

    async def _release(self, context_id: str) -> None:
        stream = self._streams.pop(context_id, None)
        if stream is None:
            return
        if stream.session is not None:
            stream.session.cancel()
        if stream.consumer is not None and stream.consumer is not asyncio.current_task():
            await self.cancel_task(stream.consumer)

    async def _release_all(self) -> None:
        for context_id in list(self._streams):
            await self._release(context_id)
        if self._keepalive_task is not None:
            await self.cancel_task(self._keepalive_task)
            self._keepalive_task = None


def _settings_problem(s: KyutaiTTSSettings) -> str | None:
    """What is wrong with these settings (the engine's own checks), or None."""
    try:
        session_options(voice=s.voice, **{name: getattr(s, name) for name in _NUMERIC_FIELDS})
    except InvalidInputError as exc:
        return str(exc)
    return None


def _frame_index(t: float) -> int:
    """The 80 ms frame a time falls in (engine times are whole frames)."""
    return round(t / FRAME_DURATION_S)


# A `RemoteTTS` failure's category, by its kind. A refused request (a wrong key, a text over the
# server's limits) is the application's to fix, not a verdict on the service: no permanent category,
# which would write the service off for the rest of the call.
_REMOTE_CATEGORIES: dict[RemoteErrorKind, ErrorCategory] = {
    RemoteErrorKind.CONNECT_FAILED: ErrorCategory.CONNECTIVITY,
    RemoteErrorKind.CONNECTION_LOST: ErrorCategory.CONNECTIVITY,
    RemoteErrorKind.TIMEOUT: ErrorCategory.CONNECTIVITY,
    RemoteErrorKind.REFUSED: ErrorCategory.SERVER,
    RemoteErrorKind.BAD_REQUEST: ErrorCategory.APPLICATION,
}


def _error_frame(exc: BaseException) -> ErrorFrame:
    """An ErrorFrame whose message says what to do; never one that writes the service off."""
    if isinstance(exc, RemoteError):
        category = _REMOTE_CATEGORIES[exc.kind]
    elif isinstance(exc, (EngineFullError, EngineTimeoutError)):
        category = ErrorCategory.RATE_LIMIT
    elif isinstance(exc, InvalidInputError):
        category = ErrorCategory.APPLICATION
    elif isinstance(exc, (EngineFailure, KyutaiTTSError)):
        category = ErrorCategory.SERVER
    else:
        category = ErrorCategory.UNKNOWN
    if isinstance(exc, KyutaiTTSError):
        message = f"Kyutai TTS: {exc}"
    else:
        message = f"Kyutai TTS failed unexpectedly ({exc!r}); this utterance is not spoken"
    return ErrorFrame(error=message, exception=exc, category=category)
