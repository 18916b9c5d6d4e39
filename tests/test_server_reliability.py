"""No input stops the server or starves other sessions (issue 11): every refusal is an `Error` message
(websocket) or a 4xx with a reason, never a 500 or a silent close."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgpack
import pytest

from kyutai_tts_plugin.server import RunningServer, ServerLimits, start_server
from tests.test_server import HEADERS, KEY, StartServer, expect_error, finish, wait_idle, ws_session


@pytest.fixture
async def make_server(tiny_engine: Any) -> AsyncIterator[StartServer]:
    servers: list[RunningServer] = []

    async def start(api_keys: tuple[str, ...] = (KEY,), **limits: Any) -> RunningServer:
        server = await start_server(tiny_engine, api_keys=api_keys, limits=ServerLimits(**limits))
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()
    await wait_idle(tiny_engine)


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
