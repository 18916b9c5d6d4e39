"""`kyutai-tts serve` with default options behaves as moshi-server's TTS route (issue 12), written from
the protocol as moshi-server's source defines it (docs/moshi-server-protocol.md): `/api/build_info`,
Voice messages, the OggOpus default and the Ogg formats (checked with standard decoders), ignored client
generation parameters, the default voice for an unknown one, refusal at capacity, server pings. Our
extensions are each checked behind the option that enables them."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import aiohttp
import msgpack
import numpy as np
import pytest
import torch

from kyutai_tts_plugin.checkpoint import VoiceLibrary, load_voice_embedding
from kyutai_tts_plugin.errors import EngineFullError
from kyutai_tts_plugin.remote import RemoteTTS
from kyutai_tts_plugin.server import (
    DEFAULT_FORMAT,
    RunningServer,
    ServerLimits,
    add_serve_arguments,
    limits_from,
)
from kyutai_tts_plugin.testing import HANG_GUARD_S, TEST_VOICES
from kyutai_tts_plugin.types import SessionOptions
from tests.test_server import (
    GREEDY,
    HEADERS,
    KEY,
    TEXT,
    StartServer,
    assert_close_audio,
    collect,
    expect_error,
    finish,
    reference,
    wait_idle,
)

# What moshi-server's build_info handler returns (main.rs, utils.rs BuildInfo): these keys, all strings.
BUILD_INFO_KEYS = {
    "build_timestamp",
    "build_date",
    "git_branch",
    "git_timestamp",
    "git_date",
    "git_hash",
    "git_describe",
    "rustc_host_triple",
    "rustc_version",
    "cargo_target_triple",
}


@pytest.fixture
async def moshi_like(make_server: StartServer) -> RunningServer:
    """Our server with ServerLimits' defaults (the test fixture otherwise honours client parameters)."""
    return await make_server(allow_client_params=ServerLimits().allow_client_params)


async def connect(server: RunningServer, query: str = "", **kwargs: Any) -> aiohttp.ClientWebSocketResponse:
    """A websocket with exactly `query` (no format added: the server's default applies)."""
    http = aiohttp.ClientSession()
    try:
        ws = await http.ws_connect(f"{server.url}/api/tts_streaming?{query}", headers=HEADERS, **kwargs)
    except BaseException:
        await http.close()
        raise
    ws._test_http = http  # type: ignore[attr-defined]
    return ws


async def raw_messages(ws: aiohttp.ClientWebSocketResponse) -> tuple[list[bytes], int | None]:
    """Every binary message until the server closes, undecoded, and the close code."""
    out: list[bytes] = []

    async def read() -> None:
        async for msg in ws:
            assert msg.type == aiohttp.WSMsgType.BINARY, msg
            out.append(msg.data)

    try:
        await asyncio.wait_for(read(), HANG_GUARD_S)
    finally:
        await ws.close()
        await ws._test_http.close()  # type: ignore[attr-defined]
    return out, ws.close_code


@pytest.fixture
def opened_options(tiny_engine: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[SessionOptions]]:
    """The options of every engine session the server opens."""
    seen: list[SessionOptions] = []
    original = tiny_engine.open_session

    def spy(options: SessionOptions | None = None, **overrides: Any) -> Any:
        seen.append(options or SessionOptions())
        return original(options, **overrides)

    monkeypatch.setattr(tiny_engine, "open_session", spy)
    yield seen


# -- 2. GET /api/build_info ---------------------------------------------------------------------


async def test_build_info_and_modules_info_answer_without_a_key(moshi_like: RunningServer) -> None:
    async with aiohttp.ClientSession() as http:  # no key: Unmute's health check sends none
        async with http.get(moshi_like.http_url + "/api/build_info") as resp:
            assert resp.status == 200
            info = await resp.json()
        async with http.get(moshi_like.http_url + "/api/modules_info") as resp:
            assert resp.status == 200
            modules = await resp.json()
    assert set(info) == BUILD_INFO_KEYS and all(isinstance(v, str) and v for v in info.values())
    assert modules == [
        {
            "type": "py",
            "path": "/api/tts_streaming",
            "script": "kyutai-tts",
            "used_slots": "0",
            "total_slots": "4",
        }
    ]


