"""`RemoteTTS`: the `TTSBackend` of a TTS server (`kyutai-tts serve` or Kyutai's moshi-server).

It speaks moshi-server's websocket protocol (``/api/tts_streaming``, msgpack ``Text``/``Eos`` in,
``Ready``/``Text``/``Audio``/``Error`` out), one connection per session, so the Pipecat and LiveKit
adapters work unchanged against a shared GPU server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import urllib.error
import urllib.request
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgpack
import numpy as np
from yarl import URL

from .errors import (
    EngineFullError,
    EngineTimeoutError,
    InvalidInputError,
    KyutaiTTSError,
    RemoteError,
    RemoteErrorKind,
    SessionClosedError,
    VoiceNotFoundError,
)
from .text import RawWord, WordChunker, normalize_word_text
from .types import SAMPLE_RATE, AudioChunk, SessionEvent, SessionOptions, WordTiming

logger = logging.getLogger(__name__)

STREAMING_PATH = "/api/tts_streaming"
# The query parameter that asks `kyutai-tts serve` for moshi-server's meaning of Ready (a slot is held).
READY_PARAM = "ready"
READY_ON_SLOT = "slot"
API_KEY_HEADER = "kyutai-api-key"
_EOS = None  # outbox marker
# How far ahead in the sent words a word timing is looked for (the server skips unspeakable words).
_MATCH_LOOKAHEAD = 16
_BREAK_PIECE = "<break"
# The server's close frame codes that end a complete stream: moshi-server sends an empty close payload
# (aiohttp reports its code as 0; RFC 6455 calls it 1005, "no status received"); ours sends 1000.
_NO_STATUS = 1005
_ABNORMAL_CLOSE = 1006
_NORMAL_CLOSE_CODES = (0, _NO_STATUS, 1000)

# SessionOptions field -> query parameter understood by `kyutai-tts serve --allow-client-params` (moshi-server
# and a default `serve` ignore them). Sent only when different from the defaults, so the server's apply.
_QUERY_FIELDS = (
    ("temperature", "temperature"),
    ("top_k", "top_k"),
    ("top_k_text", "top_k_text"),
    ("seed", "seed"),
    ("cfg_coef", "cfg_alpha"),
    ("n_q", "n_q"),
    ("padding_bonus", "padding_bonus"),
)


# Server Error codes (kyutai_tts_plugin/server.py ERROR_CODES) that are not raised as one of the local
# exceptions of `error_from_message`, by kind; any other code (or none, as moshi-server sends) is REFUSED.
_CODE_KINDS: dict[str, RemoteErrorKind] = {
    **dict.fromkeys(
        (
            "unauthorized",
            "message_too_large",
            "invalid_text",
            "protocol_violation",
            "text_too_long",
            "malformed_message",
            "unsupported",
            "text_after_eos",
        ),
        RemoteErrorKind.BAD_REQUEST,
    ),
    **dict.fromkeys(
        ("idle_timeout", "session_too_long", "body_timeout", "slow_reader"), RemoteErrorKind.TIMEOUT
    ),
}


def error_from_message(message: str, code: str | None = None) -> Exception:
    """The local exception for a server Error message, so callers handle remote and local alike."""
    if code in ("no_free_channels", "too_many_sessions") or message.startswith("no free channels"):
        return EngineFullError(message)
    if code == "queue_timeout":
        return EngineTimeoutError(message)
    if code in ("unknown_voice", "invalid_voice"):
        return VoiceNotFoundError(message)
    if code == "bad_request":
        return InvalidInputError(message)
    return RemoteError(message, _CODE_KINDS.get(code or "", RemoteErrorKind.REFUSED), code)


def _status_kind(status: int) -> RemoteErrorKind:
    """The kind of an HTTP refusal: the client's fault (4xx) or the server's."""
    if status == 408:
        return RemoteErrorKind.TIMEOUT
    return RemoteErrorKind.BAD_REQUEST if 400 <= status < 500 else RemoteErrorKind.REFUSED


def streaming_url(url: str) -> URL:
    """``http(s)://host:port`` or ``ws(s)://...`` -> the websocket URL of the streaming route."""
    u = URL(url)
    scheme = {"http": "ws", "https": "wss"}.get(u.scheme, u.scheme)
    if scheme not in ("ws", "wss"):
        raise InvalidInputError(f"{url!r}: expected a ws://, wss://, http:// or https:// URL")
    u = u.with_scheme(scheme)
    if u.path in ("", "/"):
        u = u.with_path(STREAMING_PATH)
    return u


