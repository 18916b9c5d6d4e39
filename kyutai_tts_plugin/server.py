"""`kyutai-tts serve`: one engine shared by many agent workers over the network.

The websocket route speaks the protocol of Kyutai's ``moshi-server`` (TTS "Py" module), and with default
options behaves as it does, so Kyutai's own clients (Unmute, ``scripts/tts_rust_server.py``) work against
it unchanged (docs/moshi-server-protocol.md has the facts, the README the table of differences):

* ``GET /api/tts_streaming`` (websocket). Query: ``voice`` (unknown: the default voice), ``format``
  (``OggOpus``, the default, ``OggOpusMessagePack``, ``PcmMessagePack``, ``Pcm``), ``auth_id``. Only with
  ``allow_client_params``, our extensions ``temperature``, ``top_k``, ``top_k_text``, ``seed``,
  ``cfg_alpha`` (= cfg_coef), ``n_q``, ``padding_bonus``; otherwise ignored, as moshi-server does. API key
  in the ``kyutai-api-key`` header (or ``auth_id``). Client -> server, msgpack maps: ``{"type": "Voice",
  "embeddings": [float], "shape": [1, dim, T]}`` (a speaker embedding, before the first Text),
  ``{"type": "Text", "text": str}`` (whole words; each message ends at a word boundary), ``{"type":
  "Eos"}``; also a websocket text frame (= Text) and the binary frame ``b"\\0"`` (= Eos). Server ->
  client: ``Ready``, then ``Text {text, start_s, stop_s}`` (word timings on the audio timeline) and
  ``Audio {pcm: 1920 float32}`` (or ``OggOpus {data}``) in order, then a normal close (1000); or ``Error
  {message, code}`` followed by a close with a reason (every refusal, aiohttp's own included). When every
  engine slot (and queue place, if a queue is configured) is taken, a new connection is refused at once
  with ``no free channels``. The engine session is taken at the first Text: an idle connection holds only
  its per-key place. Our extension ``ready=slot`` (what `RemoteTTS` sends) gives Ready moshi-server's
  meaning instead: the engine session is taken at connect (no Voice message then) and Ready is sent once
  it holds a slot, so that a client can bound its wait in the queue. The server pings every
  ``heartbeat_s``; a pong counts as activity.
* ``POST /api/tts`` and ``POST /api/tts_streaming``: JSON ``{"text", "voice", ...options}`` or a
  ``text/plain`` body; chunked audio back (``format=wav`` (default, 16-bit), ``pcm`` (s16le),
  ``pcm_f32le``). The body must arrive within ``body_timeout_s``; the whole request lasts at most
  ``max_session_s``, as a websocket session.
* ``GET /api/health``, ``GET /api/build_info`` and ``GET /api/modules_info`` (no key needed, as
  moshi-server; Unmute's health check is ``build_info``), ``GET /api/voices``, ``GET /metrics``.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import hashlib
import hmac
import io
import json
import logging
import math
import os
import platform
import re
import struct
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import aiohttp.http_exceptions
import msgpack
import numpy as np
from aiohttp import WSMsgType, web

from .adapter_support import slot_taken
from .cli import add_engine_arguments, engine_options
from .errors import (
    EngineFailure,
    EngineFullError,
    EngineTimeoutError,
    InvalidInputError,
    SessionClosedError,
    VoiceNotFoundError,
)
from .remote import READY_ON_SLOT, READY_PARAM
from .types import SAMPLE_RATE, AudioChunk, SessionOptions, VoicePrompt, WordTiming
from .voice_prompt import EMBEDDING_MODEL, PROMPT_MODEL, prompt_pcm, read_audio

if TYPE_CHECKING:
    import av.container
    import av.stream

    from .engine import StreamingSession, TTSEngine

logger = logging.getLogger(__name__)

STREAMING_PATH = "/api/tts_streaming"
HTTP_PATH = "/api/tts"
API_KEY_HEADER = "kyutai-api-key"
# moshi-server's four formats (`tts.rs` Encoder); OggOpus is its default when the client names none.
FORMATS = ("OggOpus", "OggOpusMessagePack", "PcmMessagePack", "Pcm")
DEFAULT_FORMAT = "OggOpus"
MSGPACK_FORMATS = ("OggOpusMessagePack", "PcmMessagePack")  # the others carry audio only
OGG_FORMATS = ("OggOpus", "OggOpusMessagePack")
HTTP_FORMATS = {"wav": "audio/wav", "pcm": "audio/L16; rate=24000; channels=1", "pcm_f32le": "audio/pcm"}

# code -> (websocket close code, HTTP status). The code travels in Error messages as an extension field
# (Kyutai's clients read only `message`), so that our client can raise the matching exception.
ERROR_CODES: dict[str, tuple[int, int]] = {
    "unauthorized": (1008, 401),
    "bad_request": (1008, 400),
    "invalid_voice": (1008, 400),
    "unknown_voice": (1008, 404),
    "too_many_sessions": (1013, 429),
    "no_free_channels": (1013, 503),
    "queue_timeout": (1013, 503),
    "message_too_large": (1009, 413),
    "invalid_text": (1007, 400),  # a websocket text frame that is not UTF-8
    "protocol_violation": (1002, 400),  # a frame that breaks the websocket protocol (RFC 6455)
    "text_too_long": (1008, 413),
    "malformed_message": (1003, 400),
    "unsupported": (1003, 400),
    "text_after_eos": (1008, 400),
    "idle_timeout": (1008, 408),
    "session_too_long": (1008, 408),
    "body_timeout": (1008, 408),
    "slow_reader": (1008, 408),
    "engine_error": (1011, 500),
    "internal_error": (1011, 500),
}


class ProtocolError(Exception):
    """An error the client is told about: an Error message (websocket) or a JSON error (HTTP)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def close_code(self) -> int:
        return ERROR_CODES[self.code][0]

    @property
    def http_status(self) -> int:
        return ERROR_CODES[self.code][1]


class _ClientGone(Exception):
    """The client closed or dropped the connection: nothing to report to anybody."""


@dataclass(frozen=True)
class ServerLimits:
    max_message_bytes: int = 64 * 1024  # one websocket message or one HTTP body
    max_text_chars: int = 20_000  # text per session (about 20 minutes of speech)
    # Concurrent sessions (websocket connections and HTTP requests) per API key; all anonymous clients
    # share one. None: half the engine's capacity (max_sessions + max_waiting), at least 1, so that one key
    # cannot take every slot and queue place.
    max_sessions_per_key: int | None = None
    idle_timeout_s: float = 30.0  # no client message for this long before Eos (moshi-server: 30 s)
    max_session_s: float = 900.0  # a whole session (websocket or HTTP), connection to last audio
    body_timeout_s: float = 30.0  # an HTTP request body not received within this is refused
    send_timeout_s: float = 30.0  # one message not taken by the client for this long: slow reader
    # After the last audio, how long the client may take to read up to our close frame: socket buffers can
    # hold many seconds of audio for a client that reads at playback speed, and closing early loses it.
    close_timeout_s: float = 60.0
    # An empty ping every this many seconds, as moshi-server (10 s), so that proxies and NATs keep an idle
    # connection open; a pong counts as client activity for the idle timeout. No pong deadline (aiohttp's
    # own heartbeat has one, and would cut a client that reads slowly). None: no pings.
    heartbeat_s: float | None = 10.0
    # Kyutai's clients get what moshi-server gives them unless these are changed:
    allow_client_params: bool = False  # True: honour temperature, cfg_alpha, ... from the client
    strict_voices: bool = False  # True: an unknown or invalid voice is an Error, not the default voice
    # A Voice message carries a speaker embedding ([1, 512, 125] float32: ~320 KB of msgpack), far over
    # max_message_bytes; it may be this large, and its embedding at most max_voice_frames long.
    max_voice_message_bytes: int = 2 * 1024 * 1024
    max_voice_frames: int = 250  # 20 s at 12.5 Hz; moshi-server's voice cloning makes 125