# -- 3. Voice messages --------------------------------------------------------------------------


def voice_message(embedding: np.ndarray | torch.Tensor) -> bytes:
    """A Voice message as moshi-server's voice cloning writes it (rmp_serde: f32 values, usize shape)."""
    array = np.asarray(embedding, dtype=np.float32)
    message = {"type": "Voice", "embeddings": array.reshape(-1).tolist(), "shape": list(array.shape)}
    return msgpack.packb(message, use_single_float=True)


def voice_file_embedding(engine: Any, name: str) -> torch.Tensor:
    return load_voice_embedding(engine.voices.resolve(name), 32)


async def test_a_voice_message_speaks_with_its_embedding(make_server: StartServer, tiny_engine: Any) -> None:
    """As Unmute for a custom voice: the Voice message right after connecting, before Ready is read.
    Greedy, so the audio must equal in-process synthesis with the voice file the embedding came from."""
    voice = TEST_VOICES[2]
    assert voice != tiny_engine.default_voice
    want = reference(tiny_engine, options=replace(GREEDY, voice=voice))
    server = await make_server()
    ws = await connect(server, "format=PcmMessagePack&temperature=0&n_q=8")
    await ws.send_bytes(voice_message(voice_file_embedding(tiny_engine, voice)))
    await ws.send_bytes(msgpack.packb({"type": "Text", "text": TEXT}))
    await ws.send_bytes(msgpack.packb({"type": "Eos"}))
    messages, code = await finish(ws)
    assert code == 1000 and messages[0] == {"type": "Ready"}
    pcm = np.concatenate([np.asarray(m["pcm"], np.float32) for m in messages if m["type"] == "Audio"])
    assert_close_audio(pcm, want.pcm)
    default = reference(tiny_engine)
    assert pcm.shape != default.pcm.shape or np.abs(pcm - default.pcm).max() > 1e-3  # the voice mattered


async def test_a_voice_message_with_default_options(
    moshi_like: RunningServer, tiny_engine: Any, opened_options: list[SessionOptions]
) -> None:
    embedding = voice_file_embedding(tiny_engine, TEST_VOICES[2])
    ws = await connect(moshi_like, "format=PcmMessagePack")
    await ws.send_bytes(voice_message(embedding))
    await ws.send_bytes(msgpack.packb({"type": "Text", "text": "hello there"}))
    await ws.send_bytes(msgpack.packb({"type": "Eos"}))
    messages, code = await finish(ws)
    assert code == 1000 and any(m["type"] == "Audio" for m in messages)
    [options] = opened_options
    assert options.voice is not None and options.voice.startswith("custom:")
    loaded = load_voice_embedding(tiny_engine.voices.resolve(options.voice), 32)
    assert torch.equal(loaded, embedding)


def _shape(shape: list[int], n: int | None = None, value: Any = 0.5) -> bytes:
    count = int(np.prod(shape)) if n is None else n
    return msgpack.packb({"type": "Voice", "embeddings": [value] * count, "shape": shape})


