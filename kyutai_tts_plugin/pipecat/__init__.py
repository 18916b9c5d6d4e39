"""Pipecat adapter: `KyutaiTTSService` drops into a pipeline in place of any TTS service."""

from .tts import KyutaiTTSService, KyutaiTTSSettings

__all__ = ["KyutaiTTSService", "KyutaiTTSSettings"]