class Metrics:
    """Counters for `/metrics` and the load test."""

    def __init__(self) -> None:
        self.sessions: Counter[str] = Counter()  # started / completed / cancelled / failed
        self.errors: Counter[str] = Counter()
        self.audio_seconds = 0.0
        self.connections = 0

    def render(self, engine: TTSEngine) -> str:
        lines = [
            "# TYPE kyutai_tts_sessions_total counter",
            *(f'kyutai_tts_sessions_total{{outcome="{k}"}} {v}' for k, v in sorted(self.sessions.items())),
            "# TYPE kyutai_tts_errors_total counter",
            *(f'kyutai_tts_errors_total{{code="{k}"}} {v}' for k, v in sorted(self.errors.items())),
            "# TYPE kyutai_tts_audio_seconds_total counter",
            f"kyutai_tts_audio_seconds_total {self.audio_seconds:.2f}",
            "# TYPE kyutai_tts_connections gauge",
            f"kyutai_tts_connections {self.connections}",
            "# TYPE kyutai_tts_engine_sessions gauge",
            f"kyutai_tts_engine_sessions {engine.active_sessions}",
            "# TYPE kyutai_tts_engine_slots gauge",
            f"kyutai_tts_engine_slots {engine.max_sessions}",
        ]
        return "\n".join(lines) + "\n"


# One path segment of a voice name: no "..", no leading dot or "~", nothing a shell or a path could
# reinterpret. Voice names are relative paths in the voice repo (e.g. "expresso/ex03-....wav").
_VOICE_SEGMENT = re.compile(r"[\w@+=,-][\w.@+=, '()&-]*")
_MAX_VOICE_CHARS = 256

# (option name in SessionOptions, query parameter, parser)
_OPTION_PARAMS: tuple[tuple[str, str, type], ...] = (
    ("temperature", "temperature", float),
    ("top_k", "top_k", int),
    ("top_k_text", "top_k_text", int),
    ("seed", "seed", int),
    ("cfg_coef", "cfg_alpha", float),
    ("cfg_coef", "cfg_coef", float),
    ("n_q", "n_q", int),
    ("padding_bonus", "padding_bonus", float),
)