@pytest.mark.parametrize(
    ("payload", "code", "close_code", "contains"),
    [
        (_shape([1, 31, 125]), "invalid_voice", 1008, "takes [1, 32, T]"),
        (_shape([32, 125]), "invalid_voice", 1008, "takes [1, 32, T]"),
        (_shape([1, 32, 251]), "invalid_voice", 1008, "T <= 250"),
        (_shape([1, 32, 10], n=319), "invalid_voice", 1008, "319 values for shape [1, 32, 10]"),
        (_shape([1, 32, 10], value="0.5"), "invalid_voice", 1008, "float32 numbers"),
        (_shape([1, 32, 10], value=True), "invalid_voice", 1008, "float32 numbers"),
        (_shape([1, 32, 10], value=float("nan")), "invalid_voice", 1008, "finite"),
        (_shape([1, 32, 10], value=1e300), "invalid_voice", 1008, "finite"),  # inf as float32
        (msgpack.packb({"type": "Voice", "embeddings": [0.5]}), "malformed_message", 1003, "'shape'"),
        (
            msgpack.packb({"type": "Voice", "embeddings": [0.5], "shape": [1.0]}),
            "malformed_message",
            1003,
            "'shape'",
        ),
        (_shape([1, 32, 400]), "message_too_large", 1009, "(Voice messages: 100000 bytes)"),
    ],
    ids=[
        "channels",
        "two-dims",
        "too-long",
        "value-count",
        "strings",
        "bools",
        "nan",
        "inf",
        "no-shape",
        "float-shape",
        "too-large",
    ],
)
async def test_bad_voice_messages_get_a_clear_error(
    make_server: StartServer, payload: bytes, code: str, close_code: int, contains: str
) -> None:
    server = await make_server(max_voice_message_bytes=100_000)
    ws = await connect(server, "format=PcmMessagePack")
    await ws.send_bytes(payload)
    await expect_error(ws, code, close_code, contains)


async def test_a_voice_message_after_text_is_refused(moshi_like: RunningServer, tiny_engine: Any) -> None:
    ws = await connect(moshi_like, "format=PcmMessagePack")
    await ws.send_bytes(msgpack.packb({"type": "Text", "text": "hello"}))
    await ws.send_bytes(voice_message(voice_file_embedding(tiny_engine, TEST_VOICES[2])))
    await expect_error(ws, "bad_request", 1008, "before the first Text")


def test_registered_embeddings_resolve_by_content_and_are_bounded(tmp_path: Any) -> None:
    library = VoiceLibrary(tmp_path, suffix=".x@1.safetensors")
    library.max_registered = 2
    a, b, c = (torch.full((1, 4, 3), float(i)) for i in range(3))
    name_a = library.register_embedding(a)
    assert library.register_embedding(a.clone()) == name_a  # same content, same name
    assert torch.equal(load_voice_embedding(library.resolve(name_a), 4), a)
    path_a = library.resolve(name_a)
    library.register_embedding(b)
    library.register_embedding(c)  # over the bound: the least recently used (a) goes, with its file
    assert not path_a.exists()
    with pytest.raises(Exception, match="not found"):
        library.resolve(name_a)
    assert name_a not in library.list()  # registered voices are not listed as voices of the repo


# -- 4. formats ---------------------------------------------------------------------------------


def ogg_pages(data: bytes) -> list[bytes]:
    """Split a byte string into Ogg pages (RFC 3533 page header), asserting it holds whole pages only."""
    pages = []
    while data:
        assert data[:4] == b"OggS", data[:8]
        n_segments = data[26]
        body = sum(data[27 : 27 + n_segments])
        size = 27 + n_segments + body
        assert len(data) >= size, "a message ends inside an Ogg page"
        pages.append(data[:size])
        data = data[size:]
    return pages


