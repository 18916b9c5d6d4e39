"""Shared fixtures: a tiny random-weight checkpoint in the real file layout, and an engine on it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# moshi is only a test oracle; without this it torch.compiles on CPU and runs 16x slower.
os.environ.setdefault("NO_TORCH_COMPILE", "1")


@pytest.fixture
def test_seed() -> int:
    """The seed of a randomized test: KYUTAI_TEST_SEED replays a run (it is printed on failure)."""
    seed = int(os.environ.get("KYUTAI_TEST_SEED", "7"))
    print(f"randomized test: seed {seed} (replay with KYUTAI_TEST_SEED={seed})")
    return seed


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kyutai_tts_plugin.testing import make_test_checkpoint

    return make_test_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"))


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint: Path) -> Iterator[object]:
    from kyutai_tts_plugin.engine import TTSEngine

    engine = TTSEngine.from_pretrained(tiny_checkpoint, voice_repo=tiny_checkpoint / "voices", max_sessions=4)
    yield engine
    engine.close()


@pytest.fixture(params=["in-process", "remote"])
async def backend(request: pytest.FixtureRequest, tiny_engine):
    """The adapters' backend: the engine itself, or `RemoteTTS` talking to our server over loopback."""
    if request.param == "in-process":
        yield tiny_engine
        return
    from kyutai_tts_plugin.remote import RemoteTTS
    from kyutai_tts_plugin.server import ServerLimits, start_server

    # the adapters' tests compare greedy output: the server must honour the client's options
    server = await start_server(tiny_engine, limits=ServerLimits(allow_client_params=True))
    yield RemoteTTS(server.url)
    await server.close()


# The API key of the servers `make_server` starts (test_server*.py send it).
SERVER_TEST_KEY = "test-key-0123456789"


@pytest.fixture
async def make_server(tiny_engine):
    """``await make_server(api_keys=..., engine=..., **ServerLimits fields)``: our server (on the tiny engine
    unless another is given), closed
    after the test, which then waits until the engine has no session left. Client generation parameters
    are honoured unless a test says otherwise (``allow_client_params=False``, moshi-server's default), so
    that greedy output can be compared with in-process synthesis."""
    import asyncio
    import time

    from kyutai_tts_plugin.server import ServerLimits, start_server
    from kyutai_tts_plugin.testing import HANG_GUARD_S

    servers = []

    async def start(api_keys=(SERVER_TEST_KEY,), engine=None, **limits):
        # `engine`: serve another engine than the tiny one (its sessions are the test's to end).
        limits.setdefault("allow_client_params", True)
        served = tiny_engine if engine is None else engine
        server = await start_server(served, api_keys=api_keys, limits=ServerLimits(**limits))
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()
    deadline = time.monotonic() + HANG_GUARD_S
    while tiny_engine.active_sessions:
        assert time.monotonic() < deadline, "an engine session was never closed"
        await asyncio.sleep(0.005)
