"""Errors raised by the engine. Each message says what went wrong and what to do about it."""

from __future__ import annotations


class KyutaiTTSError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidInputError(KyutaiTTSError, ValueError):
    """The caller passed something the engine cannot use (bad option, text after flush, ...)."""


class SessionClosedError(InvalidInputError):
    """Text or a flush arrived after the session was flushed or cancelled."""


class VoiceNotFoundError(InvalidInputError):
    """The requested voice is not in the voice repository or directory."""


class CheckpointError(KyutaiTTSError):
    """A checkpoint file is missing, truncated, or does not match config.json."""


class EngineFullError(KyutaiTTSError):
    """Every slot is busy and the wait queue is full."""


class EngineTimeoutError(KyutaiTTSError, TimeoutError):
    """A session waited in the queue longer than the engine's ``queue_timeout_s``."""


class EngineFailure(KyutaiTTSError):
    """The engine's stepping loop failed; the session cannot produce more audio."""
