"""No input stops the server or starves other sessions (issue 11): every refusal is an `Error` message
(websocket) or a 4xx with a reason, never a 500 or a silent close."""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest

from kyutai_tts_plugin.engine import StreamingSession, TTSEngine
from kyutai_tts_plugin.server import RunningServer, _without_paths, start_server
from kyutai_tts_plugin.testing import HANG_GUARD_S, StepGate
from tests.test_server import (
    GREEDY_QUERY,
    HEADERS,
    KEY,
    StartServer,
    expect_error,
    finish,
    until,
    ws_session,
)

LONG_TEXT = "one two three four five six seven eight nine ten"


# query parameter -> words of the Error message (the field and its accepted range)
BAD_QUERIES = [
    (
        "seed=18446744073709551616&temperature=0.6",
        "seed=18446744073709551616 is out of range; use 0..2**63-1",
    ),
    ("seed=1.5", "invalid parameter seed='1.5': expected an integer"),
    ("seed=abc", "invalid parameter seed='abc': expected an integer"),
    ("temperature=1e-320", "temperature=9.99989e-321 is out of range; use 0 (greedy) or 1e-06..5"),
    ("temperature=inf", "temperature=inf is invalid; use a finite number"),
    ("temperature=nan", "temperature=nan is invalid"),
    ("temperature=1e999", "temperature=inf is invalid"),
    ("top_k=99999", "top_k=99999 is out of range; use 0..2048"),
    ("top_k_text=-1", "top_k_text=-1 is out of range"),
    ("n_q=0", "n_q=0 is out of range; use 1..32"),
    ("padding_bonus=1e300", "padding_bonus=1e+300 is out of range; use -10..10"),
    ("cfg_alpha=nan", "cfg_coef=nan is invalid"),
    ("n_q=" + "9" * 5000, "invalid parameter n_q='999"),
]


@pytest.mark.parametrize(("query", "contains"), BAD_QUERIES, ids=lambda x: str(x)[:30])
async def test_bad_option_over_websocket_is_an_error_message(
    make_server: StartServer, query: str, contains: str
) -> None:
    server = await make_server()
    ws = await ws_session(server, query)
    await expect_error(ws, "bad_request", 1008, contains)


BAD_JSON_OPTIONS: list[tuple[dict[str, Any], str]] = [
    ({"seed": 2**64, "temperature": 0.6}, "seed=18446744073709551616 is out of range"),
    ({"seed": 1.5}, "invalid parameter seed='1.5': expected an integer"),
    ({"seed": True}, "invalid parameter seed='True': expected an integer"),
    ({"n_q": 1.5}, "invalid parameter n_q='1.5': expected an integer"),
    ({"n_q": [8]}, "invalid parameter n_q='[8]': expected an integer"),
    ({"temperature": 1e-320}, "temperature=9.99989e-321 is out of range"),
    ({"top_k": 10**30}, "top_k=1000000000000000000000000000000 is out of range"),
    ({"padding_bonus": -11}, "padding_bonus=-11 is out of range"),
    ({"voice": ""}, ""),  # empty: the default voice, as in the query
]


@pytest.mark.parametrize(("options", "contains"), BAD_JSON_OPTIONS, ids=lambda x: str(x)[:30])
async def test_bad_option_over_http_is_a_400(
    make_server: StartServer, options: dict[str, Any], contains: str
) -> None:
    server = await make_server()
    async with aiohttp.ClientSession(headers=HEADERS) as http:
        body = {"text": "hello", "format": "pcm", **options}
        async with http.post(f"{server.http_url}/api/tts", json=body) as resp:
            if not contains:
                assert resp.status == 200
                await resp.read()
                return
            assert resp.status == 400, await resp.text()
            error = await resp.json()
    assert error["type"] == "Error" and error["code"] == "bad_request"
    assert contains in error["message"]


async def test_json_infinity_option_is_a_400(make_server: StartServer) -> None:
    server = await make_server()
    async with aiohttp.ClientSession(headers=HEADERS) as http:
        for raw in ('{"text": "hi", "n_q": 1e999}', '{"text": "hi", "temperature": 1e999}'):
            headers = {"Content-Type": "application/json"}
            async with http.post(f"{server.http_url}/api/tts", data=raw, headers=headers) as resp:
                assert resp.status == 400
                assert (await resp.json())["code"] == "bad_request"


async def test_bad_text_message_is_refused_but_the_server_keeps_serving(make_server: StartServer) -> None:
    server = await make_server()
    ws = await ws_session(server, "seed=18446744073709551616&temperature=0.6")
    await expect_error(ws, "bad_request", 1008, "seed")
    ws = await ws_session(server)
    await ws.send_bytes(msgpack.packb({"type": "Text", "text": "still here"}))
    await ws.send_bytes(msgpack.packb({"type": "Eos"}))
    messages, code = await finish(ws)
    assert code == 1000 and any(m["type"] == "Audio" for m in messages)


# -- item 3: bounded pauses and session durations -------------------------------------------------


