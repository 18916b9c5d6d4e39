"""A stand-in for Kyutai's moshi-server TTS route, written from its source (no model; generated audio).

What it reproduces, read in kyutai-labs/moshi at e6a55d2722a65870ef52a6c9f6ecfc0e90f38362 (see
docs/moshi-server-protocol.md for the details and line-level facts):

* ``rust/moshi-server/src/main.rs``: the ``Py`` module's route (``/api/tts_streaming``, a websocket
  GET). The key is the ``kyutai-api-key`` header, else the ``auth_id`` query parameter; a key not in
  ``authorized_ids`` is refused with HTTP 401 before the upgrade. The query is parsed as
  ``PyStreamingQuery``: only ``auth_id``, ``format`` (default ``OggOpus``) and ``voice`` are read, any
  other parameter is ignored; a ``format`` that is not one of the four names is a 400.
* ``rust/moshi-server/src/py_module.rs``: a free batch slot is taken at once, or the client gets
  ``Error {message: "no free channels"}`` and an (empty) close. Once a slot is taken the first message
  is ``Ready``. Client messages: msgpack ``Text {text}``, ``Voice {embeddings, shape}``, ``Eos``; a
  websocket text frame is Text, the binary frame ``b"\\0"`` is Eos. Each Text is split into words on
  its own (``tts_preprocess.rs``), so a word cut across two messages becomes two words. An unknown
  voice falls back to the default voice without telling the client. A word's ``Text {text, start_s,
  stop_s}`` goes out when the next word starts (steps / 12.5), the last one at the end. After Eos and
  the end of the audio (or at once when Eos comes before any text), the channel is dropped and the
  send loop closes the websocket: a close frame with an EMPTY payload (axum / tokio-tungstenite's
  ``close()``), no end message. The server pings (empty payload) every 10 s and drops a session
  whose client sent nothing (not even a pong) for 30 s.

The "model" speaks each word as ``frames_per_word`` frames of 1920 float32 samples (80 ms at 24 kHz)
of a sine whose pitch depends on the word's position, so a test can check that every sample arrived.
Only the ``PcmMessagePack`` and ``Pcm`` formats are produced (Ogg/Opus needs an encoder; asking for
them is refused with HTTP 501, which moshi-server never does).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
from aiohttp import WSMsgType, web

FRAME_SIZE = 1920  # samples per step, py_module.rs FRAME_SIZE
SAMPLE_RATE = 24000
FRAME_RATE = 12.5  # steps per second: start_s/stop_s are steps / 12.5
FORMATS = ("Pcm", "PcmMessagePack", "OggOpus", "OggOpusMessagePack")
DEFAULT_VOICE = "unmute-prod-website/default_voice.wav"
_BREAK = re.compile(r'<break\s+time="([0-9.]+)s"\s*/>')
_EMPTY_CLOSE_FRAME = b"\x88\x00"  # FIN + opcode 8 (close), payload length 0


def preprocess(text: str) -> list[str]:
    """The words moshi-server's tokenizer makes of one Text message (tts_preprocess.rs): break tags
    become ``<break time="X.XXs">`` words, the rest is normalized and split on whitespace."""
    words: list[str] = []
    last = 0
    segments: list[str | float] = []
    for m in _BREAK.finditer(text):
        if text[last : m.start()].strip():
            segments.append(text[last : m.start()])
        segments.append(float(m.group(1)))
        last = m.end()
    if text[last:].strip():
        segments.append(text[last:].strip())
    for seg in segments:
        if isinstance(seg, float):
            if seg > 0:
                words.append(f'<break time="{seg:.2f}s">')
            continue
        norm = seg.replace("\u2019", "'").replace("\u2013", "").replace(":", " ")
        norm = norm.replace("(", "").replace(")", "")
        words.extend(norm.split())
    return words


def word_audio(index: int, frames: int) -> np.ndarray:
    """The generated speech of the `index`-th word: a sine, 0.3 amplitude, float32."""
    t = np.arange(frames * FRAME_SIZE, dtype=np.float64) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * (220.0 + 20.0 * (index % 16)) * t)).astype(np.float32)


@dataclass
class FakeSession:
    """What the fake saw and did for one websocket (for assertions)."""

    query: dict[str, str]
    voice: str  # the voice used: the requested one if known, else the default (moshi-server's fallback)
    format: str
    words: list[str] = field(default_factory=list)  # words received, after preprocessing
    voice_message: dict[str, Any] | None = None
    eos: bool = False
    sent: list[dict[str, Any]] = field(default_factory=list)  # messages sent, in order
    pcm: list[np.ndarray] = field(default_factory=list)  # audio frames sent, in order
    ended: str = ""  # "close" (empty close frame), "close <code>", "drop" (TCP, no close frame)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def audio(self) -> np.ndarray:
        return np.concatenate(self.pcm) if self.pcm else np.zeros(0, np.float32)

    @property
    def timings(self) -> list[tuple[str, float, float]]:
        return [(m["text"], m["start_s"], m["stop_s"]) for m in self.sent if m["type"] == "Text"]


class FakeMoshiServer:
    """moshi-server's ``Py`` TTS module on 127.0.0.1 (see the module docstring).

    ``batch_size``: concurrent sessions (channels). ``voices``: the voices it knows (others fall back to
    ``default_voice``). ``frames_per_word``: steps (80 ms) per word. ``final_frames``: steps after the
    last word. Fault injection for tests of the client: ``end_after_frames`` ends every session after
    that many audio frames, as ``end_how``: ``"close"`` (empty close frame, what moshi-server sends
    when it drops a channel), ``"close 1011"`` (a close frame with that code) or ``"drop"`` (the TCP
    connection closes with no close frame).
    """

    def __init__(
        self,
        *,
        authorized_ids: Iterable[str] = ("public_token",),
        batch_size: int = 2,
        voices: Iterable[str] = (DEFAULT_VOICE, "expresso/ex03-ex01_happy_001_channel1_334s.wav"),
        default_voice: str = DEFAULT_VOICE,
        frames_per_word: int = 3,
        final_frames: int = 4,
        ping_interval_s: float = 10.0,
        idle_timeout_s: float = 30.0,
        end_after_frames: int | None = None,
        end_how: str = "close",
    ) -> None:
        self.authorized_ids = set(authorized_ids)
        self.batch_size = batch_size
        self.voices = set(voices)
        self.default_voice = default_voice
        self.frames_per_word = frames_per_word
        self.final_frames = final_frames
        self.ping_interval_s = ping_interval_s
        self.idle_timeout_s = idle_timeout_s
        self.end_after_frames = end_after_frames
        self.end_how = end_how
        self.sessions: list[FakeSession] = []
        self.refused: int = 0  # sessions refused with "no free channels"
        self._used = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> FakeMoshiServer:
        app = web.Application()
        app.router.add_get("/api/tts_streaming", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"ws://127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeMoshiServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the route -------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        key = request.headers.get("kyutai-api-key", query.get("auth_id"))
        if key not in self.authorized_ids:
            return web.Response(status=401)
        fmt = query.get("format", "OggOpus")
        if fmt not in FORMATS:
            # axum's Query extractor rejects the request before the handler runs.
            return web.Response(
                status=400, text=f"Failed to deserialize query string: unknown variant `{fmt}`"
            )
        if fmt.startswith("OggOpus"):
            return web.Response(status=501, text="the fake moshi-server has no Opus encoder")
        ws = web.WebSocketResponse(autoclose=False, autoping=True)
        await ws.prepare(request)
        msgpack_format = fmt == "PcmMessagePack"
        if self._used >= self.batch_size:
            self.refused += 1
            if msgpack_format:  # the raw formats carry no messages: just the close
                await ws.send_bytes(msgpack.packb({"type": "Error", "message": "no free channels"}))
            await self._close(request, ws, "close", None)
            return ws
        voice = query.get("voice")
        session = FakeSession(query, voice if voice in self.voices else self.default_voice, fmt)
        self.sessions.append(session)
        self._used += 1
        try:
            await self._serve(request, ws, session, msgpack_format)
        finally:
            self._used -= 1
            session.done.set()
        return ws

    async def _serve(
        self, request: web.Request, ws: web.WebSocketResponse, session: FakeSession, msgpack_format: bool
    ) -> None:
        inbox: asyncio.Queue[str | None] = asyncio.Queue()  # words, None = Eos
        client_gone = asyncio.Event()

        async def send(message: dict[str, Any], pcm: np.ndarray | None = None) -> None:
            session.sent.append(message)
            if pcm is not None:
                session.pcm.append(pcm)
                if not msgpack_format:
                    await ws.send_bytes(pcm.astype("<f4").tobytes())
                    return
                await ws.send_bytes(
                    msgpack.packb({"type": "Audio", "pcm": pcm.tolist()}, use_single_float=True)
                )
            elif msgpack_format:
                await ws.send_bytes(msgpack.packb(message))

        async def recv_loop() -> None:
            # py_module.rs recv_loop: any message (a pong too) restarts the 30 s idle timeout.
            while True:
                try:
                    msg = await asyncio.wait_for(ws.receive(), self.idle_timeout_s)
                except asyncio.TimeoutError:
                    break
                if msg.type == WSMsgType.TEXT:
                    for w in preprocess(msg.data):
                        inbox.put_nowait(w)
                elif msg.type == WSMsgType.BINARY:
                    if msg.data == b"\0":
                        inbox.put_nowait(None)
                        continue
                    try:
                        obj = msgpack.unpackb(msg.data, raw=False)
                        kind = obj["type"]
                    except Exception:
                        break  # rmp_serde fails: the recv loop ends, the channel is dropped
                    if kind == "Text":
                        for w in preprocess(str(obj["text"])):
                            inbox.put_nowait(w)
                    elif kind == "Eos":
                        inbox.put_nowait(None)
                    elif kind == "Voice":
                        session.voice_message = obj
                    else:
                        break
                elif msg.type in (WSMsgType.PING, WSMsgType.PONG):
                    continue
                else:  # close, closing, closed, error
                    break
            client_gone.set()

        async def ping_loop() -> None:
            while True:
                await asyncio.sleep(self.ping_interval_s)
                try:
                    await ws.ping(b"")
                except (ConnectionError, RuntimeError):
                    return

        receiver = asyncio.create_task(recv_loop())
        pinger = asyncio.create_task(ping_loop())
        try:
            await send({"type": "Ready"})
            end = await self._generate(session, inbox, client_gone, send)
            session.ended = end
            await self._close(request, ws, end, client_gone)
        except (ConnectionError, RuntimeError):
            session.ended = "client gone"
        finally:
            receiver.cancel()
            pinger.cancel()

    async def _generate(
        self,
        session: FakeSession,
        inbox: asyncio.Queue[str | None],
        client_gone: asyncio.Event,
        send: Callable[..., Awaitable[None]],
    ) -> str:
        """Speak words as they come; returns how the session ends (see `end_how`)."""
        steps = 0
        prev_word_start: int | None = None
        pending_word: str | None = None
        index = 0
        frames = 0
        while True:
            if inbox.empty() and client_gone.is_set():
                return "close"  # the recv loop ended: the channel is dropped (moshi-server: Disconnected)
            getter = asyncio.ensure_future(inbox.get())
            gone = asyncio.ensure_future(client_gone.wait())
            await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            if not getter.done():
                getter.cancel()
                continue
            word = getter.result()
            if word is None:
                session.eos = True
                if index == 0:
                    return "close"  # Eos before any text: the channel is dropped at once, no audio
                break
            session.words.append(word)
            # A new word starts: the previous one is finished (MASK_WORD_FINISHED marks a word's start).
            if pending_word is not None and prev_word_start is not None:
                await send(
                    {
                        "type": "Text",
                        "text": pending_word,
                        "start_s": prev_word_start / FRAME_RATE,
                        "stop_s": steps / FRAME_RATE,
                    }
                )
            pending_word, prev_word_start = word, steps
            for frame in np.split(word_audio(index, self.frames_per_word), self.frames_per_word):
                if self.end_after_frames is not None and frames >= self.end_after_frames:
                    return self.end_how
                await send({"type": "Audio"}, frame)
                frames += 1
                steps += 1
            index += 1
        for frame in np.split(np.zeros(self.final_frames * FRAME_SIZE, np.float32), self.final_frames):
            if self.end_after_frames is not None and frames >= self.end_after_frames:
                return self.end_how
            await send({"type": "Audio"}, frame)
            frames += 1
            steps += 1
        # MASK_IS_EOS: the last word's timing, then the channel is dropped and the websocket closed.
        if pending_word is not None and prev_word_start is not None:
            await send(
                {
                    "type": "Text",
                    "text": pending_word,
                    "start_s": prev_word_start / FRAME_RATE,
                    "stop_s": steps / FRAME_RATE,
                }
            )
        return "close"

    async def _close(
        self, request: web.Request, ws: web.WebSocketResponse, how: str, client_gone: asyncio.Event | None
    ) -> None:
        """End the session as tokio-tungstenite does: our close frame, the client's reply, TCP close.

        ``client_gone`` is set by the session's receive loop when the client's close frame arrives; with
        no receive loop (a refused session) the close frame is read here."""
        transport = request.transport
        if how == "drop" or transport is None:
            if transport is not None:
                transport.close()
            return
        if how == "close":
            transport.write(_EMPTY_CLOSE_FRAME)
        else:
            code = int(how.split()[1])
            transport.write(bytes([0x88, 2]) + code.to_bytes(2, "big"))
        try:  # bounded: a client that never answers is dropped
            if client_gone is not None:
                await asyncio.wait_for(client_gone.wait(), 5.0)
            else:
                await asyncio.wait_for(ws.receive(), 5.0)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            pass
        transport.close()


async def start_fake_moshi_server(**kwargs: Any) -> FakeMoshiServer:
    return await FakeMoshiServer(**kwargs).start()
