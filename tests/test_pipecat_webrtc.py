"""End to end: the WebRTC example bot on localhost, heard by headless Chromium.

The example's own web app and page run unchanged; the test only chooses the engine (the tiny
checkpoint), a short greeting, and an observer that timestamps the bot's speaking events. The page
connects by itself (``?autoconnect=1``) and publishes what it hears in ``window.kyutai``, which the test
reads through the Chrome DevTools Protocol.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from pipecat.frames.frames import BotStartedSpeakingFrame, BotStoppedSpeakingFrame
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.processors.frame_processor import FrameDirection

from kyutai_tts_plugin.pipecat import KyutaiTTSService

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import pipecat_webrtc_bot  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"


class SpeakingEvents(BaseObserver):
    """Wall-clock times of the bot's started/stopped-speaking events (each frame counted once)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, float]] = []
        self._seen: set[int] = set()

    async def on_push_frame(self, data: FramePushed) -> None:
        frame = data.frame
        # The output transport broadcasts each event (one frame each way): count the downstream one.
        speaking = isinstance(frame, (BotStartedSpeakingFrame, BotStoppedSpeakingFrame))
        if speaking and data.direction == FrameDirection.DOWNSTREAM and frame.id not in self._seen:
            self._seen.add(frame.id)
            self.events.append((type(frame).__name__, time.time()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def page_state(http: aiohttp.ClientSession, devtools_port: int) -> dict[str, Any] | None:
    """`window.kyutai` of the bot page, through the DevTools protocol (None until it is up)."""
    try:
        async with http.get(f"http://127.0.0.1:{devtools_port}/json") as response:
            targets = await response.json()
    except aiohttp.ClientError:
        return None
    pages = [t for t in targets if t.get("type") == "page" and "127.0.0.1" in t.get("url", "")]
    if not pages:
        return None
    async with http.ws_connect(pages[0]["webSocketDebuggerUrl"]) as ws:
        expression = "JSON.stringify(window.kyutai || null)"
        await ws.send_json({"id": 1, "method": "Runtime.evaluate", "params": {"expression": expression}})
        reply = await ws.receive_json(timeout=5)
    value = reply.get("result", {}).get("result", {}).get("value")
    return json.loads(value) if value else None


async def test_browser_hears_the_bot_between_its_speaking_events(tiny_engine: Any, tmp_path: Path) -> None:
    observers: list[SpeakingEvents] = []

    def make_observers() -> list[BaseObserver]:
        observers.append(SpeakingEvents())
        return [observers[-1]]

    app = pipecat_webrtc_bot.build_app(
        lambda: KyutaiTTSService(engine=tiny_engine, settings=KyutaiTTSService.Settings(temperature=0.0)),
        greeting="Hi there, friend.",
        make_observers=make_observers,
    )
    runner = web.AppRunner(app)
    await runner.setup()
    port, devtools_port = free_port(), free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    browser = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--autoplay-policy=no-user-gesture-required",
        f"--remote-debugging-port={devtools_port}",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"http://127.0.0.1:{port}/?autoconnect=1",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    state: dict[str, Any] | None = None
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 45
            while time.monotonic() < deadline:
                await asyncio.sleep(0.25)
                state = await page_state(http, devtools_port)
                events = observers[0].events if observers else []
                # Done once the bot stopped speaking and the browser's jitter buffer has drained.
                if state and events and events[-1][0] == "BotStoppedSpeakingFrame":
                    if time.time() - events[-1][1] > 1.0:
                        break
            else:
                raise AssertionError(f"no complete utterance heard in time: page={state}, bot={observers}")
    finally:
        browser.terminate()
        await browser.wait()
        await runner.cleanup()

    assert state is not None and state["error"] is None, state
    assert state["state"] == "connected"
    assert state["packets"] > 0 and state["energy"] > 0 and state["peak"] > 0.01, state
    events = observers[0].events
    assert [name for name, _ in events] == ["BotStartedSpeakingFrame", "BotStoppedSpeakingFrame"], events
    started, stopped = events[0][1], events[1][1]
    first, last = state["firstSoundAt"] / 1000, state["lastSoundAt"] / 1000
    # The sound the browser played lies between the bot's events (plus the network and jitter-buffer
    # delay at the end: the bot stops when it has sent the last packet, the browser plays it later).
    assert started - 0.05 <= first <= stopped, (started, first, stopped)
    assert first < last <= stopped + 0.8, (first, last, stopped)
    assert stopped - started > 1.0  # the whole greeting (3 words, over 2 s of audio), not a blip
    assert tiny_engine.active_sessions == 0
