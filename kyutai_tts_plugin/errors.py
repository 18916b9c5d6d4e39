"""Errors raised by the engine and the remote client. Each message says what went wrong and what to do
about it."""

from __future__ import annotations

from enum import Enum


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


class RemoteErrorKind(str, Enum):
    """What went wrong between a `RemoteTTS` and its server, for callers that decide what to do next
    (retry, fall back, report) without reading messages."""

    CONNECT_FAILED = "connect_failed"
    """No connection could be made (the server is down, unreachable, or not listening)."""
    CONNECTION_LOST = "connection_lost"
    """The connection dropped during the session without the server closing it."""
    TIMEOUT = "timeout"
    """Connecting, or a wait the server bounds (an idle client, a session too long), took too long."""
    REFUSED = "refused"
    """The server refused or ended the session for a reason of its own (an engine error, a close
    code, a message it garbled): the same request may succeed later."""
    BAD_REQUEST = "bad_request"
    """The server refused the request itself (a wrong API key, a text over its limits, a route that is
    not the streaming one): the same request fails the same way until it is changed."""


class RemoteError(EngineFailure):
    """The server could not be reached, or refused or ended the session.

    ``kind`` says which (`RemoteErrorKind`), set where the failure is seen; ``code`` is the server's
    own error code when it sent one (our server does, moshi-server does not).
    """

    def __init__(self, message: str, kind: RemoteErrorKind, code: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.code = code
