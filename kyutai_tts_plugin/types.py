"""Plain data exchanged between the engine and its users (adapters, CLI, server)."""

from __future__ import annotations

import math
import numbers
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .errors import InvalidInputError

SAMPLE_RATE = 24000
FRAME_SIZE = 1920  # one Mimi frame: 80 ms at 24 kHz
FRAME_DURATION_S = FRAME_SIZE / SAMPLE_RATE


@dataclass(frozen=True)
class AudioChunk:
    """One 80 ms frame of 24 kHz mono audio, float32 in [-1, 1]."""

    pcm: np.ndarray
    start_s: float  # position of the first sample on the session's audio timeline

    def pcm16(self) -> bytes:
        """The frame as 16-bit little-endian PCM bytes (what Pipecat and LiveKit carry)."""
        return (np.clip(self.pcm, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


@dataclass(frozen=True)
class WordTiming:
    """When a word is spoken on the session's audio timeline.

    ``word`` is the word as the engine tokenized it (punctuation attached, e.g. ``"world,"``).
    ``text`` is the exact slice of the pushed text that this word accounts for, with the whitespace
    (and any characters that produce no speech) before it, so that joining ``text`` over all
    timings of a session gives back exactly the text that was pushed.
    """

    word: str
    start_s: float
    end_s: float
    text: str


@dataclass(frozen=True, eq=False)
class VoicePrompt:
    """A voice given as audio: a short recording of the speaker (raw PCM), for a model that takes its
    voice as an audio prefix (``kyutai/tts-0.75b-en-public``). The engine resamples it to 24 kHz, keeps
    1 to `max_prompt_s` seconds of it (errors otherwise) and encodes it once per content.

    Only clone the voice of a speaker who agreed to it.
    """

    pcm: np.ndarray  # float (or int16) samples, mono [S] or [S, channels] (channels are averaged)
    sample_rate: int = SAMPLE_RATE

    def __repr__(self) -> str:
        shape = getattr(self.pcm, "shape", None)
        return f"VoicePrompt(pcm=<{shape}>, sample_rate={self.sample_rate})"


# Accepted ranges of the per-session options (see `SessionOptions.validate`).
MAX_VOICE_CHARS = 256
MAX_TEMPERATURE = 5.0
# Below this a temperature is refused rather than sampled: logits / 1e-320 overflow to inf and softmax
# returns NaNs. 0 is the way to ask for greedy decoding, so a tiny positive value is a mistake to report.
MIN_SAMPLING_TEMPERATURE = 1e-6
MAX_PADDING_BONUS = 10.0  # a logit offset: beyond a few units it only ever pads (or never does)
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed


@dataclass(frozen=True)
class SessionOptions:
    """Per-session generation settings, fixed when the session opens.

    Every backend checks them with `validate` when the session is opened (bad values raise
    `InvalidInputError` naming the field and its accepted range).
    """

    # None: the engine's default voice. A voice name, or for a model that takes audio prompts
    # (kyutai/tts-0.75b-en-public) also a WAV/FLAC/MP3 file path or a VoicePrompt (raw PCM).
    voice: str | VoicePrompt | None = None
    cfg_coef: float = 2.0  # one of the checkpoint's values (1.0..4.0 by 0.5 for kyutai/tts-1.6b-en_fr)
    temperature: float = 0.6  # 0 = greedy decoding; otherwise MIN_SAMPLING_TEMPERATURE..MAX_TEMPERATURE
    top_k: int = 250  # audio tokens (0 = no top-k); at most the audio vocabulary
    top_k_text: int = 25  # text tokens (0 = no top-k); at most the text vocabulary
    n_q: int = 32  # audio codebooks generated, 1..32; above the checkpoint's (16 for 0.75B): all of them
    padding_bonus: float = 0.0  # > 0 speaks slower, < 0 faster; -MAX_PADDING_BONUS..MAX_PADDING_BONUS
    seed: int | None = None  # 0..MAX_SEED; None: a random seed
    other_voice: str | None = None  # dialog only: the voice of the second speaker (see next_turn)

    def validate(
        self,
        *,
        n_q_max: int | None = None,
        cfg_values: Sequence[float] = (),
        audio_vocab: int | None = None,
        text_vocab: int | None = None,
    ) -> None:
        """Raise `InvalidInputError` for any field of the wrong type or out of range.

        The model-dependent bounds are checked when given: ``n_q_max`` (the checkpoint's codebooks),
        ``cfg_values`` (its CFG coefficients; empty: any finite value), ``audio_vocab`` / ``text_vocab``
        (largest useful top_k / top_k_text). A client without the model (RemoteTTS) leaves them out and
        the server checks them.
        """
        for name in ("voice", "other_voice"):
            _check_voice(name, getattr(self, name))
        cfg_coef = _number("cfg_coef", self.cfg_coef, "a number")
        if cfg_values and cfg_coef not in cfg_values:
            raise InvalidInputError(
                f"cfg_coef={cfg_coef} is not supported by this checkpoint; use one of "
                + ", ".join(f"{v:g}" for v in cfg_values)
            )
        temperature = _number(
            "temperature",
            self.temperature,
            f"0 (greedy) or {MIN_SAMPLING_TEMPERATURE:g}..{MAX_TEMPERATURE:g}",
        )
        if not (temperature == 0 or MIN_SAMPLING_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
            raise InvalidInputError(
                f"temperature={temperature:g} is out of range; use 0 (greedy) or "
                f"{MIN_SAMPLING_TEMPERATURE:g}..{MAX_TEMPERATURE:g}"
            )
        _integer("top_k", self.top_k, 0, audio_vocab)
        _integer("top_k_text", self.top_k_text, 0, text_vocab)
        _integer("n_q", self.n_q, 1, n_q_max)
        bonus = _number("padding_bonus", self.padding_bonus, f"-{MAX_PADDING_BONUS:g}..{MAX_PADDING_BONUS:g}")
        if not -MAX_PADDING_BONUS <= bonus <= MAX_PADDING_BONUS:
            raise InvalidInputError(
                f"padding_bonus={bonus:g} is out of range; use -{MAX_PADDING_BONUS:g}..{MAX_PADDING_BONUS:g}"
            )
        if self.seed is not None:
            _integer("seed", self.seed, 0, MAX_SEED, hint="0..2**63-1, or None for a random seed")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_voice(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, VoicePrompt):
        if name != "voice":
            raise InvalidInputError(f"{name}: a VoicePrompt can only be the main voice (voice=...)")
        pcm, rate = value.pcm, value.sample_rate
        if not isinstance(pcm, np.ndarray) or pcm.ndim not in (1, 2) or pcm.size == 0:
            raise InvalidInputError(
                f"voice: VoicePrompt.pcm must be a non-empty numpy array [samples] or [samples, "
                f"channels], got {_shown(getattr(pcm, 'shape', pcm))}"
            )
        if not (np.issubdtype(pcm.dtype, np.floating) or pcm.dtype == np.int16):
            raise InvalidInputError(f"voice: VoicePrompt.pcm must be float or int16 samples, got {pcm.dtype}")
        if not isinstance(rate, numbers.Integral) or isinstance(rate, bool) or not 8000 <= rate <= 192000:
            raise InvalidInputError(
                f"voice: VoicePrompt.sample_rate={_shown(rate)} is invalid; use the rate in Hz (8000..192000)"
            )
        return
    if not isinstance(value, str) or not value or len(value) > MAX_VOICE_CHARS:
        raise InvalidInputError(
            f"{name}={_shown(value)} is invalid; use None (the default) or a voice name of 1 to "
            f"{MAX_VOICE_CHARS} characters"
        )


def _number(name: str, value: Any, accepted: str) -> float:
    """`value` as a finite float; bools, strings and NaN/inf are refused (`accepted` says what is)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range
            number = math.inf
        if math.isfinite(number):
            return number
    raise InvalidInputError(f"{name}={_shown(value)} is invalid; use a finite number, {accepted}")


def _integer(name: str, value: Any, low: int, high: int | None, hint: str | None = None) -> None:
    accepted = hint or (f"{low}..{high}" if high is not None else f">= {low}")
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise InvalidInputError(f"{name}={_shown(value)} is invalid; use an integer, {accepted}")
    if value < low or (high is not None and value > high):
        raise InvalidInputError(f"{name}={_shown(value)} is out of range; use {accepted}")


SessionEvent = AudioChunk | WordTiming


class TTSSession(Protocol):
    """A streaming synthesis of one utterance (one LLM turn, one speak request).

    Text goes in as raw LLM fragments; 80 ms audio chunks and word timings come out, in order, from
    ``async for`` (or plain ``for`` on the in-process engine). Every method is non-blocking and safe to
    call from an asyncio event loop or any thread.
    """

    @property
    def id(self) -> str: ...

    def push_text(self, fragment: str) -> None:
        """Append raw text (any split, even mid-word). Raises ``SessionClosedError`` after flush/cancel."""

    def flush(self) -> None:
        """The text is complete: speak everything left, then end the event stream."""

    def cancel(self) -> None:
        """Stop now: no more events are produced and the engine slot is freed."""

    def __aiter__(self) -> AsyncIterator[SessionEvent]: ...


class TTSBackend(Protocol):
    """What the framework adapters need: the in-process ``TTSEngine`` or a remote client."""

    @property
    def sample_rate(self) -> int: ...

    def open_session(self, options: SessionOptions | None = None) -> TTSSession:
        """Open a session. Raises ``EngineFullError`` when every slot and the wait queue are taken,
        ``InvalidInputError``/``VoiceNotFoundError`` for bad options."""

    def list_voices(self) -> list[str]: ...
