"""End to end: the WebRTC example bot on localhost, heard by headless Chromium.

The example's own web app and page run unchanged; the test only chooses the engine (the tiny
checkpoint), a short greeting, and an observer of the bot's speaking events and of the audio its TTS
sends. The page connects by itself (``?autoconnect=1``) and publishes what it hears in
``window.kyutai``, which the test reads through the Chrome DevTools Protocol.

Nothing here depends on how fast the machine is. The engine is parked (a step observer) until the
browser is connected and receiving the bot's track, so the browser can only hear the greeting after
the bot started it; the test then waits for the bot's stopped-speaking event and for the browser to
have received the greeting's audio energy. Every wait is for an event; its deadline only turns a hang
into a failure.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from pipecat.frames.frames import BotStartedSpeakingFrame, BotStoppedSpeakingFrame, TTSAudioRawFrame
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.processors.frame_processor import FrameDirection

from kyutai_tts_plugin.engine import EngineStep
from kyutai_tts_plugin.pipecat import KyutaiTTSService
from kyutai_tts_plugin.testing import HANG_GUARD_S
from kyutai_tts_plugin.types import SessionOptions

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import pipecat_webrtc_bot  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
GREETING = "Hi there, friend."


class BotEvents(BaseObserver):
    """The bot's started/stopped-speaking events in order (each frame counted once), and the audio
    its TTS sent to the output transport."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []
        self.stopped = asyncio.Event()
        self.audio = bytearray()
        self._seen: set[int] = set()

    async def on_push_frame(self, data: FramePushed) -> None:
        frame = data.frame
        if isinstance(frame, TTSAudioRawFrame) and isinstance(data.source, KyutaiTTSService):
            self.audio += frame.audio
        # The output transport broadcasts each event (one frame each way): count the downstream one.
        speaking = isinstance(frame, (BotStartedSpeakingFrame, BotStoppedSpeakingFrame))
        if speaking and data.direction == FrameDirection.DOWNSTREAM and frame.id not in self._seen:
            self._seen.add(frame.id)
            self.events.append(type(frame).__name__)
            if isinstance(frame, BotStoppedSpeakingFrame):
                self.stopped.set()


class ParkedEngine:
    """Parks the engine worker after every step until `release` (a step observer). The greeting's
    session gets one step, far from its first audio, and waits there while the browser connects."""

    def __init__(self, engine: Any) -> None:
        self._cv = threading.Condition()
        self._held = True
        self._remove = engine.add_step_observer(self._park)

    def _park(self, step: EngineStep) -> None:
        with self._cv:
            self._cv.wait_for(lambda: not self._held)

    def release(self) -> None:
        with self._cv:
            self._held = False
            self._cv.notify_all()

    def close(self) -> None:
        self.release()
        self._remove()


def received_energy(pcm16: bytes, sample_rate: int = 24000) -> float:
    """The `totalAudioEnergy` a WebRTC receiver reports for this audio: libwebrtc adds, for each 10 ms
    frame, (peak |sample| / full scale)^2 * 0.01 s."""
    pcm = np.abs(np.frombuffer(pcm16, "<i2").astype(np.float64)) / 32767.0
    frame = sample_rate // 100
    peaks = pcm[: len(pcm) // frame * frame].reshape(-1, frame).max(axis=1)
    return float(np.sum(peaks**2) * 0.01)


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
        reply = await ws.receive_json(timeout=HANG_GUARD_S)
    value = reply.get("result", {}).get("result", {}).get("value")
    return json.loads(value) if value else None


async def until_page(
    http: aiohttp.ClientSession, devtools_port: int, condition: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    """Poll the page's `window.kyutai` until `condition` holds (the deadline is a hang guard)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANG_GUARD_S
    state: dict[str, Any] | None = None
    while loop.time() < deadline:
        state = await page_state(http, devtools_port)
        if state is not None and condition(state):
            return state
        await asyncio.sleep(0.1)
    raise AssertionError(f"waited {HANG_GUARD_S:.0f} s for {what}: page={state}")


async def test_browser_hears_the_bot_between_its_speaking_events(tiny_engine: Any, tmp_path: Path) -> None:
    if CHROMIUM is None:
        pytest.fail("this test needs headless Chromium: `apt-get install chromium` (.ci/run installs it)")
    observers: list[BotEvents] = []

    def make_observers() -> list[BaseObserver]:
        observers.append(BotEvents())
        return [observers[-1]]

    app = pipecat_webrtc_bot.build_app(
        # No idle timeout may end the greeting while the engine is parked, however long that lasts.
        lambda: KyutaiTTSService(
            engine=tiny_engine, settings=KyutaiTTSService.Settings(temperature=0.0), stop_frame_timeout_s=1e6
        ),
        greeting=GREETING,
        make_observers=make_observers,
    )
    runner = web.AppRunner(app)
    await runner.setup()
    port, devtools_port = free_port(), free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    # Everything from here on is undone in `finally`: a parked engine left behind would hang every
    # later test that shares it.
    parked = ParkedEngine(tiny_engine)
    browser: asyncio.subprocess.Process | None = None
    try:
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
        async with aiohttp.ClientSession() as http:
            # Connected and receiving the bot's track (silence) while the greeting can have no audio.
            before = await until_page(
                http,
                devtools_port,
                lambda s: s["state"] == "connected" and s["packets"] > 0,
                "the browser to connect and receive the bot's track",
            )
            assert observers and observers[0].events == [] and not observers[0].audio
            assert before["firstSoundAt"] is None and before["error"] is None, before
            parked.release()
            bot = observers[0]
            try:
                await asyncio.wait_for(bot.stopped.wait(), timeout=HANG_GUARD_S)
            except TimeoutError:
                raise AssertionError(f"the bot never stopped speaking: {bot.events}") from None
            # The browser has received the greeting: at least half of the energy of the audio the bot
            # sent, which a blip does not reach.
            expected = received_energy(bytes(bot.audio))
            state = await until_page(
                http,
                devtools_port,
                lambda s: s["energy"] >= 0.5 * expected,
                f"the browser to receive the greeting's audio energy ({expected:.4f})",
            )
    finally:
        parked.close()
        if browser is not None:
            browser.terminate()
            await browser.wait()
        await runner.cleanup()

    assert state["error"] is None and state["state"] == "connected", state
    assert state["packets"] > before["packets"] and state["peak"] > 0.01 and state["firstSoundAt"], state
    assert bot.events == ["BotStartedSpeakingFrame", "BotStoppedSpeakingFrame"], bot.events
    # The bot sent the whole greeting (3 words, over 2 s of audio), exactly as the engine speaks it.
    reference = tiny_engine.synthesize(GREETING, SessionOptions(temperature=0.0)).pcm
    assert bytes(bot.audio) == (np.clip(reference, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()
    assert tiny_engine.active_sessions == 0
