"""Kyutai TTS as a LiveKit Agents plugin: ``from livekit.plugins import kyutai_tts``.

The same classes as `kyutai_tts_plugin.livekit`, under the ``livekit.plugins`` namespace where
``python -m livekit.agents download-files`` looks for plugins: importing it registers the plugin
whose `download_files` hook fetches the model and voices named by ``KYUTAI_TTS_MODEL`` /
``KYUTAI_TTS_VOICES`` (else ``kyutai/tts-1.6b-en_fr`` and ``kyutai/tts-voices``).
"""

from kyutai_tts_plugin.livekit import TTS, KyutaiPlugin, SynthesizeStream

__all__ = ["TTS", "SynthesizeStream", "KyutaiPlugin"]