def decode_ogg_opus(data: bytes) -> np.ndarray:
    """Decode with FFmpeg (PyAV, in the server extra) and, where installed, libsndfile; both standard
    Ogg/Opus decoders must read the whole stream and agree on its length. The samples at 24 kHz."""
    import av

    with av.open(io.BytesIO(data)) as container:
        frames = list(container.decode(audio=0))
    rate = frames[0].sample_rate  # FFmpeg decodes Opus at 48 kHz
    pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in frames])[:: rate // 24000]
    try:
        import soundfile
    except ImportError:
        return pcm
    sf_pcm, sf_rate = soundfile.read(io.BytesIO(data), dtype="float32")
    assert sf_rate == 24000 and len(sf_pcm) == len(pcm)
    return np.asarray(sf_pcm)


async def test_default_format_is_ogg_opus_as_unmutes_non_streaming_helper_reads_it(
    moshi_like: RunningServer,
) -> None:
    """Unmute's voices.py: no format in the query, words as text frames, b"\\0" Eos, every binary message
    fed to an Ogg/Opus stream reader, a normal close at the end. No msgpack at all."""
    assert DEFAULT_FORMAT == "OggOpus"
    audio_before = moshi_like.server.metrics.audio_seconds
    ws = await connect(moshi_like, "voice=" + TEST_VOICES[0] + "&cfg_alpha=1.5")
    for word in TEXT.split():
        await ws.send_str(word)
    await ws.send_bytes(b"\0")
    messages, code = await raw_messages(ws)
    assert code == 1000
    header = ogg_pages(messages[0])  # the Ogg header first, on its own, as moshi-server
    assert [p[28:36] for p in header] == [b"OpusHead", b"OpusTags"]
    for m in messages[1:]:
        ogg_pages(m)  # each message holds whole pages: a stream reader may be fed message by message
    pcm = decode_ogg_opus(b"".join(messages))
    sent = moshi_like.server.metrics.audio_seconds - audio_before
    assert len(pcm) == round(sent * 24000)  # every sample the engine made, no more
    assert np.sqrt(np.mean(pcm**2)) > 1e-3  # not silence


async def test_ogg_opus_message_pack(moshi_like: RunningServer) -> None:
    ws = await connect(moshi_like, "format=OggOpusMessagePack")
    await ws.send_bytes(msgpack.packb({"type": "Text", "text": "hello there friend"}))
    await ws.send_bytes(msgpack.packb({"type": "Eos"}))
    raw, code = await raw_messages(ws)
    assert code == 1000
    messages = [msgpack.unpackb(m) for m in raw]
    assert messages[0] == {"type": "Ready"}
    ogg = [m for m in messages if m["type"] == "OggOpus"]
    assert messages[1] is ogg[0]  # the header right after Ready
    assert [m["text"] for m in messages if m["type"] == "Text"] == ["hello", "there", "friend"]
    # moshi-server's `data` is a Vec<u8> without serde_bytes: a msgpack array of integers, not bin
    assert all(isinstance(m["data"], list) and all(type(b) is int for b in m["data"]) for m in ogg)
    pcm = decode_ogg_opus(b"".join(bytes(m["data"]) for m in ogg))
    assert len(pcm) > 0 and len(pcm) % 1920 == 0


# -- 5. client generation parameters ------------------------------------------------------------


# Unmute sends cfg_alpha=1.5; the others are our extensions
CLIENT_PARAMS = "format=PcmMessagePack&cfg_alpha=1.5&temperature=0&top_k=5&seed=3&n_q=8&padding_bonus=1"


async def test_client_generation_parameters_are_ignored_by_default(
    moshi_like: RunningServer, opened_options: list[SessionOptions]
) -> None:
    # even values we would refuse (cfg 1.7 is not one of the checkpoint's), as moshi-server ignores them
    ws = await connect(moshi_like, "format=PcmMessagePack&cfg_alpha=1.7&top_k=many&n_q=99&temperature=0")
    await ws.send_bytes(msgpack.packb({"type": "Text", "text": "hello"}))
    await ws.send_bytes(msgpack.packb({"type": "Eos"}))
    messages, code = await finish(ws)
    assert code == 1000 and not [m for m in messages if m["type"] == "Error"]
    assert opened_options == [SessionOptions()]


async def test_allow_client_params_honours_them(
    make_server: StartServer, opened_options: list[SessionOptions]
) -> None:
    server = await make_server(allow_client_params=True)
    ws = await connect(server, CLIENT_PARAMS)
    await ws.send_bytes(msgpack.packb({"type": "Text", "text": "hello"}))
    await ws.send_bytes(msgpack.packb({"type": "Eos"}))
    assert (await finish(ws))[1] == 1000
    assert opened_options == [
        SessionOptions(cfg_coef=1.5, temperature=0.0, top_k=5, seed=3, n_q=8, padding_bonus=1.0)
    ]


# -- 6. unknown voice ---------------------------------------------------------------------------


@pytest.mark.parametrize("voice", ["nobody-here", "../../etc/passwd"])
async def test_an_unknown_voice_is_the_default_voice(
    moshi_like: RunningServer,
    opened_options: list[SessionOptions],
    caplog: pytest.LogCaptureFixture,
    voice: str,
) -> None:
    caplog.set_level(logging.INFO, logger="kyutai_tts_plugin.server")
    ws = await connect(moshi_like, f"format=PcmMessagePack&voice={voice}")
    await ws.send_bytes(msgpack.packb({"type": "Text", "text": "hello"}))
    await ws.send_bytes(msgpack.packb({"type": "Eos"}))
    messages, code = await finish(ws)
    assert code == 1000 and not [m for m in messages if m["type"] == "Error"]
    assert opened_options == [SessionOptions()]  # voice None: the engine's default voice
    [record] = [r for r in caplog.records if "using the default voice" in r.getMessage()]
    assert record.levelno == logging.INFO and voice[:8] in record.getMessage()


async def test_remote_tts_with_an_unknown_voice_speaks_the_default(moshi_like: RunningServer) -> None:
    session = RemoteTTS(moshi_like.url, api_key=KEY).open_session(SessionOptions(voice="nobody-here"))
    session.push_text("hello there")
    session.flush()
    pcm, words, _ = await collect(session)
    assert len(pcm) > 0 and [w.word for w in words] == ["hello", "there"]


# -- 7. at capacity -----------------------------------------------------------------------------


@pytest.fixture
def engine_full(tiny_engine: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every slot of the engine taken by in-process sessions, and no queue (serve's default)."""
    monkeypatch.setattr(tiny_engine, "max_waiting", 0)
    sessions = [tiny_engine.open_session(GREEDY) for _ in range(tiny_engine.max_sessions)]
    try:
        yield
    finally:
        for s in sessions:
            s.cancel()


async def test_at_capacity_a_connection_is_refused_at_once(
    moshi_like: RunningServer, tiny_engine: Any, engine_full: None
) -> None:
    ws = await connect(moshi_like, "format=PcmMessagePack")
    # no Ready first: Unmute's start_up turns an Error before Ready into "at capacity, try another"
    messages, code = await finish(ws)
    assert [m["type"] for m in messages] == ["Error"]
    assert messages[0]["message"].startswith("no free channels") and code == 1013
    for fmt in ("OggOpus", "Pcm"):  # audio-only formats: no message, just the close
        raw, code = await raw_messages(await connect(moshi_like, f"format={fmt}"))
        assert raw == [] and code == 1013
    session = RemoteTTS(moshi_like.url, api_key=KEY).open_session()
    session.push_text("hello")
    session.flush()
    with pytest.raises(EngineFullError, match="no free channels"):
        await collect(session)


async def test_a_wait_queue_is_opt_in(moshi_like: RunningServer, tiny_engine: Any, engine_full: None) -> None:
    tiny_engine.max_waiting = 1  # what `serve --max-waiting 1` gives the engine
    ws = await connect(moshi_like, "format=PcmMessagePack")
    assert msgpack.unpackb((await ws.receive(timeout=HANG_GUARD_S)).data) == {"type": "Ready"}
    await ws.send_bytes(msgpack.packb({"type": "Eos"}))
    assert (await finish(ws))[1] == 1000


def test_serve_defaults_are_moshi_servers() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args([])
    limits = limits_from(args)
    assert args.max_waiting == 0 and limits.heartbeat_s == 10.0
    assert not limits.allow_client_params and not limits.strict_voices
    args = parser.parse_args(
        ["--max-waiting", "8", "--allow-client-params", "--strict-voices", "--ping-interval", "0"]
    )
    limits = limits_from(args)
    assert args.max_waiting == 8 and limits.heartbeat_s is None
    assert limits.allow_client_params and limits.strict_voices


# -- 8. server pings ----------------------------------------------------------------------------


async def test_server_pings_keep_a_silent_client_connected(
    make_server: StartServer, tiny_engine: Any
) -> None:
    """The client never pings and sends nothing but pongs for longer than the idle timeout: pings keep
    coming, and the session still works afterwards (a pong is activity, as in moshi-server)."""
    server = await make_server(heartbeat_s=0.05, idle_timeout_s=1.0)
    ws = await connect(server, "format=PcmMessagePack", autoping=False)
    assert msgpack.unpackb((await ws.receive(timeout=HANG_GUARD_S)).data) == {"type": "Ready"}
    pings = 0
    while pings < 30:  # 30 pings span 1.5 s: past the idle timeout, were pongs not counted
        msg = await ws.receive(timeout=HANG_GUARD_S)
        assert msg.type == aiohttp.WSMsgType.PING, msg
        assert msg.data == b""  # empty payload, as moshi-server
        await ws.pong(msg.data)
        pings += 1
    await ws.send_bytes(msgpack.packb({"type": "Text", "text": "still here"}))
    await ws.send_bytes(msgpack.packb({"type": "Eos"}))
    messages = []
    while True:
        msg = await ws.receive(timeout=HANG_GUARD_S)
        if msg.type == aiohttp.WSMsgType.PING:
            await ws.pong(msg.data)
        elif msg.type == aiohttp.WSMsgType.BINARY:
            messages.append(msgpack.unpackb(msg.data))
        else:
            break
    await ws.close()
    await ws._test_http.close()  # type: ignore[attr-defined]
    assert [m["text"] for m in messages if m["type"] == "Text"] == ["still", "here"]
    assert ws.close_code == 1000
    await wait_idle(tiny_engine)


async def test_a_client_that_answers_no_ping_still_times_out(make_server: StartServer) -> None:
    """Without pongs (or messages), the idle timeout still ends the connection with a reason."""
    server = await make_server(heartbeat_s=0.05, idle_timeout_s=0.3)
    ws = await connect(server, "format=PcmMessagePack", autoping=False)
    errors = []
    while True:
        msg = await ws.receive(timeout=HANG_GUARD_S)
        if msg.type == aiohttp.WSMsgType.BINARY:
            errors += [m for m in [msgpack.unpackb(msg.data)] if m["type"] == "Error"]
        elif msg.type != aiohttp.WSMsgType.PING:
            break
    await ws._test_http.close()  # type: ignore[attr-defined]
    assert [e["code"] for e in errors] == ["idle_timeout"]


# -- the adapters through a server with default options -------------------------------------------


async def test_livekit_tts_through_a_default_server(moshi_like: RunningServer, tiny_engine: Any) -> None:
    """The LiveKit TTS sends its options (cfg 1.7 would be refused if honoured) and an unknown voice:
    the server ignores the one and falls back for the other, as moshi-server; the stream ends cleanly."""
    from kyutai_tts_plugin.livekit import TTS as LiveKitTTS
    from tests.test_livekit import run_stream, timed_words, tokens_of

    audio_before = moshi_like.server.metrics.audio_seconds
    remote = RemoteTTS(moshi_like.url, api_key=KEY)
    tts = LiveKitTTS(engine=remote, voice="nobody-here", cfg_coef=1.7)
    events = await asyncio.wait_for(run_stream(tts, tokens_of(TEXT)), HANG_GUARD_S)
    assert events and [ev.is_final for ev in events].count(True) == 1 and events[-1].is_final
    pcm = np.concatenate([np.frombuffer(ev.frame.data, dtype=np.int16) for ev in events])
    sent = moshi_like.server.metrics.audio_seconds - audio_before
    assert round(sent * 24000) <= len(pcm) <= round(sent * 24000) + 240  # + the emitter's 10 ms marker
    assert "".join(timed_words(events)) == TEXT
    await wait_idle(tiny_engine)


async def test_pipecat_service_through_a_default_server(moshi_like: RunningServer, tiny_engine: Any) -> None:
    from pipecat.frames.frames import ErrorFrame, TTSStoppedFrame, TTSTextFrame

    from tests.test_pipecat import Bot, run_bot, tokens_of

    async def script(bot: Bot) -> None:
        await bot.say()
        await bot.recorder.wait_for(lambda: bool(bot.recorder.down(TTSStoppedFrame)), "the stop frame")

    bot = await run_bot(RemoteTTS(moshi_like.url, api_key=KEY), [tokens_of(TEXT)], script)
    rec = bot.recorder
    assert not rec.up(ErrorFrame) and not rec.down(ErrorFrame)
    assert [f.text for f in rec.down(TTSTextFrame)] == TEXT.split()
    await wait_idle(tiny_engine)
