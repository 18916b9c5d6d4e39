"""Voices given as audio, for a model that takes its voice as an audio prefix (no speaker
cross-attention: ``kyutai/tts-0.75b-en-public``).

A prompt (a WAV/FLAC/MP3/OGG file, or raw PCM) is read with `soundfile`, mixed down to mono, resampled
to Mimi's 24 kHz with `soxr`, checked for length, and Mimi-encoded once: the codes are cached by the
content hash of the 24 kHz samples. As the reference does it (moshi's ``TTSModel.get_prefix``), the
encoding is the non-streaming one (the end zero-padded to a whole frame) and its last two frames are
dropped; the engine then forces these codes at the start of generation while the text is held at the
zero token, and does not send that audio to the listener.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from .errors import InvalidInputError
from .mimi import MimiModel
from .types import SAMPLE_RATE, VoicePrompt

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg")
MIN_PROMPT_S = 1.0
DROPPED_FRAMES = 2  # the reference drops the last two encoded frames of a prompt
PROMPT_CACHE_SIZE = 64  # encoded prompts kept (least recently used dropped first)

PROMPT_MODEL = (
    "this model takes its voice as an audio prompt (no speaker embeddings, like kyutai/tts-0.75b-en-public)"
)
EMBEDDING_MODEL = (
    "this model takes its voice as a speaker embedding (like kyutai/tts-1.6b-en_fr): a voice name of "
    "its voice repository (kyutai/tts-voices) or a .safetensors embedding file"
)


def is_audio_path(voice: str) -> bool:
    """Whether `voice` names an audio file by its extension (it may not exist)."""
    return voice.lower().endswith(AUDIO_EXTENSIONS)


def local_audio_file(voice: str) -> Path | None:
    """`voice` as an existing local audio file, else None (a voice name)."""
    if not is_audio_path(voice):
        return None
    path = Path(voice).expanduser()
    return path if path.is_file() else None


def read_audio(path: str | os.PathLike[str] | BinaryIO, shown: str | None = None) -> VoicePrompt:
    """The samples of an audio file (a path or a binary file object); InvalidInputError if it cannot be
    decoded. `shown`: the name the message uses for the file (a server hides its own paths)."""
    import soundfile

    source = path if hasattr(path, "read") else os.fspath(path)  # type: ignore[arg-type]
    name = shown if shown is not None else str(source)
    try:
        pcm, rate = soundfile.read(source, dtype="float32", always_2d=True)
    except (RuntimeError, OSError, ValueError, TypeError) as exc:  # LibsndfileError is a RuntimeError
        raise InvalidInputError(
            f"voice prompt {name!r} cannot be read as audio ({type(exc).__name__}: {exc}); "
            f"{PROMPT_MODEL} and expects a WAV, FLAC, MP3 or OGG file of 1 s or more"
        ) from None
    return VoicePrompt(pcm, int(rate))


def prompt_pcm(prompt: VoicePrompt, max_prompt_s: float, shown: str = "the voice prompt") -> np.ndarray:
    """Mono float32 samples at 24 kHz, checked: 1 s to `max_prompt_s` of audio, finite values."""
    pcm = np.asarray(prompt.pcm)
    if pcm.dtype == np.int16:
        pcm = pcm.astype(np.float32) / 32768.0
    pcm = pcm.astype(np.float32, copy=False)
    if pcm.ndim == 2:
        pcm = pcm.mean(axis=1, dtype=np.float32) if pcm.shape[1] > 1 else pcm[:, 0]
    seconds = pcm.shape[0] / prompt.sample_rate if pcm.ndim == 1 else 0.0
    expects = f"{PROMPT_MODEL} and expects {MIN_PROMPT_S:g} to {max_prompt_s:g} s of the speaker"
    if pcm.ndim != 1 or pcm.shape[0] == 0:
        raise InvalidInputError(f"{shown} is empty; {expects}")
    if seconds < MIN_PROMPT_S:
        raise InvalidInputError(f"{shown} lasts {seconds:.2f} s, too short; {expects}")
    if seconds > max_prompt_s:
        raise InvalidInputError(f"{shown} lasts {seconds:.1f} s, too long; {expects} (trim it)")
    if not np.isfinite(pcm).all():
        raise InvalidInputError(f"{shown} has NaN or infinite samples; {expects}")
    if prompt.sample_rate != SAMPLE_RATE:
        import soxr

        pcm = soxr.resample(pcm, prompt.sample_rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(pcm)


class PromptEncoder:
    """Mimi codes of voice prompts, cached by the content hash of their 24 kHz samples."""

    def __init__(self, mimi: MimiModel, n_q: int, max_prompt_s: float) -> None:
        self.mimi = mimi
        self.n_q = n_q
        self.max_prompt_s = max_prompt_s
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def codes(self, prompt: VoicePrompt, shown: str = "the voice prompt") -> torch.Tensor:
        """The prefix codes [n_q, frames] of a prompt (encoded once per content)."""
        pcm = prompt_pcm(prompt, self.max_prompt_s, shown)
        key = hashlib.sha256(pcm.tobytes()).hexdigest()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        device = next(self.mimi.parameters()).device
        with torch.no_grad():
            codes = self.mimi.encode(torch.from_numpy(pcm).to(device)[None, None], self.n_q)[0]
        codes = codes[:, :-DROPPED_FRAMES].contiguous()
        with self._lock:
            self._cache[key] = codes
            while len(self._cache) > PROMPT_CACHE_SIZE:
                self._cache.popitem(last=False)
        return codes
