"""Plain data exchanged between the engine and its users (adapters, CLI, server)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

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


@dataclass(frozen=True)
class SessionOptions:
    """Per-session generation settings, fixed when the session opens."""

    voice: str | None = None  # None: the engine's default voice
    cfg_coef: float = 2.0
    temperature: float = 0.6  # 0 = greedy decoding
    top_k: int = 250  # audio tokens
    top_k_text: int = 25
    n_q: int = 32  # audio codebooks generated (1..checkpoint n_q)
    padding_bonus: float = 0.0  # > 0 speaks slower, < 0 faster
    seed: int | None = None
    other_voice: str | None = None  # dialog only: the voice of the second speaker (see next_turn)


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
