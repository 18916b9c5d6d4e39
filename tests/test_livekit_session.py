"""A real LiveKit `AgentSession` (no room, no server) speaking through our TTS."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from livekit import rtc
from livekit.agents import Agent, AgentSession
from livekit.agents.voice.io import AudioOutput, AudioOutputCapabilities, TextOutput
from livekit.agents.voice.transcription.synchronizer import TranscriptSynchronizer

from kyutai_tts_plugin.livekit import TTS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from livekit_agent import ScriptedLLM  # noqa: E402  (the example's LLM stand-in)

REPLY = "Sure, here is the weather for today."


class PlayoutSink(AudioOutput):
    """Plays captured audio on the wall clock, like a speaker would, and reports playback."""

    def __init__(self) -> None:
        super().__init__(label="sink", capabilities=AudioOutputCapabilities(pause=False), sample_rate=24000)
        self.frames: list[tuple[float, rtc.AudioFrame]] = []
        self.cleared_at: float | None = None
        self._queued = 0.0
        self._started: float | None = None
        self._task: asyncio.Task[None] | None = None

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        await super().capture_frame(frame)
        if self._started is None:
            self._started = time.monotonic()
            self.on_playback_started(created_at=time.time())
        self.frames.append((time.monotonic(), frame))
        self._queued += frame.duration

    def flush(self) -> None:
        super().flush()
        if self._started is not None and self._task is None:
            self._task = asyncio.ensure_future(self._play_out(self._started, self._queued))

    async def _play_out(self, started: float, duration: float) -> None:
        await asyncio.sleep(max(0.0, started + duration - time.monotonic()))
        self._reset()
        self.on_playback_finished(playback_position=duration, interrupted=False)

    def clear_buffer(self) -> None:
        if self._started is None:
            return
        self.cleared_at = time.monotonic()
        position = min(self._queued, self.cleared_at - self._started)
        if self._task is not None:
            self._task.cancel()
        self._reset()
        self.on_playback_finished(playback_position=position, interrupted=True)

    def _reset(self) -> None:
        self._started, self._queued, self._task = None, 0.0, None


class TextSink(TextOutput):
    def __init__(self) -> None:
        super().__init__(label="text", next_in_chain=None)
        self.text = ""

    async def capture_text(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


async def start_session(tts: TTS, scripted: ScriptedLLM):
    sink, text = PlayoutSink(), TextSink()
    sync = TranscriptSynchronizer(next_in_chain_audio=sink, next_in_chain_text=text)
    session = AgentSession(tts=tts, llm=scripted, use_tts_aligned_transcript=True)
    session.output.audio = sync.audio_output
    session.output.transcription = sync.text_output
    await session.start(Agent(instructions="You are a test agent."), record=False)
    return session, sink, sync


def assistant_text(session: AgentSession) -> str:
    items = [i for i in session.history.items if getattr(i, "role", None) == "assistant"]
    return items[-1].text_content if items else ""


async def test_reply_streams_deltas_into_the_engine_and_history_is_the_reply(tiny_engine):
    scripted = ScriptedLLM(REPLY)
    tts = TTS(engine=tiny_engine, temperature=0.0, n_q=4)
    session, sink, sync = await start_session(tts, scripted)
    try:
        handle = session.generate_reply(user_input="What is the weather?")
        await asyncio.wait_for(handle, timeout=60)
        assert scripted.finished_at is not None and sink.frames
        first_audio = sink.frames[0][0]
        assert first_audio < scripted.finished_at, "first audio must come before the LLM's last token"
        assert assistant_text(session) == REPLY
        assert all(f.sample_rate == 24000 for _, f in sink.frames)
    finally:
        await session.aclose()
        await sync.aclose()
    assert tiny_engine.active_sessions == 0


async def test_interrupt_stops_audio_frees_the_slot_and_truncates_history(tiny_engine):
    reply = "This is a much longer answer that keeps going for quite a while so we can cut it off."
    scripted = ScriptedLLM(reply, delay=0.01)
    tts = TTS(engine=tiny_engine, temperature=0.0, n_q=4)
    session, sink, sync = await start_session(tts, scripted)
    try:
        handle = session.generate_reply(user_input="Tell me a story.")
        deadline = time.monotonic() + 30
        while not sink.frames and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(1.2)  # about 1 s of the reply is heard
        await session.interrupt()
        await asyncio.wait_for(handle, timeout=10)
        assert handle.interrupted
        assert sink.cleared_at is not None
        assert not [t for t, _ in sink.frames if t > sink.cleared_at + 0.05], "audio after the interruption"
        history = assistant_text(session)
        assert reply.startswith(history) and len(history) < len(reply)
        for _ in range(100):
            if tiny_engine.active_sessions == 0:
                break
            await asyncio.sleep(0.01)
        assert tiny_engine.active_sessions == 0
    finally:
        await session.aclose()
        await sync.aclose()