# Text up to this many characters is pushed on the event loop (microseconds); longer text is tokenized in
# a thread, _PUSH_PIECE_CHARS at a time.
_INLINE_PUSH_CHARS = 256
_PUSH_PIECE_CHARS = 512
# What a client is told when the engine fails; the details (which may name server files) go to the log.
_ENGINE_ERROR_MESSAGE = "the engine failed while synthesizing this session; details are in the server log"
# An absolute path of three segments or more, not inside a relative name ("expresso/ex03/...").
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])(?:[A-Za-z]:)?(?:[/\\][^\s/\\'\":,;]+){3,}")

_AUDIO_PACKER_OPTS = {"use_single_float": True}  # float32 samples, as moshi-server (rmp_serde f32)


def _parse_param(raw: Any, parse: type) -> int | float | None:
    """A query string or JSON value as the option's type; None if it is not one. Ranges are checked by
    `SessionOptions.validate`; here only the type: no bools, no fractional integers, no lists."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, str):
        try:
            return parse(raw)  # type: ignore[no-any-return]  # int("9" * 5000) raises ValueError
        except ValueError:
            return None
    if parse is float and isinstance(raw, (int, float)):
        return raw
    if parse is int and isinstance(raw, int):
        return raw
    if parse is int and isinstance(raw, float) and raw.is_integer():
        return int(raw)  # JSON writers may send 8.0 for 8
    return None


def _pack(message: Mapping[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def _pack_error(code: str, message: str) -> bytes:
    return _pack({"type": "Error", "message": message, "code": code})


def _pack_audio(pcm: Any) -> bytes:
    return msgpack.packb({"type": "Audio", "pcm": pcm.tolist()}, **_AUDIO_PACKER_OPTS)


def _pack_ogg(data: bytes) -> bytes:
    # moshi-server serializes the page bytes as a Vec<u8> without serde_bytes: an array of integers.
    return msgpack.packb({"type": "OggOpus", "data": list(data)})


class _Sink:
    """A write-only file object that keeps what the Ogg muxer writes until it is taken."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self.parts)
        self.parts.clear()
        return data


class OggOpusStream:
    """A session's audio as an Ogg/Opus byte stream, sent as moshi-server sends it: 24 kHz mono Opus
    (VoIP), 40 ms packets, each page written out as soon as it is complete, the header pages (OpusHead,
    OpusTags) first. Encoding and Ogg muxing are FFmpeg's (PyAV), a maintained implementation."""

    def __init__(self) -> None:
        try:
            import av
        except ImportError:
            raise ProtocolError(
                "unsupported",
                "the Ogg/Opus formats need PyAV on the server (pip install 'kyutai-tts-plugin[server]'); "
                "or ask for format=PcmMessagePack",
            ) from None
        self._av = av
        self._sink = _Sink()
        # page_duration 1 us: every packet closes its page, so no audio waits in the muxer for the next
        # step (the default holds pages for a second).
        self._out: av.container.OutputContainer = av.open(
            self._sink, "w", format="ogg", options={"page_duration": "1"}
        )
        stream = self._out.add_stream("libopus", rate=SAMPLE_RATE, layout="mono")
        stream.codec_context.options = {"application": "voip", "frame_duration": "40"}
        self._stream: av.stream.Stream = stream
        self._out.start_encoding()
        self._samples = 0
        self._closed = False

    def header(self) -> bytes:
        """The OpusHead and OpusTags pages (written when encoding starts)."""
        return self._sink.take()

    def encode(self, pcm: np.ndarray) -> bytes:
        """The complete pages after `pcm` (float32 at 24 kHz): the muxer keeps at most one packet."""
        frame = self._av.AudioFrame.from_ndarray(
            np.ascontiguousarray(pcm, dtype=np.float32)[None, :], format="flt", layout="mono"
        )
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._samples
        self._samples += len(pcm)
        for packet in self._stream.encode(frame):  # type: ignore[attr-defined]
            self._out.mux(packet)
        return self._sink.take()

    def finish(self) -> bytes:
        """The last pages (the encoder's remaining packets and the end-of-stream page)."""
        for packet in self._stream.encode(None):  # type: ignore[attr-defined]
            self._out.mux(packet)
        self.close()
        return self._sink.take()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._out.close()


def _close_reason(message: str) -> bytes:
    # A close reason is at most 123 bytes; cut on a character boundary.
    return message.encode("utf-8")[:123].decode("utf-8", errors="ignore").encode("utf-8")


class TTSServer:
    """The aiohttp application over one `TTSEngine`."""

    def __init__(
        self,
        engine: TTSEngine,
        *,
        api_keys: Sequence[str] = (),
        limits: ServerLimits | None = None,
    ) -> None:
        self.engine = engine
        self.limits = limits or ServerLimits()
        # Compare digests, not keys: equal lengths, so timing reveals nothing about a key's length either.
        self._key_digests = [hashlib.sha256(k.encode("utf-8")).digest() for k in api_keys if k]
        self._per_key: Counter[str] = Counter()
        capacity = engine.max_sessions + engine.max_waiting
        given = self.limits.max_sessions_per_key
        self.max_sessions_per_key = given if given is not None else max(1, capacity // 2)
        self.metrics = Metrics()
        self._speaker_dim: int | None = None
        self._started_at = datetime.now(timezone.utc)

    # -- application --------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.limits.max_message_bytes)
        app.router.add_get(STREAMING_PATH, self._ws_handler)
        app.router.add_post(STREAMING_PATH, self._http_handler)
        app.router.add_post(HTTP_PATH, self._http_handler)
        app.router.add_get("/api/health", self._health)
        app.router.add_get("/api/build_info", self._build_info)
        app.router.add_get("/api/modules_info", self._modules_info)
        app.router.add_get("/api/voices", self._voices)
        app.router.add_get("/metrics", self._metrics)
        return app

    # -- shared checks ------------------------------------------------------------------------

    def _authenticate(self, request: web.Request) -> str:
        """The identity the per-key limit counts against; raises `unauthorized`."""
        if not self._key_digests:
            return "anonymous"
        given = request.headers.get(API_KEY_HEADER) or request.query.get("auth_id")
        if given:
            # aiohttp keeps undecodable header bytes as lone surrogates: give those bytes back, so that a
            # non-UTF-8 key is just a wrong key (never a 500).
            try:
                raw = given.encode("utf-8", errors="surrogateescape")
            except UnicodeEncodeError:
                raw = b""  # matches no key
            digest = hashlib.sha256(raw).digest()
            match = None
            for i, key in enumerate(self._key_digests):  # no early exit: same time for every key
                if hmac.compare_digest(digest, key):
                    match = i
            if match is not None:
                return f"key{match}"
        raise ProtocolError(
            "unauthorized",
            f"unauthorized: send a valid API key in the {API_KEY_HEADER} header (or the auth_id query "
            "parameter)",
        )

    @contextmanager
    def _key_slot(self, key: str) -> Iterator[None]:
        limit = self.max_sessions_per_key
        if self._per_key[key] >= limit:
            raise ProtocolError(
                "too_many_sessions", f"too many concurrent sessions for this API key (limit {limit})"
            )
        self._per_key[key] += 1
        try:
            yield
        finally:
            self._per_key[key] -= 1
            if self._per_key[key] <= 0:
                del self._per_key[key]

    def _options(self, params: Mapping[str, Any]) -> SessionOptions:
        """Session options from query parameters (strings) or a JSON body (typed values), checked by the
        engine's own validation (without taking a slot); raises `bad_request` naming the parameter."""
        values: dict[str, Any] = {}
        # moshi-server reads only auth_id, format and voice: generation parameters are server settings.
        # Unmute sends cfg_alpha=1.5 anyway; honouring it would make our speech differ from Kyutai's.
        honoured = _OPTION_PARAMS if self.limits.allow_client_params else ()
        for field, param, parse in honoured:
            raw = params.get(param)
            if raw is None or raw == "":
                continue
            value = _parse_param(raw, parse)
            if value is None:
                kind = "an integer" if parse is int else "a number"
                raise ProtocolError(
                    "bad_request", f"invalid parameter {param}={str(raw)[:40]!r}: expected {kind}"
                )
            values[field] = value
        voice = params.get("voice")
        if voice is not None and voice != "":
            if not isinstance(voice, str):
                raise ProtocolError("invalid_voice", "invalid voice: expected a voice name (a string)")
            values["voice"] = voice
        options = SessionOptions(**values)
        try:
            self.engine._validate(options)
        except InvalidInputError as e:
            raise ProtocolError("bad_request", f"invalid parameter: {e}") from None
        return options

    def _check_voice_name(self, name: str) -> str:
        """The voice name without the model suffix; raises `invalid_voice` for anything that could name a
        file outside the voice directory."""
        suffix = self.engine.voices.suffix
        bare = name[: -len(suffix)] if suffix and name.endswith(suffix) else name
        segments = bare.split("/")
        if (
            len(name) > _MAX_VOICE_CHARS
            or bare.endswith(".safetensors")  # would be read as a local file path
            or not all(_VOICE_SEGMENT.fullmatch(s) for s in segments)
        ):
            raise ProtocolError(
                "invalid_voice",
                f"invalid voice name {name[:80]!r}: use a name listed by GET /api/voices (a relative path "
                "in the voice directory)",
            )
        return bare

    def _resolve_voice(self, name: str) -> None:
        """Blocking (a Hugging Face voice repo may download): run in a thread."""
        try:
            path = self.engine.voices.resolve(name)
        except VoiceNotFoundError:
            raise ProtocolError("unknown_voice", self._unknown_voice_message(name)) from None
        directory = self.engine.voices.directory
        if directory is not None and not Path(path).resolve().is_relative_to(Path(directory).resolve()):
            # a symlink inside the voice directory pointing elsewhere
            raise ProtocolError("invalid_voice", f"invalid voice {name!r}: not inside the voice directory")

    def _unknown_voice_message(self, name: str) -> str:
        # Our own message: the library's names the server's directories.
        try:
            voices = self.engine.list_voices()
        except Exception:  # listing a remote repo may fail offline; the error is still clear
            voices = []
        close = difflib.get_close_matches(name, voices, n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        return f"unknown voice {name[:80]!r}{hint}; GET /api/voices lists the available voices"

    async def _prepare(self, options: SessionOptions) -> SessionOptions:
        """Check the voice (at connect time, before any text); the options are already validated. An
        unknown or invalid voice is the default voice, as in moshi-server (an Error if `strict_voices`)."""
        if options.voice is not None:
            try:
                bare = self._check_voice_name(options.voice)
                await asyncio.to_thread(self._resolve_voice, bare)
            except ProtocolError as e:
                if self.limits.strict_voices:
                    raise
                logger.info("%s; using the default voice %r", e.message, self.engine.default_voice)
                return replace(options, voice=None)
            options = replace(options, voice=bare)
        return options

    def _get_speaker_dim(self) -> int:
        """Channels of the model's speaker embeddings, read from the default voice's file (blocking)."""
        if self._speaker_dim is None:
            from .checkpoint import load_safetensors

            path = self.engine.voices.resolve(self.engine.default_voice)
            self._speaker_dim = int(load_safetensors(path)["speaker_wavs"].shape[1])
        return self._speaker_dim

    async def _voice_of(self, message: Mapping[str, Any]) -> str | VoicePrompt:
        """The voice a `Voice` message gives, as this model takes it: an embedding registered as a
        voice name, or (a model that takes audio prompts) the prompt itself."""
        if self.engine.voice_kind == "prompt":
            return await asyncio.to_thread(self._voice_prompt, message)
        if "audio" in message or "pcm" in message:
            raise ProtocolError(
                "invalid_voice",
                f"invalid Voice message: it carries audio, but {EMBEDDING_MODEL}; send "
                "{'type': 'Voice', 'embeddings': [float, ...], 'shape': [1, dim, T]}",
            )
        return await self._register_voice(message)

    def _voice_prompt(self, message: Mapping[str, Any]) -> VoicePrompt:
        """A Voice message with an audio prompt (blocking: decodes the audio): ``{'type': 'Voice',
        'audio': <bytes of a WAV/FLAC/MP3/OGG file>}`` or ``{'type': 'Voice', 'pcm': [float, ...],
        'sample_rate': int}`` (mono samples in [-1, 1])."""
        audio, pcm, rate = message.get("audio"), message.get("pcm"), message.get("sample_rate", SAMPLE_RATE)
        usage = (
            "{'type': 'Voice', 'audio': <bytes of a WAV, FLAC or MP3 file>} or {'type': 'Voice', "
            "'pcm': [float, ...], 'sample_rate': int}"
        )
        if isinstance(audio, bytes) and pcm is None:
            try:
                prompt = read_audio(io.BytesIO(audio), shown="the Voice message's audio")
            except InvalidInputError as e:
                raise ProtocolError("invalid_voice", f"invalid Voice message: {e}") from None
        elif isinstance(pcm, list) and audio is None and type(rate) is int:
            if not all(type(v) is float or type(v) is int for v in pcm):
                raise ProtocolError("invalid_voice", "invalid Voice message: 'pcm' must be numbers")
            prompt = VoicePrompt(np.asarray(pcm, dtype=np.float32), rate)
        else:
            raise ProtocolError(
                "malformed_message", f"malformed Voice message: {PROMPT_MODEL}; send {usage}"
            )
        try:
            SessionOptions(voice=prompt).validate()
            prompt_pcm(prompt, self.engine.max_prompt_s, "the Voice message's audio")
        except InvalidInputError as e:
            raise ProtocolError("invalid_voice", f"invalid Voice message: {e}") from None
        return prompt

    async def _register_voice(self, message: Mapping[str, Any]) -> str:
        """The voice name of a `Voice` message's embedding (moshi-server's voice cloning output: C-order
        float32 values and their shape [1, dim, T]); raises `malformed_message` / `invalid_voice`."""
        values, shape = message.get("embeddings"), message.get("shape")
        if (
            not isinstance(values, list)
            or not isinstance(shape, list)
            or not all(type(d) is int for d in shape)  # no bools, no floats
        ):
            raise ProtocolError(
                "malformed_message",
                "malformed Voice message: expected {'type': 'Voice', 'embeddings': [float, ...], "
                "'shape': [1, dim, T]}",
            )
        dim = await asyncio.to_thread(self._get_speaker_dim)
        frames = self.limits.max_voice_frames
        if len(shape) != 3 or shape[0] != 1 or shape[1] != dim or not 1 <= shape[2] <= frames:
            raise ProtocolError(
                "invalid_voice",
                f"invalid Voice embedding shape {shape[:8]}: this model takes [1, {dim}, T] with 1 <= T <= "
                f"{frames} (moshi-server's voice cloning makes [1, {dim}, 125])",
            )
        if len(values) != math.prod(shape):
            raise ProtocolError(
                "invalid_voice",
                f"invalid Voice message: {len(values)} values for shape {shape} "
                f"({math.prod(shape)} expected)",
            )
        if not all(type(v) is float or type(v) is int for v in values):
            raise ProtocolError(
                "invalid_voice", "invalid Voice message: the embeddings must be float32 numbers"
            )
        wide = np.asarray(values, dtype=np.float64)  # float32 overflow is found here, without a warning
        if not np.isfinite(wide).all() or np.abs(wide).max() > np.finfo(np.float32).max:
            raise ProtocolError(
                "invalid_voice", "invalid Voice message: the embeddings must be finite numbers"
            )
        import torch

        array = wide.astype(np.float32).reshape(shape)
        return await asyncio.to_thread(self.engine.voices.register_embedding, torch.from_numpy(array))

    def _start(self, options: SessionOptions) -> StreamingSession:
        """Take an engine session (a slot or a queue place)."""
        try:
            session = self.engine.open_session(options)
        except VoiceNotFoundError:
            raise ProtocolError("unknown_voice", self._unknown_voice_message(options.voice or "")) from None
        except EngineFullError as e:
            raise ProtocolError("no_free_channels", f"no free channels: {e}") from None
        except InvalidInputError as e:
            raise ProtocolError("bad_request", str(e)) from None
        except EngineFailure:
            raise ProtocolError("engine_error", _ENGINE_ERROR_MESSAGE) from None
        self.metrics.sessions["started"] += 1
        return session

    async def _push(self, session: StreamingSession, text: str) -> None:
        """Push text in order. A large text is tokenized off the event loop, in pieces, so that it delays
        neither other connections (event loop) nor other sessions (the engine lock, held per piece)."""
        try:
            if len(text) <= _INLINE_PUSH_CHARS:
                session.push_text(text)
            else:
                await asyncio.to_thread(_push_in_pieces, session, text)
        except SessionClosedError:
            raise _ClientGone() from None  # cancelled meanwhile: the connection is being torn down
        except InvalidInputError as e:  # e.g. a break tag over the limit
            raise ProtocolError("bad_request", str(e)) from None

    @staticmethod
    async def _events(session: StreamingSession) -> AsyncIterator[AudioChunk | WordTiming]:
        """The session's events, with engine errors turned into protocol errors."""
        try:
            async for event in session:
                yield event
        except EngineTimeoutError as e:
            raise ProtocolError("queue_timeout", str(e)) from None
        except EngineFailure as e:
            # The engine's own message may name server files (a truncated voice file): it goes to the log.
            logger.warning("session %s failed in the engine: %s", session.id, e)
            raise ProtocolError("engine_error", _ENGINE_ERROR_MESSAGE) from None

    def _http_error(self, e: ProtocolError) -> web.Response:
        self.metrics.errors[e.code] += 1
        body = {"type": "Error", "message": _without_paths(e.message), "code": e.code}
        return web.json_response(body, status=e.http_status)

    # -- websocket route ----------------------------------------------------------------------

    async def _ws_handler(self, request: web.Request) -> web.StreamResponse:
        limits = self.limits
        ws = _ReportingWebSocket(
            compress=False,  # float audio does not compress; deflate would only cost CPU
            # aiohttp's own limit is a backstop above ours, so that a message over our limit gets a
            # protocol Error first; over the backstop, _ReportingWebSocket still says why.
            # A Voice message may be larger (max_voice_message_bytes), with the same margin for our Error.
            max_msg_size=max(
                4 * limits.max_message_bytes, limits.max_voice_message_bytes + limits.max_message_bytes
            ),
            # _ws_read answers pings and sees pongs itself, so that a pong restarting the idle wait is ours
            # to guarantee (not a detail of how aiohttp times its reads); _ping sends the pings.
            autoping=False,
            timeout=limits.close_timeout_s,
        )
        try:
            key = self._authenticate(request)
            fmt = request.query.get("format") or DEFAULT_FORMAT
            if fmt not in FORMATS:
                raise ProtocolError(
                    "bad_request",
                    f"unsupported format {fmt[:40]!r}: this server sends {', '.join(FORMATS)}",
                )
            if not ws.can_prepare(request).ok:
                raise ProtocolError(
                    "bad_request", f"{STREAMING_PATH} is a websocket route; POST to {HTTP_PATH}"
                )
        except ProtocolError as e:
            return self._http_error(e)
        ws.reporting = (fmt in MSGPACK_FORMATS, limits.max_message_bytes, self.metrics)
        await ws.prepare(request)
        conn = _Connection(ws, fmt, limits)
        self.metrics.connections += 1
        try:
            self._check_capacity()
            with self._key_slot(key):
                options = await self._prepare(self._options(request.query))
                if fmt in OGG_FORMATS:
                    conn.ogg = OggOpusStream()
                ready_on_slot = request.query.get(READY_PARAM) == READY_ON_SLOT
                await self._ws_serve(conn, options, ready_on_slot)
        except ProtocolError as e:
            self.metrics.errors[e.code] += 1
            await conn.fail(e)
        except _ClientGone:
            pass
        except Exception:
            logger.exception("websocket session failed")
            self.metrics.errors["internal_error"] += 1
            await conn.fail(ProtocolError("internal_error", "internal server error"))
        finally:
            self.metrics.connections -= 1
            if conn.ogg is not None:
                conn.ogg.close()
        return ws

    def _check_capacity(self) -> None:
        """moshi-server refuses a connection at once when no channel is free (Unmute then tries another
        server); a queue exists only if the engine was given one (`max_waiting`, opt-in for serve)."""
        engine = self.engine
        if engine.active_sessions >= engine.max_sessions + engine.max_waiting:
            raise ProtocolError(
                "no_free_channels",
                f"no free channels: all {engine.max_sessions} engine slots are taken; retry later",
            )

    async def _ws_serve(
        self, conn: _Connection, options: SessionOptions, ready_on_slot: bool = False
    ) -> None:
        """Ready, then the engine session from the first Text on (an idle connection holds no slot); with
        `ready_on_slot`, the engine session at once and Ready once it holds a slot."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.max_session_s
        opened: asyncio.Future[StreamingSession | None] = loop.create_future()
        reader = writer = pinger = None
        try:
            if ready_on_slot:
                opened.set_result(self._start(options))  # the writer says Ready once it has a slot
            else:
                await self._ready(conn)
            if self.limits.heartbeat_s:
                pinger = asyncio.create_task(self._ping(conn, self.limits.heartbeat_s))
            writer = asyncio.create_task(self._ws_write(conn, opened, ready_on_slot))
            reader = asyncio.create_task(self._ws_read(conn, options, opened, deadline))
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            if writer in done and writer.exception() is None:
                # All audio sent. Stop reading first: aiohttp's close() from another task than a pending
                # receive() drops the TCP connection without waiting for the client's close frame, and a
                # client still reading buffered audio would then see an abnormal close (1006).
                await _stop(reader)
                await _stop(pinger)
                await conn.close(1000, b"")
                if opened.result() is not None:
                    self.metrics.sessions["completed"] += 1
                return
            _cancel(opened)  # client gone or protocol error: free the engine slot now
            for task in (reader, writer):
                if task in done and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            if opened.done() and opened.result() is not None:
                self.metrics.sessions["cancelled"] += 1
        finally:
            _cancel(opened)
            await _stop(pinger)
            await _stop(reader)
            await _stop(writer)

    @staticmethod
    async def _ready(conn: _Connection) -> None:
        await conn.send_message({"type": "Ready"})
        if conn.ogg is not None:
            await conn.send_ogg(conn.ogg.header())  # moshi-server sends it with the channel

    @staticmethod
    async def _ping(conn: _Connection, interval: float) -> None:
        """An empty ping every `interval` s for the whole session, as moshi-server; no pong deadline."""
        while not conn.ws.closed:
            await asyncio.sleep(interval)
            try:
                await conn.ws.ping(b"")
            except (ConnectionError, RuntimeError):
                return

    async def _ws_read(
        self,
        conn: _Connection,
        options: SessionOptions,
        opened: asyncio.Future[StreamingSession | None],
        deadline: float,
    ) -> None:
        """Client messages -> the session, opened at the first Text (`opened` gets it, or None for an Eos
        before any text). Returns when the client closes; raises ProtocolError."""
        limits = self.limits
        loop = asyncio.get_running_loop()
        session = opened.result() if opened.done() else None  # opened at connect with ready=slot
        flushed = False
        chars = 0
        while True:
            left = deadline - loop.time()
            timeout = left if flushed else min(left, limits.idle_timeout_s)
            try:
                msg = await conn.ws.receive(timeout=max(timeout, 0.0))
            except asyncio.TimeoutError:
                if loop.time() >= deadline:
                    raise ProtocolError(
                        "session_too_long", f"session exceeded {limits.max_session_s:g} s"
                    ) from None
                raise ProtocolError(
                    "idle_timeout",
                    f"no message for {limits.idle_timeout_s:g} s: send Eos when the text is complete",
                ) from None
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return
            if msg.type == WSMsgType.ERROR:
                # aiohttp refused a frame; _ReportingWebSocket already sent the Error and closed
                raise _ClientGone()
            if msg.type == WSMsgType.PING:
                try:
                    await conn.ws.pong(msg.data)
                except (ConnectionError, RuntimeError):
                    raise _ClientGone() from None
                continue
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                continue  # a pong: the client is alive, and the idle wait starts again
            kind, text, voice = self._parse(msg.type, msg.data)
            if kind == "voice":
                if session is not None or flushed:
                    # moshi-server takes a voice with the first Text only; a later one would be ignored
                    raise ProtocolError(
                        "bad_request",
                        "a Voice message must come before the first Text (and before Eos), and without "
                        "ready=slot (which opens the session at connect)",
                    )
                options = replace(options, voice=await self._voice_of(voice))
                continue
            if kind == "eos":
                if not flushed:
                    if session is not None:
                        session.flush()
                    elif not opened.done():
                        opened.set_result(None)  # no text at all: nothing to speak, a clean end
                    flushed = True
                continue
            if flushed:
                raise ProtocolError(
                    "text_after_eos", "Text after Eos: open a new connection for a new utterance"
                )
            chars += len(text)
            if chars > limits.max_text_chars:
                raise ProtocolError(
                    "text_too_long",
                    f"text exceeds the limit of {limits.max_text_chars} characters per session",
                )
            if text:
                if session is None:
                    session = self._start(options)
                    opened.set_result(session)
                # moshi-server splits each message into whole words: the end of a message ends a word.
                await self._push(session, text + " ")

    def _parse(self, kind: WSMsgType, data: str | bytes) -> tuple[str, str, dict[str, Any]]:
        """(kind, text, Voice message) of a client message: kind is "text", "eos" or "voice"."""
        limit = self.limits.max_message_bytes
        size = len(data.encode("utf-8")) if isinstance(data, str) else len(data)
        # Only a Voice message may be larger (a speaker embedding); others are refused before decoding.
        biggest = limit if kind == WSMsgType.TEXT else max(limit, self.limits.max_voice_message_bytes)
        if size > biggest:
            voice = "" if biggest == limit else f" (Voice messages: {biggest} bytes)"
            raise ProtocolError(
                "message_too_large", f"message of {size} bytes exceeds the limit of {limit} bytes{voice}"
            )
        if kind == WSMsgType.TEXT:
            return "text", str(data), {}
        assert isinstance(data, bytes)
        if data == b"\0":
            return "eos", "", {}
        try:
            obj = msgpack.unpackb(data, raw=False)
        except Exception:
            obj = None
        is_voice = isinstance(obj, dict) and obj.get("type") == "Voice"
        if size > limit and not is_voice:
            raise ProtocolError(
                "message_too_large", f"message of {size} bytes exceeds the limit of {limit} bytes"
            )
        if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
            raise ProtocolError(
                "malformed_message", "malformed message: expected a msgpack map with a 'type'"
            )
        if is_voice:
            if size > self.limits.max_voice_message_bytes:
                raise ProtocolError(
                    "message_too_large",
                    f"Voice message of {size} bytes exceeds the limit of "
                    f"{self.limits.max_voice_message_bytes} bytes",
                )
            return "voice", "", obj
        if obj["type"] == "Eos":
            return "eos", "", {}
        if obj["type"] == "Text":
            text = obj.get("text")
            if not isinstance(text, str):
                raise ProtocolError("malformed_message", "malformed Text message: 'text' must be a string")
            return "text", text, {}
        raise ProtocolError(
            "malformed_message", f"unknown message type {obj['type'][:40]!r}: expected Text, Voice or Eos"
        )

    async def _ws_write(
        self, conn: _Connection, opened: asyncio.Future[StreamingSession | None], ready_on_slot: bool = False
    ) -> None:
        session = await opened
        if ready_on_slot:
            assert session is not None
            await slot_taken(session)
            if session.run is not None:  # else it ended in the queue: no Ready, the events say why
                await self._ready(conn)
        if session is None:
            return
        async for event in self._events(session):
            if isinstance(event, AudioChunk):
                if conn.ogg is not None:
                    await conn.send_ogg(conn.ogg.encode(event.pcm))
                elif conn.msgpack:
                    await conn.send(_pack_audio(event.pcm))
                else:
                    await conn.send(event.pcm.astype("<f4").tobytes())
                self.metrics.audio_seconds += len(event.pcm) / SAMPLE_RATE
            elif conn.msgpack:
                await conn.send_message(
                    {"type": "Text", "text": event.word, "start_s": event.start_s, "stop_s": event.end_s}
                )
        if conn.ogg is not None:
            await conn.send_ogg(conn.ogg.finish())  # the last packet and the end-of-stream page

    # -- HTTP routes --------------------------------------------------------------------------

    async def _http_handler(self, request: web.Request) -> web.StreamResponse:
        response: web.StreamResponse | None = None
        try:
            async with asyncio.timeout(self.limits.max_session_s):
                key = self._authenticate(request)
                params, text = await self._read_body(request)
                fmt = str(params.get("format") or "wav")
                if fmt not in HTTP_FORMATS:
                    raise ProtocolError(
                        "bad_request", f"unsupported format {fmt[:40]!r}: use {', '.join(HTTP_FORMATS)}"
                    )
                with self._key_slot(key):
                    session = self._start(await self._prepare(self._options(params)))
                    try:
                        await self._push(session, text)
                        session.flush()
                        events = self._events(session)
                        # Wait for the first event before sending headers, so that a queue timeout or an
                        # engine error still gets a proper status.
                        first = await anext(events, None)
                        response = web.StreamResponse(headers={"Content-Type": HTTP_FORMATS[fmt]})
                        response.enable_chunked_encoding()
                        await response.prepare(request)
                        if fmt == "wav":
                            await self._write(response, _wav_header())
                        if first is not None:
                            await self._write_event(response, first, fmt)
                        async for event in events:
                            await self._write_event(response, event, fmt)
                        await response.write_eof()
                        self.metrics.sessions["completed"] += 1
                        return response
                    finally:
                        session.cancel()
        except TimeoutError:  # asyncio.timeout: the whole request took longer than max_session_s
            return self._http_failed(
                response,
                ProtocolError("session_too_long", f"session exceeded {self.limits.max_session_s:g} s"),
            )
        except ProtocolError as e:
            return self._http_failed(response, e)
        except _ClientGone:
            # Once per connection, and not an error of ours: the client hung up (upload or download).
            logger.info("HTTP client disconnected before the end of its request")
            self.metrics.sessions["cancelled"] += 1
            return response if response is not None else web.Response(status=499)
        except Exception:
            logger.exception("HTTP synthesis failed")
            return self._http_failed(response, ProtocolError("internal_error", "internal server error"))

    def _http_failed(self, response: web.StreamResponse | None, e: ProtocolError) -> web.StreamResponse:
        if response is None:
            return self._http_error(e)
        # Headers are gone: the only way to tell the client is to end the stream uncleanly.
        self.metrics.errors[e.code] += 1
        self.metrics.sessions["failed"] += 1
        logger.warning("HTTP synthesis failed mid-stream: %s", e.message)
        response.force_close()
        return response

    async def _read_body(self, request: web.Request) -> tuple[dict[str, Any], str]:
        try:
            body = await asyncio.wait_for(request.read(), self.limits.body_timeout_s)
        except web.HTTPRequestEntityTooLarge:
            raise ProtocolError(
                "message_too_large",
                f"request body exceeds the limit of {self.limits.max_message_bytes} bytes",
            ) from None
        except asyncio.TimeoutError:
            raise ProtocolError(
                "body_timeout", f"the request body did not arrive within {self.limits.body_timeout_s:g} s"
            ) from None
        except (ConnectionError, aiohttp.ClientPayloadError, aiohttp.http_exceptions.HttpProcessingError):
            raise _ClientGone() from None  # the connection was lost mid-upload
        params: dict[str, Any] = dict(request.query)
        if request.content_type == "application/json":
            try:
                obj = json.loads(body)
            except (ValueError, RecursionError):  # RecursionError: nested thousands of levels deep
                obj = None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ProtocolError("malformed_message", 'malformed JSON body: expected {"text": "...", ...}')
            text = obj.pop("text")
            params.update(obj)
        else:
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError("malformed_message", "the body is not UTF-8 text") from None
        if len(text) > self.limits.max_text_chars:
            raise ProtocolError(
                "text_too_long",
                f"text exceeds the limit of {self.limits.max_text_chars} characters per session",
            )
        return params, text

    async def _write_event(
        self, response: web.StreamResponse, event: AudioChunk | WordTiming, fmt: str
    ) -> None:
        if not isinstance(event, AudioChunk):
            return
        if fmt == "pcm_f32le":
            data = event.pcm.astype("<f4").tobytes()
        else:
            data = event.pcm16()
        await self._write(response, data)
        self.metrics.audio_seconds += len(event.pcm) / SAMPLE_RATE

    async def _write(self, response: web.StreamResponse, data: bytes) -> None:
        try:
            await asyncio.wait_for(response.write(data), self.limits.send_timeout_s)
        except asyncio.TimeoutError:
            raise ProtocolError("slow_reader", "the client is not reading the audio") from None
        except (ConnectionError, RuntimeError):  # client went away (aiohttp raises either)
            raise _ClientGone() from None

    async def _health(self, request: web.Request) -> web.Response:
        healthy = self.engine.healthy  # False once the engine's steps keep failing (device error)
        return web.json_response(
            {
                "status": "ok" if healthy else "unhealthy",
                "sessions": self.engine.active_sessions,
                "slots": self.engine.max_sessions,
                "connections": self.metrics.connections,
                "sample_rate": SAMPLE_RATE,
            },
            status=200 if healthy else 503,
        )

    async def _build_info(self, request: web.Request) -> web.Response:
        """moshi-server's build information route, with its field names (Unmute's health check wants a
        200; the values, compile-time strings there, describe this server here)."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            ours = version("kyutai-tts-plugin")
        except PackageNotFoundError:
            ours = "unknown"
        started = self._started_at
        target = f"{platform.machine()}-{platform.system().lower()}"
        return web.json_response(
            {
                "build_timestamp": started.isoformat(),
                "build_date": started.date().isoformat(),
                "git_branch": "unknown",
                "git_timestamp": "unknown",
                "git_date": "unknown",
                "git_hash": "unknown",
                "git_describe": f"kyutai-tts-plugin {ours}",
                "rustc_host_triple": target,
                "rustc_version": f"python {platform.python_version()}",
                "cargo_target_triple": target,
            }
        )

    async def _modules_info(self, request: web.Request) -> web.Response:
        """moshi-server's list of modules (values are strings there too)."""
        module = {
            "type": "py",
            "path": STREAMING_PATH,
            "script": "kyutai-tts",
            "used_slots": str(self.engine.active_sessions),
            "total_slots": str(self.engine.max_sessions),
        }
        return web.json_response([module])

    async def _voices(self, request: web.Request) -> web.Response:
        try:
            self._authenticate(request)
        except ProtocolError as e:
            return self._http_error(e)
        voices = await asyncio.to_thread(self.engine.list_voices)
        return web.json_response({"voices": voices, "default": self.engine.default_voice})

    async def _metrics(self, request: web.Request) -> web.Response:
        try:
            self._authenticate(request)
        except ProtocolError as e:
            return self._http_error(e)
        return web.Response(text=self.metrics.render(self.engine), content_type="text/plain")


class _Connection:
    """One websocket and its format, with bounded sends and a single final Error/close."""

    def __init__(self, ws: web.WebSocketResponse, fmt: str, limits: ServerLimits) -> None:
        self.ws = ws
        self.msgpack = fmt in MSGPACK_FORMATS
        self.ogg: OggOpusStream | None = None  # set for the Ogg formats
        self.send_timeout_s = limits.send_timeout_s
        self.close_timeout_s = limits.close_timeout_s

    async def send(self, data: bytes) -> None:
        if self.ws.closed:
            raise _ClientGone()
        try:
            await asyncio.wait_for(self.ws.send_bytes(data), self.send_timeout_s)
        except asyncio.TimeoutError:
            raise ProtocolError(
                "slow_reader", f"the client did not read audio for {self.send_timeout_s:g} s"
            ) from None
        except (ConnectionError, RuntimeError):  # aiohttp: "Cannot write to closing transport"
            raise _ClientGone() from None

    async def send_message(self, message: Mapping[str, Any]) -> None:
        if self.msgpack:  # the raw Pcm and OggOpus formats carry audio only (as moshi-server)
            await self.send(_pack(message))

    async def send_ogg(self, pages: bytes) -> None:
        """Ogg pages: raw bytes (OggOpus) or an OggOpus message (OggOpusMessagePack)."""
        if pages:  # the muxer may hold a step's only packet until the next one
            await self.send(_pack_ogg(pages) if self.msgpack else pages)

    async def close(self, code: int, reason: bytes) -> None:
        if not self.ws.closed:
            try:
                await asyncio.wait_for(self.ws.close(code=code, message=reason), self.close_timeout_s + 1)
            except (asyncio.TimeoutError, ConnectionError, RuntimeError):
                pass

    async def fail(self, error: ProtocolError) -> None:
        """Tell the client what went wrong (Error message, then the close reason), then close."""
        if self.ws.closed:
            return
        message = _without_paths(error.message)
        if self.msgpack:
            try:
                await asyncio.wait_for(self.ws.send_bytes(_pack_error(error.code, message)), 2.0)
            except (asyncio.TimeoutError, ConnectionError, RuntimeError):
                pass
        await self.close(error.close_code, _close_reason(message))


class _ReportingWebSocket(web.WebSocketResponse):
    """A websocket that says why when aiohttp itself refuses a frame (over its size backstop, invalid
    UTF-8 text, a protocol violation): aiohttp closes with a bare code; this sends the Error message and
    a close reason first, as for every other refusal."""

    # (send Error messages, our message size limit, metrics); set by the handler before prepare()
    reporting: tuple[bool, int, Metrics] | None = None

    async def close(self, *, code: int = 1000, message: bytes = b"", drain: bool = True) -> bool:
        refusal = _AIOHTTP_REFUSALS.get(code)
        if refusal is not None and not message and not self.closed and self.reporting is not None:
            send_errors, max_bytes, metrics = self.reporting
            error_code, text = refusal
            text = text.format(max_bytes=max_bytes)
            metrics.errors[error_code] += 1
            if send_errors:
                try:
                    await asyncio.wait_for(self.send_bytes(_pack_error(error_code, text)), 2.0)
                except (asyncio.TimeoutError, ConnectionError, RuntimeError):
                    pass
            message = _close_reason(text)
        return await super().close(code=code, message=message, drain=drain)


# close code aiohttp uses -> (our error code, message)
_AIOHTTP_REFUSALS: dict[int, tuple[str, str]] = {
    1009: ("message_too_large", "message exceeds the limit of {max_bytes} bytes"),
    1007: (
        "invalid_text",
        "a text frame is not valid UTF-8: send text as UTF-8, or msgpack in binary frames",
    ),
    1002: ("protocol_violation", "websocket protocol violation (RFC 6455); the connection is closed"),
}


def _cancel(opened: asyncio.Future[StreamingSession | None]) -> None:
    """Cancel the engine session, if one was opened."""
    if opened.done() and not opened.cancelled() and (session := opened.result()) is not None:
        session.cancel()


def _push_in_pieces(session: StreamingSession, text: str) -> None:
    """push_text takes any split; pieces keep each hold of the engine lock short."""
    for i in range(0, len(text), _PUSH_PIECE_CHARS):
        session.push_text(text[i : i + _PUSH_PIECE_CHARS])


def _without_paths(message: str) -> str:
    """A message for a client: absolute paths of server files (3+ segments) become "<path>"."""
    return _ABSOLUTE_PATH.sub("<path>", message)


async def _stop(task: asyncio.Task[None] | None) -> None:
    """Cancel `task` and wait for it, whatever it ended with (its outcome was handled or is moot)."""
    if task is None:
        return
    task.cancel()
    await asyncio.wait([task], timeout=5.0)
    if task.done() and not task.cancelled():
        task.exception()  # retrieved: no "exception was never retrieved" warning


def _wav_header() -> bytes:
    """A 16-bit mono WAV header of unknown length (sizes 0xFFFFFFFF, as moshi-server streams it)."""
    unknown = 0xFFFFFFFF
    return (
        b"RIFF"
        + struct.pack("<I", unknown)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, SAMPLE_RATE, SAMPLE_RATE * 2, 2, 16)
        + b"data"
        + struct.pack("<I", unknown)
    )


# -- running it ------------------------------------------------------------------------------


@dataclass
class RunningServer:
    """A server started with `start_server` (tests, benchmarks, embedding in another app)."""

    server: TTSServer
    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_server(
    engine: TTSEngine,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    api_keys: Sequence[str] = (),
    limits: ServerLimits | None = None,
) -> RunningServer:
    """Serve `engine` on the running event loop; port 0 picks a free port."""
    server = TTSServer(engine, api_keys=api_keys, limits=limits)
    runner = web.AppRunner(server.app(), access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    return RunningServer(server, runner, host, int(bound))


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `kyutai-tts serve`."""
    from .checkpoint import DEFAULT_MODEL_REPO, DEFAULT_VOICE, DEFAULT_VOICE_REPO

    d = ServerLimits()
    parser.add_argument(
        "--model", default=DEFAULT_MODEL_REPO, help=f"HF repo or local directory ({DEFAULT_MODEL_REPO})"
    )
    parser.add_argument(
        "--voice-repo",
        default=DEFAULT_VOICE_REPO,
        help=f"HF repo or local directory of voices ({DEFAULT_VOICE_REPO})",
    )
    parser.add_argument("--default-voice", default=DEFAULT_VOICE, help="voice used when a client names none")
    add_engine_arguments(parser)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080, as moshi-server)")
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="accepted API key (repeatable). Prefer KYUTAI_TTS_API_KEYS (comma-separated) or --api-key-file: "
        "command lines are visible to other users. No key: no authentication",
    )
    parser.add_argument("--api-key-file", type=Path, help="file with one accepted API key per line")
    parser.add_argument("--max-sessions", type=int, default=8, help="engine slots (batch size, default 8)")
    parser.add_argument(
        "--max-waiting",
        type=int,
        default=0,
        help="sessions queued for a slot (default 0: when every slot is taken, a client is refused at once "
        "with 'no free channels', as moshi-server; Unmute then tries another server)",
    )
    parser.add_argument(
        "--queue-timeout", type=float, default=30.0, help="seconds a queued session may wait for a slot"
    )
    parser.add_argument(
        "--allow-client-params",
        action="store_true",
        help="honour the client's temperature, top_k, top_k_text, seed, cfg_alpha, n_q, padding_bonus "
        "(default: ignored, as moshi-server, which reads only auth_id, format and voice)",
    )
    parser.add_argument(
        "--strict-voices",
        action="store_true",
        help="refuse an unknown voice with an Error (default: use the default voice, as moshi-server)",
    )
    parser.add_argument(
        "--ping-interval",
        type=float,
        default=d.heartbeat_s,
        help="seconds between server pings (default 10, as moshi-server; 0: no pings)",
    )
    parser.add_argument(
        "--max-buffered",
        type=float,
        default=10.0,
        help="seconds of audio generated ahead of a slow client before its session pauses (default 10)",
    )
    parser.add_argument(
        "--max-message-bytes", type=int, default=d.max_message_bytes, help="largest client message"
    )
    parser.add_argument("--max-text-chars", type=int, default=d.max_text_chars, help="text per session")
    parser.add_argument(
        "--max-sessions-per-key",
        type=int,
        default=d.max_sessions_per_key,
        help="concurrent sessions per API key (default: half of max-sessions + max-waiting, at least 1)",
    )
    parser.add_argument(
        "--idle-timeout", type=float, default=d.idle_timeout_s, help="seconds without a message before Eos"
    )
    parser.add_argument(
        "--max-session-seconds",
        type=float,
        default=d.max_session_s,
        help="longest session, websocket or HTTP (default 900)",
    )
    parser.add_argument(
        "--body-timeout",
        type=float,
        default=d.body_timeout_s,
        help="seconds an HTTP request body may take to arrive (default 30)",
    )
    parser.add_argument(
        "--send-timeout", type=float, default=d.send_timeout_s, help="seconds a client may stall reading"
    )


def api_keys_from(args: argparse.Namespace) -> list[str]:
    keys = [k for k in args.api_key if k]
    env = os.environ.get("KYUTAI_TTS_API_KEYS", "")
    keys += [k.strip() for k in env.split(",") if k.strip()]
    if args.api_key_file is not None:
        lines = args.api_key_file.read_text(encoding="utf-8").splitlines()
        keys += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return keys


def limits_from(args: argparse.Namespace) -> ServerLimits:
    return ServerLimits(
        max_message_bytes=args.max_message_bytes,
        max_text_chars=args.max_text_chars,
        max_sessions_per_key=args.max_sessions_per_key,
        idle_timeout_s=args.idle_timeout,
        max_session_s=args.max_session_seconds,
        send_timeout_s=args.send_timeout,
        body_timeout_s=args.body_timeout,
        heartbeat_s=args.ping_interval or None,
        allow_client_params=args.allow_client_params,
        strict_voices=args.strict_voices,
    )


def run_serve(args: argparse.Namespace) -> int:
    """`kyutai-tts serve`: load the engine, serve until interrupted."""
    from .engine import TTSEngine

    keys = api_keys_from(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not keys:
        print(
            f"kyutai-tts serve: warning: listening on {args.host} without an API key: anyone who can reach "
            "this port can use the engine (set KYUTAI_TTS_API_KEYS)",
            file=sys.stderr,
        )
    engine = TTSEngine.from_pretrained(
        args.model,
        voice_repo=args.voice_repo,
        default_voice=args.default_voice,
        max_sessions=args.max_sessions,
        max_waiting=args.max_waiting,
        queue_timeout_s=args.queue_timeout,
        max_buffered_s=args.max_buffered,
        **engine_options(args),
    )
    server = TTSServer(engine, api_keys=keys, limits=limits_from(args))
    auth = f"{len(keys)} API key(s)" if keys else "no authentication"
    try:
        web.run_app(
            server.app(),
            host=args.host,
            port=args.port,
            access_log=None,
            shutdown_timeout=5.0,
            print=lambda *_: print(
                f"kyutai-tts serve: ws://{args.host}:{args.port}{STREAMING_PATH} ({auth}, "
                f"{args.max_sessions} slots); Ctrl+C to stop",
                file=sys.stderr,
            ),
        )
    finally:
        engine.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m kyutai_tts_plugin.server` (the same as `kyutai-tts serve`)."""
    parser = argparse.ArgumentParser(prog="kyutai-tts serve", description=__doc__.splitlines()[0])
    add_serve_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
