"""Kyutai streaming TTS (DSM) in-process, for Pipecat and LiveKit Agents."""

from .errors import (
    CheckpointError,
    EngineFailure,
    EngineFullError,
    EngineTimeoutError,
    InvalidInputError,
    KyutaiTTSError,
    RemoteError,
    RemoteErrorKind,
    SessionClosedError,
    VoiceNotFoundError,
)
from .types import AudioChunk, SessionOptions, TTSBackend, TTSSession, VoicePrompt, WordTiming

__all__ = [
    "AudioChunk",
    "CheckpointError",
    "EngineFailure",
    "EngineFullError",
    "EngineTimeoutError",
    "InvalidInputError",
    "KyutaiTTSError",
    "RemoteError",
    "RemoteErrorKind",
    "SessionClosedError",
    "SessionOptions",
    "StreamingSession",
    "TTSBackend",
    "TTSEngine",
    "TTSSession",
    "VoiceNotFoundError",
    "VoicePrompt",
    "WordTiming",
    "shared_engine",
]


def __getattr__(name: str) -> object:
    # The engine pulls in torch; keep `import kyutai_tts_plugin` light for adapters' type imports.
    if name in ("TTSEngine", "StreamingSession", "shared_engine"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(name)