async def test_a_long_break_is_refused_over_websocket_and_http(make_server: StartServer) -> None:
    server = await make_server()
    ws = await ws_session(server)
    await ws.send_bytes(msgpack.packb({"type": "Text", "text": 'hello <break time="99999s"/> world'}))
    await expect_error(ws, "bad_request", 1008, "break time=99999s is too long: a break is at most 10 s")
    async with aiohttp.ClientSession(headers=HEADERS) as http:
        body = {"text": 'hello <break time="99999s"/> world'}
        async with http.post(f"{server.http_url}/api/tts", json=body) as resp:
            assert resp.status == 400
            assert "at most 10 s" in (await resp.json())["message"]


async def test_http_request_has_a_maximum_duration(make_server: StartServer, tiny_engine: Any) -> None:
    """The engine is held between two steps, so the request can only end by the duration limit."""
    server = await make_server(max_session_s=0.5)
    with StepGate(tiny_engine, held=True) as gate:
        async with aiohttp.ClientSession(headers=HEADERS) as http:
            async with http.post(f"{server.http_url}/api/tts", data=LONG_TEXT) as resp:
                assert resp.status == 408
                error = await resp.json()
        assert gate.held_at is not None  # it really was waiting on the engine
    assert error["code"] == "session_too_long" and "exceeded 0.5 s" in error["message"]


# -- item 4: idle connections hold no engine slot ------------------------------------------------


async def test_silent_connections_take_no_engine_slot(make_server: StartServer, tiny_engine: Any) -> None:
    capacity = tiny_engine.max_sessions + tiny_engine.max_waiting
    server = await make_server(max_sessions_per_key=capacity + 5)
    silent = [await ws_session(server) for _ in range(capacity + 2)]
    for ws in silent:
        assert msgpack.unpackb((await ws.receive()).data) == {"type": "Ready"}
    assert tiny_engine.active_sessions == 0
    speaker = await ws_session(server)
    await speaker.send_bytes(msgpack.packb({"type": "Text", "text": "I still get a slot"}))
    await speaker.send_bytes(msgpack.packb({"type": "Eos"}))
    messages, code = await finish(speaker)
    assert code == 1000 and any(m["type"] == "Audio" for m in messages)
    for ws in silent:  # Eos without text: a clean end, no session was ever opened
        await ws.send_bytes(msgpack.packb({"type": "Eos"}))
        assert (await finish(ws)) == ([], 1000)


async def test_default_per_key_limit_is_half_the_capacity(make_server: StartServer, tiny_engine: Any) -> None:
    server = await make_server()
    limit = (tiny_engine.max_sessions + tiny_engine.max_waiting) // 2
    assert server.server.max_sessions_per_key == limit
    held = [await ws_session(server) for _ in range(limit)]
    for ws in held:
        assert msgpack.unpackb((await ws.receive()).data) == {"type": "Ready"}
    await expect_error(await ws_session(server), "too_many_sessions", 1013, f"limit {limit}")
    for ws in held:
        await ws.send_bytes(msgpack.packb({"type": "Eos"}))
        await finish(ws)


# -- item 5: a large push does not hold the event loop; order is kept ----------------------------


