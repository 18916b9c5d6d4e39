"""LiveKit Agents adapter: ``AgentSession(tts=kyutai_tts_plugin.livekit.TTS(), ...)``.

Importing this module registers a LiveKit plugin whose ``download_files`` hook fetches the model and
the default voice into the Hugging Face cache, so ``python agent.py download-files`` prepares a
machine ahead of time.
"""

from __future__ import annotations

import logging

from livekit.agents import Plugin

from .tts import TTS, SynthesizeStream

__all__ = ["TTS", "SynthesizeStream"]

logger = logging.getLogger("kyutai_tts_plugin.livekit")


class KyutaiPlugin(Plugin):
    def __init__(self) -> None:
        super().__init__("kyutai-tts", "0.1.0", __package__ or "kyutai_tts_plugin.livekit", logger)

    def download_files(self) -> None:
        from ..checkpoint import (
            DEFAULT_MODEL_REPO,
            DEFAULT_VOICE,
            DEFAULT_VOICE_REPO,
            VoiceLibrary,
            resolve_checkpoint,
        )

        files = resolve_checkpoint(DEFAULT_MODEL_REPO)  # config.json, LM, Mimi and tokenizer
        VoiceLibrary(DEFAULT_VOICE_REPO, suffix=files.config.voice_suffix).resolve(DEFAULT_VOICE)


# LiveKit requires registration on the main thread: import this module at the top of your agent.
Plugin.register_plugin(KyutaiPlugin())
