"""LiveKit Agents adapter: ``AgentSession(tts=kyutai_tts_plugin.livekit.TTS(), ...)``.

Importing this module (or ``livekit.plugins.kyutai_tts``, the same classes under LiveKit's plugin
namespace) registers a LiveKit plugin whose ``download_files`` hook fetches the model and the default
voice that `TTS()` will load (``KYUTAI_TTS_MODEL`` / ``KYUTAI_TTS_VOICES``, else the defaults) into
the Hugging Face cache, so ``python -m livekit.agents download-files`` prepares a machine ahead of time.
"""

from __future__ import annotations

import logging
from importlib import metadata

from livekit.agents import Plugin

from .tts import TTS, SynthesizeStream, configured_model, configured_voice_repo

__all__ = ["TTS", "SynthesizeStream", "KyutaiPlugin"]

logger = logging.getLogger("livekit.plugins.kyutai_tts")

try:
    __version__ = metadata.version("kyutai-tts-plugin")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"


class KyutaiPlugin(Plugin):
    def __init__(self) -> None:
        super().__init__("kyutai-tts", __version__, "livekit.plugins.kyutai_tts", logger)

    def download_files(self) -> None:
        from ..checkpoint import DEFAULT_VOICE, VoiceLibrary, resolve_checkpoint

        model, voices = configured_model(), configured_voice_repo()
        logger.info(
            "Kyutai TTS: fetching the model %s and the voice %s from %s", model, DEFAULT_VOICE, voices
        )
        files = resolve_checkpoint(model)  # config.json, LM, Mimi and tokenizer
        VoiceLibrary(voices, suffix=files.config.voice_suffix).resolve(DEFAULT_VOICE)


# LiveKit requires registration on the main thread: import this module at the top of your agent.
Plugin.register_plugin(KyutaiPlugin())