class RemoteTTS:
    """A TTS server as a `TTSBackend`.

    ``url``: the server (``ws://127.0.0.1:8080`` or the full ``.../api/tts_streaming`` URL).
    ``api_key``: sent in the ``kyutai-api-key`` header. ``voices``: the names `list_voices` returns
    without asking the server. ``http_session``: an aiohttp session to reuse (default: one per
    speech session, closed with it).

    Which `SessionOptions` a server honours (the others are sent as query parameters and ignored):

    * Kyutai's moshi-server: ``voice`` only (an unknown voice is its default voice, silently);
      sampling, cfg, ``n_q`` and padding are its own configuration.
    * ``kyutai-tts serve`` with default options: the same as moshi-server (an unknown voice is the
      default voice, logged on the server). Started with ``--allow-client-params``, also
      ``temperature``, ``top_k``, ``top_k_text``, ``seed``, ``cfg_coef`` (sent as ``cfg_alpha``),
      ``n_q`` and ``padding_bonus``, checked as in-process (a bad value is `InvalidInputError`); with
      ``--strict-voices`` an unknown voice is `VoiceNotFoundError`.

    ``other_voice`` (dialogs) is refused at once: the protocol has one voice per session. A full
    server is `EngineFullError` ("no free channels") on every server, raised by the ``async for``.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        voices: Sequence[str] | None = None,
        connect_timeout_s: float = 10.0,
        http_session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.url = streaming_url(url)
        self.api_key = api_key
        self.connect_timeout_s = connect_timeout_s
        self._http_session = http_session
        self._voices = list(voices) if voices is not None else None

    @property
    def sample_rate(self) -> int:
        return SAMPLE_RATE

    @property
    def headers(self) -> dict[str, str]:
        return {API_KEY_HEADER: self.api_key} if self.api_key else {}

    def open_session(self, options: SessionOptions | None = None) -> RemoteSession:
        """Start a session; call it from the event loop that will iterate it. Connection errors and
        server refusals (full, unknown voice, ...) are raised by the ``async for``."""
        options = options or SessionOptions()
        if options.other_voice is not None:
            raise InvalidInputError("dialogs (other_voice) are not supported over the server protocol")
        if not (options.voice is None or isinstance(options.voice, str)):
            # A prompt's samples would go in a Voice message; this client sends a voice name only.
            raise InvalidInputError(
                "RemoteTTS takes a voice name: give the server a voice prompt file in its voice directory "
                "and name it, or send a Voice message with the audio (see the server's protocol)"
            )
        if options.temperature < 0 or options.top_k < 0 or options.top_k_text < 0 or options.n_q < 1:
            raise InvalidInputError("temperature, top_k and top_k_text must be >= 0 and n_q >= 1")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("RemoteTTS.open_session must be called from a running event loop") from None
        return RemoteSession(self, self.url.update_query(self._query(options)), loop)

    @staticmethod
    def _query(options: SessionOptions) -> dict[str, str]:
        # ready=slot: our server then says Ready once an engine slot is held, as moshi-server's Ready
        # always means (moshi-server ignores the parameter); `RemoteSession.wait_ready` relies on it.
        query = {"format": "PcmMessagePack", READY_PARAM: READY_ON_SLOT}
        if options.voice:
            query["voice"] = options.voice
        defaults = SessionOptions()
        for name, param in _QUERY_FIELDS:
            value = getattr(options, name)
            if value is not None and value != getattr(defaults, name):
                query[param] = str(value)
        return query

    def list_voices(self) -> list[str]:
        """The server's voices (``GET /api/voices``, ours only; Kyutai's server has no such route: []).

        On an event loop this never blocks: it returns what `fetch_voices` cached (or ``voices``)."""
        if self._voices is not None:
            return list(self._voices)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._voices = self._fetch_voices_blocking()
            return list(self._voices)
        logger.debug("RemoteTTS.list_voices on an event loop: await fetch_voices() first")
        return []

    async def fetch_voices(self) -> list[str]:
        """Ask the server for its voices (and cache them for `list_voices`)."""
        url = self._voices_url()
        async with aiohttp.ClientSession() as http:
            try:
                async with http.get(url, headers=self.headers) as resp:
                    if resp.status == 404:
                        voices: list[str] = []
                    elif resp.status != 200:
                        raise RemoteError(
                            f"GET {url}: HTTP {resp.status}: {(await resp.text())[:200]}",
                            _status_kind(resp.status),
                        )
                    else:
                        voices = list((await resp.json())["voices"])
            except aiohttp.ClientError as e:
                raise RemoteError(f"cannot reach {url}: {e}", RemoteErrorKind.CONNECT_FAILED) from None
        self._voices = voices
        return list(voices)

    def _voices_url(self) -> str:
        scheme = "https" if self.url.scheme == "wss" else "http"
        return str(self.url.with_scheme(scheme).with_path("/api/voices").with_query(None))

    def _fetch_voices_blocking(self) -> list[str]:
        url = self._voices_url()
        request = urllib.request.Request(url, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=self.connect_timeout_s) as resp:
                return list(json.loads(resp.read())["voices"])
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return []
            raise RemoteError(f"GET {url}: HTTP {e.code}", _status_kind(e.code)) from None
        except OSError as e:
            raise RemoteError(f"cannot list voices at {url}: {e}", RemoteErrorKind.CONNECT_FAILED) from None
        except (ValueError, KeyError) as e:
            raise RemoteError(f"cannot list voices at {url}: {e}", RemoteErrorKind.REFUSED) from None


@dataclass
class _Sent:
    """Text sent to the server and not yet attributed to a word timing."""

    pieces: list[str]  # the words the server may time for it, in order
    text: str  # the pushed text slice, with the whitespace before it
    break_tag: bool = False


@dataclass
class _TextMatcher:
    """Gives each word timing from the server the slice of pushed text it accounts for.

    The server names the word it spoke (normalized, e.g. "a:b" is timed as "a" and "b", an emoji not at
    all); words it skipped give their text to the next word spoken, as the in-process engine does.
    """

    sent: deque[_Sent] = field(default_factory=deque)

    def add(self, unit: RawWord) -> None:
        if unit.break_s is not None:
            self.sent.append(_Sent([_BREAK_PIECE], unit.text, break_tag=True))
        else:
            self.sent.append(_Sent(normalize_word_text(unit.word).split(), unit.text))

    def take(self, word: str, flushed: bool) -> str:
        """The text of the next timed `word`. Once the text is complete (`flushed`), trailing text that
        no word can follow (whitespace) goes to this word, as the engine gives it to the last word."""
        text = self._take(word)
        if flushed and all(not item.pieces for item in self.sent):
            text += "".join(item.text for item in self.sent)
            self.sent.clear()
        return text

    def _take(self, word: str) -> str:
        want = _BREAK_PIECE if word.startswith(_BREAK_PIECE) else word
        for k, item in enumerate(self.sent):
            if k >= _MATCH_LOOKAHEAD:
                break
            if want in item.pieces:
                text = "".join(self.sent.popleft().text for _ in range(k)) + item.text
                item.text = ""
                del item.pieces[: item.pieces.index(want) + 1]
                if not item.pieces:
                    self.sent.popleft()
                return text
        # The server normalizes differently (e.g. Kyutai's drops "–"): assume one word per unit.
        return self.sent.popleft().text if self.sent else ""


class RemoteSession:
    """One utterance on one websocket. See `kyutai_tts_plugin.types.TTSSession` for the contract."""

    _count = 0

    def __init__(self, backend: RemoteTTS, url: URL, loop: asyncio.AbstractEventLoop) -> None:
        RemoteSession._count += 1
        self._id = f"remote-{RemoteSession._count}"
        self._backend = backend
        self._url = url
        self._loop = loop
        self._lock = threading.Lock()  # push_text/flush/cancel may come from any thread
        self._chunker = WordChunker()
        self._matcher = _TextMatcher()
        self._outbox: list[str | None] = []
        self._flushed = False
        self._eos_sent = False  # Eos written to the socket: a normal close after it ends the stream
        self._cancelled = False
        self._finished = False
        self._error: BaseException | None = None
        self._events: deque[SessionEvent] = deque()
        self._samples = 0
        self._outbox_ready = asyncio.Event()
        self._event_ready = asyncio.Event()
        self._server_ready = asyncio.Event()  # the server's Ready came (or audio did, or the end)
        self._cleanup: asyncio.Future[None] | None = None  # closing the websocket and HTTP session
        self._task = loop.create_task(self._run(), name=f"kyutai-tts {self._id}")

    # -- the public contract ------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self._id

    def push_text(self, fragment: str) -> None:
        """Append raw text (any split); whole words are sent as soon as whitespace ends them."""
        if not isinstance(fragment, str):
            raise InvalidInputError(f"push_text expects a str, got {type(fragment).__name__}")
        with self._lock:
            self._check_open("push_text")
            self._queue(self._chunker.push(fragment), eos=False)
        self._call(self._outbox_ready.set)

    def flush(self) -> None:
        """The text is complete: send the last word and Eos; the event stream ends after the audio."""
        with self._lock:
            if self._cancelled or self._flushed:
                return
            self._queue(self._chunker.finish(), eos=True)
            self._flushed = True
        self._call(self._outbox_ready.set)

    def cancel(self) -> None:
        """Stop now: the connection is closed, which frees the server's slot."""
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
        self._call(self._do_cancel)

    async def wait_ready(self) -> None:
        """Return once the server serves this session: its ``Ready``, sent when an engine slot is held
        (moshi-server's, and ours with the ``ready=slot`` this client asks for), so a server that
        queues sessions keeps this waiting; or once the session ended (the ``async for`` raises why).
        Bound it to bound the wait for a slot, as the LiveKit adapter does with its
        ``conn_options.timeout``."""
        await self._server_ready.wait()

    async def __aiter__(self) -> AsyncIterator[SessionEvent]:  # type: ignore[override]
        while True:
            if self._events:
                yield self._events.popleft()
                continue
            if self._finished:
                break
            self._event_ready.clear()
            await self._event_ready.wait()
        if self._error is not None and not self._cancelled:
            raise self._error

    # -- internals ----------------------------------------------------------------------------

    def _check_open(self, what: str) -> None:
        if self._cancelled:
            raise SessionClosedError(f"{what}: session {self._id} was cancelled; open a new session")
        if self._flushed:
            raise SessionClosedError(f"{what}: session {self._id} was flushed; open a new session")

    def _queue(self, units: list[RawWord], eos: bool) -> None:
        if units:
            for unit in units:
                self._matcher.add(unit)
            self._outbox.append("".join(u.text for u in units))
        if eos:
            self._outbox.append(_EOS)

    def _call(self, fn: Any) -> None:
        """Run `fn` on the session's loop, from that loop or any other thread."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            fn()
        else:
            try:
                self._loop.call_soon_threadsafe(fn)
            except RuntimeError:  # the loop is closed: nothing left to wake
                pass

    def _do_cancel(self) -> None:
        self._events.clear()
        self._task.cancel()
        self._finish()

    def _finish(self, error: BaseException | None = None) -> None:
        if not self._finished:
            self._error = self._error or error
            self._finished = True
        self._event_ready.set()
        self._server_ready.set()

    def _emit(self, event: SessionEvent) -> None:
        self._server_ready.set()  # a server that sends no Ready: its first event says it serves us
        if not self._cancelled:
            self._events.append(event)
            self._event_ready.set()

    async def _run(self) -> None:
        http = self._backend._http_session
        own = http is None
        if http is None:
            http = aiohttp.ClientSession()
        ws: aiohttp.ClientWebSocketResponse | None = None
        sender: asyncio.Task[None] | None = None
        try:
            ws = await self._connect(http)
            if self._cancelled:
                # Cancelled while connecting, and the cancellation lost to the connection that came at
                # the same moment (asyncio.wait_for can return a result instead of raising, before
                # Python 3.12): a server that opens sessions at connect must not keep this one.
                return
            sender = asyncio.create_task(self._send_loop(ws))
            await self._receive_loop(ws)
            self._finish()
        except asyncio.CancelledError:
            self._finish()
            raise
        except Exception as e:  # never let the task die with an unretrieved exception
            if not isinstance(e, KyutaiTTSError):
                # A transport failure while reading, else a message we could not make sense of.
                lost = isinstance(e, (aiohttp.ClientError, OSError))
                kind = RemoteErrorKind.CONNECTION_LOST if lost else RemoteErrorKind.REFUSED
                e = RemoteError(f"{type(e).__name__}: {e}", kind)
            self._finish(e)
        finally:
            if sender is not None:
                sender.cancel()
            # Shielded: a cancel() during the close handshake (adapters cancel a session as soon as it
            # ends or fails) must not skip closing the HTTP session; the cleanup finishes on its own.
            self._cleanup = asyncio.ensure_future(self._close(ws, http if own else None))
            await asyncio.shield(self._cleanup)

    @staticmethod
    async def _close(ws: aiohttp.ClientWebSocketResponse | None, http: aiohttp.ClientSession | None) -> None:
        try:
            if ws is not None and not ws.closed:
                await asyncio.wait_for(ws.close(), 5.0)
        except (asyncio.TimeoutError, aiohttp.ClientError, ConnectionError, RuntimeError):
            pass
        finally:  # even when the loop shuts down and cancels this
            if http is not None:
                await http.close()

    async def _connect(self, http: aiohttp.ClientSession) -> aiohttp.ClientWebSocketResponse:
        backend = self._backend
        try:
            ws = await asyncio.wait_for(
                # autoclose=False: the stream ends on the server's close frame, without waiting for the
                # close handshake (done in `_run`'s cleanup, bounded).
                http.ws_connect(self._url, headers=backend.headers, autoping=True, autoclose=False),
                backend.connect_timeout_s,
            )
        except aiohttp.WSServerHandshakeError as e:
            raise self._refusal(e) from None
        except asyncio.TimeoutError:
            raise RemoteError(
                f"cannot connect to {self._url.with_query(None)}: timed out after "
                f"{backend.connect_timeout_s:g} s (RemoteTTS connect_timeout_s)",
                RemoteErrorKind.TIMEOUT,
            ) from None
        except (aiohttp.ClientError, OSError) as e:
            raise RemoteError(
                f"cannot connect to {self._url.with_query(None)}: {e}", RemoteErrorKind.CONNECT_FAILED
            ) from None
        return ws

    def _refusal(self, e: aiohttp.WSServerHandshakeError) -> Exception:
        # Our server explains refusals in a JSON body, but aiohttp does not keep it: say what we know.
        if e.status == 401:
            return RemoteError(
                f"unauthorized by {self._url.with_query(None)}: check the api_key",
                RemoteErrorKind.BAD_REQUEST,
                "unauthorized",
            )
        if e.status == 429:
            return EngineFullError(
                "the server refused the session (HTTP 429): too many sessions for this key"
            )
        return RemoteError(
            f"the server refused the websocket (HTTP {e.status}: {e.message})", _status_kind(e.status)
        )

    async def _send_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            await self._outbox_ready.wait()
            with self._lock:
                items, self._outbox = self._outbox, []
                self._outbox_ready.clear()
            for item in items:
                try:
                    if item is _EOS:
                        # Marked before the write: the server may answer it (close) before the write
                        # returns; a failed write means no Eos.
                        self._eos_sent = True
                        await ws.send_bytes(msgpack.packb({"type": "Eos"}))
                        return
                    await ws.send_bytes(msgpack.packb({"type": "Text", "text": item}))
                except (ConnectionError, RuntimeError, aiohttp.ClientError):
                    self._eos_sent = False
                    return  # the receive loop sees the close and reports it

    async def _receive_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.BINARY:
                self._handle(msg.data)
            elif msg.type == aiohttp.WSMsgType.CLOSE:
                # The server's close frame; its payload's code (0: an empty payload, "no status").
                self._check_end(int(msg.data or 0), str(msg.extra or ""))
                return
            elif msg.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                # No close frame from the server: the connection was lost (or we are closing it).
                if self._error is None:
                    raise RemoteError(
                        f"the connection to the server was lost{self._when()}",
                        RemoteErrorKind.CONNECTION_LOST,
                    )
                return
            elif msg.type == aiohttp.WSMsgType.ERROR:
                raise RemoteError(f"websocket error: {msg.data}", RemoteErrorKind.CONNECTION_LOST)

    def _check_end(self, code: int, reason: str) -> None:
        """The server closed the session: the normal end of the stream, or an error.

        moshi-server sends no end marker: once it has had Eos and spoken the text, its last message is
        the last word's timing and it ends the session with a close frame carrying no status code (the
        axum/tungstenite default). So the stream is complete when the server closes normally (no status,
        or 1000) after the client sent Eos, and it sent no Error. Any other close is an error: before
        Eos was sent (the text was not all spoken), or with another code (1001 going away, 1011, ...).
        """
        if self._error is not None:
            return  # the Error message says more than the close
        if code in _NORMAL_CLOSE_CODES and self._eos_sent:
            return
        status = "no status code" if code in (0, _NO_STATUS) else f"code {code}"
        detail = f": {reason}" if reason else ""
        # 1006 is never sent: a client reports it for a connection that ended without a close frame.
        kind = RemoteErrorKind.CONNECTION_LOST if code == _ABNORMAL_CLOSE else RemoteErrorKind.REFUSED
        raise RemoteError(f"the server closed the session ({status}{detail}){self._when()}", kind)

    def _when(self) -> str:
        if self._eos_sent:
            return ""
        return " before the end of the text (Eos not sent yet)"

    def _handle(self, data: bytes) -> None:
        try:
            msg = msgpack.unpackb(data, raw=False)
        except Exception:
            raise RemoteError(
                "malformed message from the server (not msgpack)", RemoteErrorKind.REFUSED
            ) from None
        if not isinstance(msg, dict):
            raise RemoteError("malformed message from the server (not a map)", RemoteErrorKind.REFUSED)
        kind = msg.get("type")
        if kind == "Audio":
            pcm = np.asarray(msg["pcm"], dtype=np.float32)
            self._emit(AudioChunk(pcm, self._samples / SAMPLE_RATE))
            self._samples += len(pcm)
        elif kind == "Text":
            word = str(msg.get("text", ""))
            if word:  # older servers send an empty Text first
                with self._lock:
                    text = self._matcher.take(word, self._flushed)
                self._emit(WordTiming(word, float(msg["start_s"]), float(msg["stop_s"]), text))
        elif kind == "Error":
            message = str(msg.get("message", "unknown error"))
            code = msg.get("code")
            self._error = self._error or error_from_message(message, code if isinstance(code, str) else None)
        elif kind == "Ready":
            self._server_ready.set()
        # message types of newer servers: nothing to do
