"""The network server (moshi-server protocol) and `RemoteTTS`, on the tiny random-weight model.

Greedy decoding makes output deterministic, so what comes over the network must equal in-process
synthesis of the same text. Nothing here depends on the machine's speed: a test waits for the event
that proves its point (an engine step, a task's end), with HANG_GUARD_S only as a limit for a hang.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import msgpack
import numpy as np
import pytest

from kyutai_tts_plugin.errors import (
    EngineFullError,
    InvalidInputError,
    SessionClosedError,
    VoiceNotFoundError,
)
from kyutai_tts_plugin.remote import (
    RemoteError,
    RemoteErrorKind,
    RemoteTTS,
    error_from_message,
    streaming_url,
)
from kyutai_tts_plugin.server import (
    RunningServer,
    add_serve_arguments,
    api_keys_from,
    limits_from,
)
from kyutai_tts_plugin.testing import HANG_GUARD_S, TEST_VOICES, StepGate
from kyutai_tts_plugin.types import AudioChunk, SessionOptions, WordTiming
from tests.conftest import SERVER_TEST_KEY

KEY = SERVER_TEST_KEY
HEADERS = {"kyutai-api-key": KEY}
TEXT = "Hello world, this is a test of the server."
GREEDY = SessionOptions(temperature=0.0, n_q=8)
GREEDY_QUERY = "format=PcmMessagePack&temperature=0&n_q=8"

StartServer = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
async def server(make_server: StartServer) -> RunningServer:
    return await make_server()


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait for `condition` (checked at each turn of the loop); the deadline only catches a hang."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.005)


async def wait_idle(engine: Any) -> None:
    await until(lambda: not engine.active_sessions, "every engine session closed")


# TEXT + TEXT takes 186 engine steps, the first audio frame comes after about 20: parked after step 40,
# such a session is mid-utterance for as long as a test needs, on any machine.
MID_UTTERANCE_STEP = 40


@contextmanager
def engine_parked_after(engine: Any, steps: int = MID_UTTERANCE_STEP) -> Iterator[StepGate]:
    """Park the engine after `steps` more steps (until the block ends)."""
    gates: list[StepGate] = []
    seen = 0

    def count(step: Any) -> None:
        nonlocal seen
        seen += 1
        if seen == steps and gates:
            gates[0].hold()  # the gate, added after this observer, parks at this very step

    remove = engine.add_step_observer(count)
    gates.append(StepGate(engine))
    try:
        yield gates[0]
    finally:
        remove()
        gates[0].close()


def reference(engine: Any, text: str = TEXT, options: SessionOptions = GREEDY) -> Any:
    return engine.synthesize(text, options)


async def ws_session(
    server: RunningServer, query: str = GREEDY_QUERY, headers: dict[str, str] = HEADERS
) -> aiohttp.ClientWebSocketResponse:
    if "format=" not in query:
        query = f"format=PcmMessagePack&{query}"  # the Error messages these tests read are msgpack
    http = aiohttp.ClientSession()
    try:
        ws = await http.ws_connect(f"{server.url}/api/tts_streaming?{query}", headers=headers)
    except BaseException:
        await http.close()
        raise
    ws._test_http = http  # type: ignore[attr-defined]  # closed by `finish`
    return ws


async def finish(ws: aiohttp.ClientWebSocketResponse) -> tuple[list[dict[str, Any]], int | None]:
    """Every message until the server closes, and the close code."""
    messages = []

    async def read() -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                messages.append(msgpack.unpackb(msg.data))

    try:
        await asyncio.wait_for(read(), HANG_GUARD_S)
    finally:
        await ws.close()
        await ws._test_http.close()  # type: ignore[attr-defined]
    return messages, ws.close_code


async def collect(session: Any) -> tuple[np.ndarray, list[WordTiming], list[AudioChunk]]:
    chunks, words = [], []

    async def read() -> None:
        async for ev in session:
            (chunks if isinstance(ev, AudioChunk) else words).append(ev)

    await asyncio.wait_for(read(), HANG_GUARD_S)
    pcm = np.concatenate([c.pcm for c in chunks]) if chunks else np.zeros(0, np.float32)
    return pcm, words, chunks


def assert_close_audio(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5


# -- websocket route: Kyutai's clients -------------------------------------------------------------


async def test_websocket_round_trip_equals_in_process(server: RunningServer, tiny_engine: Any) -> None:
    want = reference(tiny_engine)
    ws = await ws_session(server)
    for i, word in enumerate(TEXT.split(" ")):  # as Unmute sends: whole words, spaces in front
        await ws.send_bytes(msgpack.packb({"type": "Text", "text": word if i == 0 else " " + word}))
    await ws.send_bytes(msgpack.packb({"type": "Eos"}))
    messages, code = await finish(ws)

    assert code == 1000
    assert messages[0] == {"type": "Ready"}
    audio = [m for m in messages if m["type"] == "Audio"]
    assert all(len(m["pcm"]) == 1920 for m in audio)
    assert_close_audio(np.concatenate([np.asarray(m["pcm"], np.float32) for m in audio]), want.pcm)
    texts = [m for m in messages if m["type"] == "Text"]
    assert [m["text"] for m in texts] == [w.word for w in want.words]
    for m, w in zip(texts, want.words, strict=True):
        assert m["start_s"] == pytest.approx(w.start_s) and m["stop_s"] == pytest.approx(w.end_s)
    # a word's timing comes no later than the audio frame it starts in
    frames_before = 0
    for m in messages:
        if m["type"] == "Audio":
            frames_before += 1
        elif m["type"] == "Text":
            assert frames_before * 0.08 <= m["start_s"] + 0.04


async def test_text_frames_nul_eos_and_raw_pcm_format(server: RunningServer, tiny_engine: Any) -> None:
    """moshi-server also takes websocket text frames and a b"\\0" Eos; format=Pcm is raw float32 LE."""
    want = reference(tiny_engine)
    ws = await ws_session(server, "format=Pcm&temperature=0&n_q=8")
    await ws.send_str(TEXT)
    await ws.send_bytes(b"\0")
    frames = []
    async for msg in ws:
        frames.append(np.frombuffer(msg.data, "<f4"))
    await ws._test_http.close()  # type: ignore[attr-defined]
    assert ws.close_code == 1000
    assert_close_audio(np.concatenate(frames), want.pcm)


async def test_each_message_ends_a_word(server: RunningServer, tiny_engine: Any) -> None:
    """moshi-server splits every Text message into whole words: "Hel" + "lo" are two words."""
    ws = await ws_session(server)
    for part in ("Hel", "lo", " there", " friend"):
        await ws.send_bytes(msgpack.packb({"type": "Text", "text": part}))
    await ws.send_bytes(msgpack.packb({"type": "Eos"}))
    messages, _ = await finish(ws)
    assert [m["text"] for m in messages if m["type"] == "Text"] == ["Hel", "lo", "there", "friend"]


async def test_eos_without_text_closes_cleanly(server: RunningServer) -> None:
    ws = await ws_session(server)
    await ws.send_bytes(msgpack.packb({"type": "Eos"}))
    messages, code = await finish(ws)
    assert messages == [{"type": "Ready"}] and code == 1000


async def test_voice_query_parameter(server: RunningServer, tiny_engine: Any) -> None:
    voice = TEST_VOICES[1]
    want = reference(tiny_engine, options=SessionOptions(temperature=0.0, n_q=8, voice=voice))
    ws = await ws_session(server, f"{GREEDY_QUERY}&voice={voice}")
    await ws.send_bytes(msgpack.packb({"type": "Text", "text": TEXT}))
    await ws.send_bytes(msgpack.packb({"type": "Eos"}))
    messages, _ = await finish(ws)
    pcm = np.concatenate([np.asarray(m["pcm"], np.float32) for m in messages if m["type"] == "Audio"])
    assert_close_audio(pcm, want.pcm)


async def test_slow_reader_gets_all_audio_and_a_clean_close(server: RunningServer, tiny_engine: Any) -> None:
    want = reference(tiny_engine)
    ws = await ws_session(server)
    await ws.send_bytes(msgpack.packb({"type": "Text", "text": TEXT}))
    await ws.send_bytes(msgpack.packb({"type": "Eos"}))
    assert msgpack.unpackb((await ws.receive()).data) == {"type": "Ready"}
    # The engine finishes the utterance before this client reads a single frame: the audio waits in the
    # server's queue and the socket buffers, and must all arrive before the clean close.
    await wait_idle(tiny_engine)
    pcm = []
    async for msg in ws:
        m = msgpack.unpackb(msg.data)
        if m["type"] == "Audio":
            pcm.append(np.asarray(m["pcm"], np.float32))
    await ws._test_http.close()  # type: ignore[attr-defined]
    assert ws.close_code == 1000
    assert_close_audio(np.concatenate(pcm), want.pcm)


async def test_client_disconnect_mid_utterance_frees_the_slot(
    server: RunningServer, tiny_engine: Any
) -> None:
    with engine_parked_after(tiny_engine) as gate:
        ws = await ws_session(server)
        await ws.send_bytes(msgpack.packb({"type": "Text", "text": TEXT + " " + TEXT}))
        await ws.send_bytes(msgpack.packb({"type": "Eos"}))
        async for msg in ws:
            if msgpack.unpackb(msg.data)["type"] == "Audio":
                break
        gate.wait_held()
        assert tiny_engine.active_sessions == 1  # parked mid-utterance: it cannot have finished
        ws._writer.transport.abort()  # no close handshake
        await ws._test_http.close()  # type: ignore[attr-defined]
        await wait_idle(tiny_engine)  # freed by the disconnect, while the engine is still parked
    health = await get_json(server, "/api/health")
    assert health["status"] == "ok" and health["sessions"] == 0


# -- errors: each limit and bad message gets its documented Error --------------------------------


async def expect_error(
    ws: aiohttp.ClientWebSocketResponse, code: str, close_code: int, contains: str = ""
) -> dict[str, Any]:
    messages, got_close = await finish(ws)
    errors = [m for m in messages if m["type"] == "Error"]
    assert len(errors) == 1, messages
    assert errors[0]["code"] == code
    assert contains in errors[0]["message"]
    assert "Traceback" not in errors[0]["message"]
    assert got_close == close_code
    return errors[0]


@pytest.mark.parametrize(
    ("payload", "code", "close_code", "contains"),
    [
        (b"\x93not msgpack", "malformed_message", 1003, "malformed message"),
        (msgpack.packb([1, 2, 3]), "malformed_message", 1003, "msgpack map"),
        (msgpack.packb({"text": "no type"}), "malformed_message", 1003, "'type'"),
        (msgpack.packb({"type": "Dance"}), "malformed_message", 1003, "unknown message type 'Dance'"),
        (msgpack.packb({"type": "Text", "text": 42}), "malformed_message", 1003, "'text' must be a string"),
        (
            msgpack.packb({"type": "Voice", "embeddings": [0.0], "shape": [1]}),
            "invalid_voice",
            1008,
            "[1, 32, T]",
        ),
        (b"x" * 5000, "message_too_large", 1009, "exceeds the limit of 4096 bytes"),
    ],
)
async def test_bad_messages(
    make_server: StartServer, payload: bytes, code: str, close_code: int, contains: str
) -> None:
    server = await make_server(max_message_bytes=4096)
    ws = await ws_session(server)
    await ws.send_bytes(payload)
    await expect_error(ws, code, close_code, contains)


async def test_text_length_limit(make_server: StartServer) -> None:
    server = await make_server(max_text_chars=20)
    ws = await ws_session(server)
    await ws.send_bytes(msgpack.packb({"type": "Text", "text": "twelve chars"}))
    await ws.send_bytes(msgpack.packb({"type": "Text", "text": " and then more"}))
    await expect_error(ws, "text_too_long", 1008, "limit of 20 characters")


async def test_text_after_eos(server: RunningServer) -> None:
    ws = await ws_session(server)
    await ws.send_bytes(msgpack.packb({"type": "Text", "text": "one two three four five six"}))
    await ws.send_bytes(msgpack.packb({"type": "Eos"}))
    await ws.send_bytes(msgpack.packb({"type": "Text", "text": "late"}))
    await expect_error(ws, "text_after_eos", 1008, "Text after Eos")


async def test_idle_timeout(make_server: StartServer, tiny_engine: Any) -> None:
    server = await make_server(idle_timeout_s=0.3)
    ws = await ws_session(server)
    await ws.send_bytes(msgpack.packb({"type": "Text", "text": "only"}))
    await expect_error(ws, "idle_timeout", 1008, "no message for 0.3 s")
    await wait_idle(tiny_engine)


async def test_session_duration_limit(make_server: StartServer) -> None:
    server = await make_server(max_session_s=0.3, idle_timeout_s=10)
    ws = await ws_session(server)
    await expect_error(ws, "session_too_long", 1008, "exceeded 0.3 s")


async def test_sessions_per_key_limit(make_server: StartServer) -> None:
    server = await make_server(max_sessions_per_key=1)
    first = await ws_session(server)
    assert msgpack.unpackb((await first.receive()).data) == {"type": "Ready"}
    second = await ws_session(server)
    await expect_error(second, "too_many_sessions", 1013, "limit 1")
    await first.send_bytes(msgpack.packb({"type": "Eos"}))
    await finish(first)
    # the server's handler ends just after the close handshake that ended `finish`
    await until(lambda: server.server.metrics.connections == 0, "both connections ended")
    third = await ws_session(server)  # the slot of the first is free again
    await third.send_bytes(msgpack.packb({"type": "Eos"}))
    assert (await finish(third))[1] == 1000


@pytest.mark.parametrize(
    ("query", "code", "contains"),
    [
        ("temperature=warm", "bad_request", "invalid parameter temperature='warm'"),
        ("n_q=1.5", "bad_request", "expected an integer"),
        ("cfg_alpha=9", "bad_request", "cfg_coef=9"),
        ("seed=-1", "bad_request", "seed"),
        ("voice=nobody-here", "unknown_voice", "unknown voice 'nobody-here'"),
        ("voice=../voices/" + TEST_VOICES[0], "invalid_voice", "invalid voice name"),
        ("voice=/etc/passwd", "invalid_voice", "invalid voice name"),
        ("voice=~/secret", "invalid_voice", "invalid voice name"),
        ("voice=a/../../b", "invalid_voice", "invalid voice name"),
        ("voice=x.safetensors", "invalid_voice", "invalid voice name"),
        ("voice=a%5Cb", "invalid_voice", "invalid voice name"),
    ],
)
async def test_bad_query(make_server: StartServer, query: str, code: str, contains: str) -> None:
    server = await make_server(strict_voices=True)  # default: such voices are the default voice
    ws = await ws_session(server, query)
    error = await expect_error(ws, code, 1008, contains)
    assert "/tmp" not in error["message"] and "tiny-checkpoint" not in error["message"]


async def test_engine_full_is_no_free_channels(
    server: RunningServer, tiny_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(options: Any = None) -> Any:
        raise EngineFullError("engine full: 4 sessions are speaking")

    monkeypatch.setattr(tiny_engine, "open_session", full)
    ws = await ws_session(server)
    assert msgpack.unpackb((await ws.receive()).data) == {"type": "Ready"}
    await ws.send_bytes(
        msgpack.packb({"type": "Text", "text": "hello"})
    )  # the slot is taken at the first text
    error = await expect_error(ws, "no_free_channels", 1013)
    assert error["message"].startswith("no free channels")  # what moshi-server says; Unmute checks it
    session = RemoteTTS(server.url, api_key=KEY).open_session(GREEDY)
    session.push_text("hello")
    session.flush()
    with pytest.raises(EngineFullError):
        await collect(session)


async def test_ready_slot_says_ready_once_the_session_holds_an_engine_slot(
    make_server: StartServer, tiny_checkpoint: Any
) -> None:
    # What RemoteTTS asks, so that a client can bound its wait in the server's queue: moshi-server's
    # meaning of Ready (a slot is held), with the session taken at connect.
    from kyutai_tts_plugin.engine import TTSEngine

    engine = TTSEngine.from_pretrained(
        tiny_checkpoint,
        voice_repo=tiny_checkpoint / "voices",
        max_sessions=1,
        max_waiting=4,
        idle_timeout_s=None,
    )
    hog = engine.open_session(SessionOptions(n_q=2))
    hog.push_text("two words")  # holds the only slot until cancelled
    try:
        await until(lambda: hog.run is not None, "the hog's slot")
        server = await make_server(engine=engine)
        ws = await ws_session(server, f"{GREEDY_QUERY}&ready=slot")
        hog_ended = False
        first: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        async def first_message() -> None:
            msg = await ws.receive()
            first.set_result(hog_ended)  # whether the slot was free when the first message came
            assert msgpack.unpackb(msg.data) == {"type": "Ready"}

        reader = asyncio.create_task(first_message())
        await until(lambda: len(engine._waiting) == 1, "the session queued at connect, before any Text")
        hog_ended = True
        hog.cancel()
        await asyncio.wait_for(reader, HANG_GUARD_S)
        assert first.result(), "Ready came while the session was still queued"
        await ws.send_bytes(msgpack.packb({"type": "Text", "text": TEXT}))
        await ws.send_bytes(msgpack.packb({"type": "Eos"}))
        messages, code = await finish(ws)
        assert code == 1000 and any(m["type"] == "Audio" for m in messages)
    finally:
        hog.cancel()
        engine.close()


async def test_unauthenticated_client_is_refused(server: RunningServer) -> None:
    for headers in ({}, {"kyutai-api-key": "wrong"}, {"kyutai-api-key": KEY + "x"}):
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await ws_session(server, headers=headers)
        assert info.value.status == 401
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.http_url}/api/tts", data="hello") as resp:
            assert resp.status == 401
            body = await resp.json()
            assert body["type"] == "Error" and "kyutai-api-key" in body["message"]
        for path in ("/metrics", "/api/voices"):
            async with http.get(server.http_url + path) as resp:
                assert resp.status == 401
        async with http.get(server.http_url + "/api/health") as resp:
            assert resp.status == 200  # liveness probes carry no key
    # the key may also come as auth_id (browsers cannot set websocket headers)
    ws = await ws_session(server, f"auth_id={KEY}", headers={})
    await ws.send_bytes(msgpack.packb({"type": "Eos"}))
    assert (await finish(ws))[1] == 1000
    session = RemoteTTS(server.url).open_session(GREEDY)
    session.flush()
    with pytest.raises(RemoteError, match="unauthorized") as refused:
        await collect(session)
    assert refused.value.kind is RemoteErrorKind.BAD_REQUEST


async def test_unsupported_format_and_plain_get(server: RunningServer) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await ws_session(server, "format=mp3")
    assert info.value.status == 400
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.http_url}/api/tts_streaming", headers=HEADERS) as resp:
            assert resp.status == 400 and "websocket" in (await resp.json())["message"]


async def test_no_api_key_configured_means_open(make_server: StartServer) -> None:
    server = await make_server(api_keys=())
    ws = await ws_session(server, headers={})
    await ws.send_bytes(msgpack.packb({"type": "Eos"}))
    assert (await finish(ws))[1] == 1000


# -- HTTP routes ---------------------------------------------------------------------------------


async def get_json(server: RunningServer, path: str) -> Any:
    async with aiohttp.ClientSession(headers=HEADERS) as http:
        async with http.get(server.http_url + path) as resp:
            assert resp.status == 200
            return await resp.json()


async def test_http_streaming_wav_and_pcm(server: RunningServer, tiny_engine: Any) -> None:
    want = reference(tiny_engine)
    async with aiohttp.ClientSession(headers=HEADERS) as http:
        body = {"text": TEXT, "temperature": 0, "n_q": 8}
        async with http.post(f"{server.http_url}/api/tts", json=body) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"] == "audio/wav"
            assert resp.headers.get("Transfer-Encoding") == "chunked"
            wav = await resp.read()
        assert wav[:4] == b"RIFF" and wav[8:16] == b"WAVEfmt "
        assert struct.unpack("<HHI", wav[20:28]) == (1, 1, 24000)
        samples = np.frombuffer(wav[44:], "<i2")
        expected = (np.clip(want.pcm, -1, 1) * 32767).round().astype("<i2")
        assert samples.shape == expected.shape and np.abs(samples.astype(int) - expected).max() <= 1

        # moshi-server's POST form, raw float32 back
        url = f"{server.http_url}/api/tts_streaming?format=pcm_f32le&{GREEDY_QUERY}"
        async with http.post(url, json={"text": TEXT, "voice": tiny_engine.default_voice}) as resp:
            assert resp.status == 200
            assert_close_audio(np.frombuffer(await resp.read(), "<f4"), want.pcm)

        async with http.post(f"{server.http_url}/api/tts?format=pcm&{GREEDY_QUERY}", data=TEXT) as resp:
            assert resp.status == 200
            assert np.frombuffer(await resp.read(), "<i2").shape == expected.shape


async def test_http_errors(make_server: StartServer) -> None:
    server = await make_server(max_message_bytes=1000, max_text_chars=50, strict_voices=True)
    async with aiohttp.ClientSession(headers=HEADERS) as http:
        cases = [
            ({"data": "x" * 2000}, 413, "message_too_large"),
            ({"data": "word " * 20}, 413, "text_too_long"),
            (
                {"data": b"{not json", "headers": {"Content-Type": "application/json"}},
                400,
                "malformed_message",
            ),
            ({"json": {"text": "hi", "voice": "../../x"}}, 400, "invalid_voice"),
            ({"json": {"text": "hi", "voice": "ghost"}}, 404, "unknown_voice"),
            ({"json": {"text": "hi", "top_k": "many"}}, 400, "bad_request"),
            ({"data": "hi", "params": {"format": "mp3"}}, 400, "bad_request"),
        ]
        for kwargs, status, code in cases:
            async with http.post(f"{server.http_url}/api/tts", **kwargs) as resp:
                assert resp.status == status, kwargs
                body = await resp.json()
                assert body["type"] == "Error" and body["code"] == code, body


async def test_health_voices_and_metrics(server: RunningServer, tiny_engine: Any) -> None:
    ws = await ws_session(server)
    await ws.send_bytes(msgpack.packb({"type": "Dance"}))
    await finish(ws)
    health = await get_json(server, "/api/health")
    assert health == {"status": "ok", "sessions": 0, "slots": 4, "connections": 0, "sample_rate": 24000}
    voices = await get_json(server, "/api/voices")
    assert voices["voices"] == tiny_engine.list_voices()
    async with aiohttp.ClientSession(headers=HEADERS) as http:
        async with http.get(server.http_url + "/metrics") as resp:
            text = await resp.text()
    assert 'kyutai_tts_errors_total{code="malformed_message"} 1' in text
    assert "kyutai_tts_engine_slots 4" in text


# -- RemoteTTS: the same contract as the in-process engine ----------------------------------------


async def test_remote_streams_mid_word_fragments(server: RunningServer, tiny_engine: Any) -> None:
    text = "Hello  world, this is a test:of the  server.  "
    want = reference(tiny_engine, text)
    remote = RemoteTTS(server.url, api_key=KEY)
    assert remote.sample_rate == 24000
    session = remote.open_session(GREEDY)
    fragments = ["Hel", "lo  wo", "rld", ", th", "is is a ", "test:", "of the  serv", "er.  "]
    for fragment in fragments:  # each fragment's whole words go out before the next fragment comes
        session.push_text(fragment)
        await until(lambda: not session._outbox, "the words sent")
    session.flush()
    pcm, words, chunks = await collect(session)

    assert_close_audio(pcm, want.pcm)
    assert [c.start_s for c in chunks] == pytest.approx([0.08 * i for i in range(len(chunks))])
    assert [w.word for w in words] == [w.word for w in want.words]
    assert [w.start_s for w in words] == pytest.approx([w.start_s for w in want.words])
    assert [w.end_s for w in words] == pytest.approx([w.end_s for w in want.words])
    assert [w.text for w in words][:-1] == [w.text for w in want.words][:-1]
    # the contract: the slices join back to the pushed text (trailing whitespace goes to the last word)
    assert "".join(w.text for w in words) == text
    assert words[-1].text.startswith(want.words[-1].text)
    with pytest.raises(SessionClosedError):
        session.push_text("more")


async def test_remote_sends_only_whole_words(server: RunningServer) -> None:
    remote = RemoteTTS(server.url, api_key=KEY)
    session = remote.open_session(GREEDY)
    session.push_text("Hel")
    session.push_text("lo wor")
    session.push_text("ld")
    assert session._outbox == ["Hello"] or session._outbox == []  # the sender may have taken it already
    assert "".join(t for t in session._outbox if t) in ("Hello", "")
    session.flush()
    _, words, _ = await collect(session)
    assert [w.word for w in words] == ["Hello", "world"]


async def test_remote_cancel_mid_utterance_frees_the_server_slot(
    server: RunningServer, tiny_engine: Any
) -> None:
    session = RemoteTTS(server.url, api_key=KEY).open_session(GREEDY)
    session.push_text(TEXT + " " + TEXT)
    session.flush()
    got = 0

    async def read() -> None:
        nonlocal got
        async for ev in session:
            if isinstance(ev, AudioChunk):
                got += 1
                if got == 2:
                    gate.wait_held()
                    assert tiny_engine.active_sessions == 1  # parked mid-utterance
                    session.cancel()

    with engine_parked_after(tiny_engine) as gate:
        await asyncio.wait_for(read(), HANG_GUARD_S)
        assert got == 2  # nothing after cancel, and no error
        await wait_idle(tiny_engine)  # freed by the cancel, while the engine is still parked
    with pytest.raises(SessionClosedError):
        session.push_text("x")
    session.cancel()  # idempotent


async def test_remote_cancel_before_connecting(server: RunningServer, tiny_engine: Any) -> None:
    session = RemoteTTS(server.url, api_key=KEY).open_session(GREEDY)
    session.push_text("never spoken ")
    session.cancel()
    assert [ev async for ev in session] == []
    # Once the client's task has ended it can open nothing more; then the server has closed whatever
    # connection it made, and no engine session was ever opened for it.
    await asyncio.wait([session._task], timeout=HANG_GUARD_S)
    assert session._task.done()
    await until(lambda: server.server.metrics.connections == 0, "the server closed the connection")
    assert tiny_engine.active_sessions == 0
    assert server.server.metrics.sessions["started"] == 0


async def test_remote_flush_without_text(server: RunningServer) -> None:
    session = RemoteTTS(server.url, api_key=KEY).open_session(GREEDY)
    session.flush()
    session.flush()
    pcm, words, _ = await collect(session)
    assert pcm.size == 0 and words == []


async def test_remote_push_from_another_thread(server: RunningServer, tiny_engine: Any) -> None:
    want = reference(tiny_engine)
    session = RemoteTTS(server.url, api_key=KEY).open_session(GREEDY)

    def feed() -> None:
        for word in TEXT.split(" "):
            session.push_text(word + " ")
        session.flush()

    await asyncio.to_thread(feed)
    pcm, _, _ = await collect(session)
    assert_close_audio(pcm, want.pcm)


async def test_remote_errors_map_to_engine_errors(make_server: StartServer) -> None:
    server = await make_server(strict_voices=True)
    remote = RemoteTTS(server.url, api_key=KEY)
    session = remote.open_session(SessionOptions(voice="nobody"))
    session.push_text("hi")
    session.flush()
    with pytest.raises(VoiceNotFoundError, match="unknown voice 'nobody'"):
        await collect(session)
    session = remote.open_session(SessionOptions(cfg_coef=9.0))
    session.flush()
    with pytest.raises(InvalidInputError, match="cfg_coef"):
        await collect(session)
    with pytest.raises(InvalidInputError):
        remote.open_session(SessionOptions(other_voice="x"))
    with pytest.raises(InvalidInputError):
        remote.open_session(SessionOptions(temperature=-1))


async def test_remote_connection_refused() -> None:
    session = RemoteTTS("ws://127.0.0.1:9", connect_timeout_s=2).open_session()
    session.push_text("hello")
    session.flush()
    with pytest.raises(RemoteError, match="cannot connect") as failed:
        await collect(session)
    assert failed.value.kind is RemoteErrorKind.CONNECT_FAILED


async def test_remote_connect_timeout_is_a_timeout() -> None:
    # A listener that never answers the websocket handshake (the kernel completes the TCP one).
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        session = RemoteTTS(f"ws://127.0.0.1:{port}", connect_timeout_s=0.2).open_session()
        session.push_text("hello")
        session.flush()
        with pytest.raises(RemoteError, match="timed out") as failed:
            await collect(session)
    assert failed.value.kind is RemoteErrorKind.TIMEOUT


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("text_too_long", RemoteErrorKind.BAD_REQUEST),
        ("unauthorized", RemoteErrorKind.BAD_REQUEST),
        ("idle_timeout", RemoteErrorKind.TIMEOUT),
        ("engine_error", RemoteErrorKind.REFUSED),
        (None, RemoteErrorKind.REFUSED),  # moshi-server's Error has no code
    ],
)
def test_a_server_error_message_has_the_kind_of_its_code(code: str | None, kind: RemoteErrorKind) -> None:
    error = error_from_message("what the server said", code)
    assert isinstance(error, RemoteError) and error.kind is kind and error.code == code


async def test_remote_list_voices(server: RunningServer, tiny_engine: Any) -> None:
    remote = RemoteTTS(server.url, api_key=KEY)
    assert remote.list_voices() == []  # on the event loop it never blocks
    assert await remote.fetch_voices() == tiny_engine.list_voices()
    assert remote.list_voices() == tiny_engine.list_voices()
    blocking = RemoteTTS(server.http_url, api_key=KEY)
    assert await asyncio.to_thread(blocking.list_voices) == tiny_engine.list_voices()
    assert RemoteTTS(server.url, voices=["a", "b"]).list_voices() == ["a", "b"]


def test_streaming_url() -> None:
    assert str(streaming_url("http://h:8080")) == "ws://h:8080/api/tts_streaming"
    assert str(streaming_url("https://h")) == "wss://h/api/tts_streaming"
    assert str(streaming_url("ws://h:1/custom/path")) == "ws://h:1/custom/path"
    with pytest.raises(InvalidInputError):
        streaming_url("ftp://h")


def test_open_session_needs_an_event_loop() -> None:
    with pytest.raises(RuntimeError, match="event loop"):
        RemoteTTS("ws://127.0.0.1:1").open_session()


# -- CLI wiring ----------------------------------------------------------------------------------


def test_serve_arguments(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    keys = tmp_path / "keys"
    keys.write_text("# comment\nfile-key\n\n")
    monkeypatch.setenv("KYUTAI_TTS_API_KEYS", "env-a, env-b")
    args = parser.parse_args(
        ["--api-key", "cli-key", "--api-key-file", str(keys), "--idle-timeout", "5", "--body-timeout", "7"]
    )
    assert args.host == "127.0.0.1" and args.port == 8080
    assert api_keys_from(args) == ["cli-key", "env-a", "env-b", "file-key"]
    limits = limits_from(args)
    assert limits.idle_timeout_s == 5.0 and limits.body_timeout_s == 7.0
    assert limits.max_sessions_per_key is None  # half the engine's capacity, computed by the server