async def test_large_pushes_go_off_the_event_loop_in_order(
    make_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    pushed: list[tuple[bool, str]] = []  # (on the event loop thread, fragment)
    flushed = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()
    original_push, original_flush = StreamingSession.push_text, StreamingSession.flush

    def push_text(self: StreamingSession, fragment: str) -> None:
        pushed.append((threading.get_ident() == loop_thread, fragment))
        original_push(self, fragment)

    def flush(self: StreamingSession) -> None:
        original_flush(self)
        loop.call_soon_threadsafe(flushed.set)

    monkeypatch.setattr(StreamingSession, "push_text", push_text)
    monkeypatch.setattr(StreamingSession, "flush", flush)
    server = await make_server()
    ws = await ws_session(server)
    messages = [
        " ".join(f"big{j}" for j in range(300)),
        "small one",
        " ".join(f"second{j}" for j in range(200)),
        "tail",
    ]
    for text in messages:
        await ws.send_bytes(msgpack.packb({"type": "Text", "text": text}))
    await ws.send_bytes(msgpack.packb({"type": "Eos"}))
    await asyncio.wait_for(flushed.wait(), HANG_GUARD_S)
    await ws.close()
    await ws._test_http.close()  # type: ignore[attr-defined]
    assert "".join(fragment for _, fragment in pushed) == "".join(m + " " for m in messages)
    assert not any(on_loop for on_loop, fragment in pushed if len(fragment) > 256), (
        "tokenized on the event loop"
    )
    assert [f for on_loop, f in pushed if on_loop] == ["small one ", "tail "]
    assert not any(len(fragment) > 512 for _, fragment in pushed)  # the engine lock is held per piece


# -- item 8: every refusal says why; nothing is a 500 --------------------------------------------


async def raw_request(server: RunningServer, request: bytes, *, close_after: bool = False) -> bytes:
    """Send bytes as they are (what aiohttp's client cannot: bad headers, unfinished bodies)."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(request)
        await writer.drain()
        if close_after:
            return b""
        return await asyncio.wait_for(reader.read(), HANG_GUARD_S)
    finally:
        writer.close()


async def test_non_utf8_api_key_is_a_401(make_server: StartServer) -> None:
    server = await make_server()
    requests = [
        b"GET /api/voices HTTP/1.1\r\nHost: x\r\nkyutai-api-key: \xff\xfe\xc3\r\nConnection: close\r\n\r\n",
        b"GET /api/tts_streaming HTTP/1.1\r\nHost: x\r\nkyutai-api-key: \xed\xa0\x80\r\n"
        b"Connection: close\r\n\r\n",
        b"GET /api/voices?auth_id=%ff%ed%a0%80 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ]
    for request in requests:
        response = await raw_request(server, request)
        assert response.startswith(b"HTTP/1.1 401"), response[:200]
        assert b"kyutai-api-key" in response


async def test_deeply_nested_json_is_a_400(make_server: StartServer) -> None:
    server = await make_server(max_message_bytes=200_000)
    async with aiohttp.ClientSession(headers=HEADERS) as http:
        body = '{"text": "hi", "x": ' + "[" * 30_000 + "]" * 30_000 + "}"
        headers = {"Content-Type": "application/json"}
        async with http.post(f"{server.http_url}/api/tts", data=body, headers=headers) as resp:
            assert resp.status == 400
            assert (await resp.json())["code"] == "malformed_message"


async def test_frame_over_aiohttp_backstop_gets_an_error_message(make_server: StartServer) -> None:
    server = await make_server(max_message_bytes=4096)
    ws = await ws_session(server)
    await ws.send_bytes(b"x" * (5 * 4096))  # over aiohttp's own limit (4 x ours)
    await expect_error(ws, "message_too_large", 1009, "exceeds the limit of 4096 bytes")


async def test_invalid_utf8_text_frame_gets_an_error_message(make_server: StartServer) -> None:
    server = await make_server()
    ws = await ws_session(server)
    await ws.send_frame(b"caf\xc3", aiohttp.WSMsgType.TEXT)
    await expect_error(ws, "invalid_text", 1007, "not valid UTF-8")


async def test_protocol_violation_gets_an_error_message(make_server: StartServer) -> None:
    server = await make_server()
    ws = await ws_session(server)
    await ws.send_frame(b"x", 0x3)  # type: ignore[arg-type]  # a reserved opcode
    await expect_error(ws, "protocol_violation", 1002, "protocol violation")


async def test_unfinished_request_body_times_out_with_408(make_server: StartServer) -> None:
    server = await make_server(body_timeout_s=0.3)
    request = (
        f"POST /api/tts HTTP/1.1\r\nHost: x\r\nkyutai-api-key: {KEY}\r\nContent-Type: text/plain\r\n"
        "Content-Length: 100\r\n\r\nonly ten b"
    ).encode()
    response = await raw_request(server, request)
    assert response.startswith(b"HTTP/1.1 408"), response[:200]
    assert b"body_timeout" in response


async def test_client_gone_mid_upload_is_one_info_line(
    make_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = await make_server()
    caplog.set_level(logging.INFO)
    request = (
        f"POST /api/tts HTTP/1.1\r\nHost: x\r\nkyutai-api-key: {KEY}\r\nContent-Type: text/plain\r\n"
        "Content-Length: 1000\r\n\r\nhalf of it"
    ).encode()
    for _ in range(3):
        await raw_request(server, request, close_after=True)

    def gone() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "disconnected" in r.getMessage()]

    await until(lambda: len(gone()) == 3, "three disconnects logged")
    assert [r.levelno for r in gone()] == [logging.INFO] * 3
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_engine_errors_carry_no_server_paths(tiny_checkpoint: Path, tmp_path: Path) -> None:
    voices = tmp_path / "voices"
    shutil.copytree(tiny_checkpoint / "voices", voices)
    broken = next(voices.rglob("*.safetensors"))
    broken.write_bytes(broken.read_bytes()[:100])  # a truncated download
    name = str(broken.relative_to(voices)).split(".wav")[0] + ".wav"
    engine = TTSEngine.from_pretrained(tiny_checkpoint, voice_repo=voices, max_sessions=1)
    server = await start_server(engine, api_keys=(KEY,))
    try:
        ws = await ws_session(server, f"{GREEDY_QUERY}&voice={name}")
        await ws.send_bytes(msgpack.packb({"type": "Text", "text": "hello"}))
        await ws.send_bytes(msgpack.packb({"type": "Eos"}))
        error = await expect_error(ws, "engine_error", 1011, "details are in the server log")
        assert str(tmp_path) not in error["message"] and "/" not in error["message"]
    finally:
        await server.close()
        engine.close()


def test_messages_lose_absolute_paths() -> None:
    assert _without_paths("bad file /tmp/x/voices/a.safetensors: truncated") == "bad file <path>: truncated"
    assert _without_paths("POST to /api/tts") == "POST to /api/tts"  # a route, two segments
    assert _without_paths("voice 'expresso/ex03/a.wav'") == "voice 'expresso/ex03/a.wav'"  # relative
