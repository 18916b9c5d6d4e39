"""Kyutai streaming TTS as a Pipecat service."""

from .tts import KyutaiTTSService, KyutaiTTSSettings

__all__ = ["KyutaiTTSService", "KyutaiTTSSettings"]
