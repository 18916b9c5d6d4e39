"""A real LiveKit `AgentSession` (no room, no server) speaking through our TTS.

Order in time is asserted in events and frames, never in seconds: the scripted LLM holds back its
last delta on an event, and the test interrupts once the sink has captured a number of frames.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path

from livekit import rtc
from livekit.agents import Agent, AgentSession
from livekit.agents.voice.io import AudioOutput, AudioOutputCapabilities, TextOutput
from livekit.agents.voice.transcription.synchronizer import TranscriptSynchronizer

from kyutai_tts_plugin.livekit import TTS
from kyutai_tts_plugin.testing import HANG_GUARD_S

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from livekit_agent import ScriptedLLM  # noqa: E402  (the example's LLM stand-in)

REPLY = "Sure, here is the weather for today."
HEARD_FRAMES = 10  # the interruption comes once 0.8 s of the reply has reached the speaker


Waiters = list[tuple[Callable[[], bool], asyncio.Future[None]]]


def _wake(waiters: Waiters) -> None:
    for condition, fut in waiters:
        if not fut.done() and condition():
            fut.set_result(None)


async def _wait_until(waiters: Waiters, condition: Callable[[], bool], what: str) -> None:
    """Wait until `condition` holds, re-checked by the sink at each capture; the hang guard fails
    the test if it never does."""
    if condition():
        return
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiters.append((condition, fut))
    try:
        await asyncio.wait_for(fut, HANG_GUARD_S)
    except TimeoutError:
        raise AssertionError(f"never came: {what}") from None
    finally:
        waiters.remove((condition, fut))


class PlayoutSink(AudioOutput):
    """Plays captured audio on the wall clock, like a speaker would, and reports playback.

    Tests wait on it in frames (`wait_frames`); the wall clock only paces the simulated speaker.
    """

    def __init__(self) -> None:
        super().__init__(label="sink", capabilities=AudioOutputCapabilities(pause=False), sample_rate=24000)
        self.frames: list[rtc.AudioFrame] = []
        self.frames_at_clear: int | None = None  # frames captured when a playing segment was first cleared
        self._queued = 0.0
        self._started: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._waiters: Waiters = []

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        await super().capture_frame(frame)
        if self._started is None:
            self._started = time.monotonic()
            self.on_playback_started(created_at=time.time())
        self.frames.append(frame)
        self._queued += frame.duration
        _wake(self._waiters)

    async def wait_frames(self, n: int, what: str) -> None:
        """Wait until `n` frames were captured (a hang guard fails the test if they never come)."""
        await _wait_until(self._waiters, lambda: len(self.frames) >= n, f"{what}: {n} audio frames")

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
        if self.frames_at_clear is None:  # the first clear is the interruption; later ones find nothing
            self.frames_at_clear = len(self.frames)
        position = min(self._queued, time.monotonic() - self._started)
        if self._task is not None:
            self._task.cancel()
        self._reset()
        self.on_playback_finished(playback_position=position, interrupted=True)

    def _reset(self) -> None:
        self._started, self._queued, self._task = None, 0.0, None


class TextSink(TextOutput):
    """What the user reads: the words the `TranscriptSynchronizer` releases as they are played."""

    def __init__(self) -> None:
        super().__init__(label="text", next_in_chain=None)
        self.text = ""
        self.words = 0
        self._waiters: Waiters = []

    async def capture_text(self, text: str) -> None:
        self.text += text
        self.words += bool(text.strip())
        _wake(self._waiters)

    async def wait_words(self, n: int, what: str) -> None:
        await _wait_until(self._waiters, lambda: self.words >= n, f"{what}: {n} words")

    def flush(self) -> None:
        pass


async def start_session(
    tts: TTS, scripted: ScriptedLLM
) -> tuple[AgentSession, PlayoutSink, TextSink, TranscriptSynchronizer]:
    sink, text = PlayoutSink(), TextSink()
    sync = TranscriptSynchronizer(next_in_chain_audio=sink, next_in_chain_text=text)
    session = AgentSession(tts=tts, llm=scripted, use_tts_aligned_transcript=True)
    session.output.audio = sync.audio_output
    session.output.transcription = sync.text_output
    await session.start(Agent(instructions="You are a test agent."), record=False)
    return session, sink, text, sync


def assistant_text(session: AgentSession) -> str:
    items = [i for i in session.history.items if getattr(i, "role", None) == "assistant"]
    return items[-1].text_content if items else ""


async def test_reply_streams_deltas_into_the_engine_and_history_is_the_reply(tiny_engine):
    # The LLM holds back its last delta until the speaker has audio: the reply can only finish if
    # audio is produced while the LLM is still talking (else the hang guard fails the test).
    first_audio = asyncio.Event()
    scripted = ScriptedLLM(REPLY, delay=0.0, hold_last=first_audio)
    tts = TTS(engine=tiny_engine, temperature=0.0, n_q=4)
    session, sink, _, sync = await start_session(tts, scripted)
    try:
        handle = session.generate_reply(user_input="What is the weather?")
        await sink.wait_frames(1, "no audio while the LLM held back its last token")
        assert not scripted.finished and scripted.sent == scripted.script[:-1]
        first_audio.set()
        await asyncio.wait_for(handle, HANG_GUARD_S)
        assert scripted.finished and not handle.interrupted
        assert assistant_text(session) == REPLY
        assert all(f.sample_rate == 24000 for f in sink.frames)
    finally:
        await session.aclose()
        await sync.aclose()
    assert tiny_engine.active_sessions == 0


async def test_interrupt_stops_audio_frees_the_slot_and_truncates_history(tiny_engine):
    reply = "This is a much longer answer that keeps going for quite a while so we can cut it off."
    # The last delta never comes: the reply cannot end before the interruption, on any machine.
    never = asyncio.Event()
    scripted = ScriptedLLM(reply, delay=0.0, hold_last=never)
    tts = TTS(engine=tiny_engine, temperature=0.0, n_q=4)
    session, sink, text, sync = await start_session(tts, scripted)
    try:
        handle = session.generate_reply(user_input="Tell me a story.")
        await sink.wait_frames(HEARD_FRAMES, "the reply never played")
        # Two words shown: the synchronizer has counted the first one as heard (it releases a word
        # before it counts it), so the truncated history cannot be empty.
        await text.wait_words(2, "the transcript never followed the audio")
        await session.interrupt()
        await asyncio.wait_for(handle, HANG_GUARD_S)
        assert handle.interrupted
        # The engine session was cancelled with the TTS stream, before the reply task ended.
        assert tiny_engine.active_sessions == 0
        # LiveKit cancels and awaits the audio forwarding before it clears the output
        # (generation.forward_generation), so not one frame may follow the clear.
        assert sink.frames_at_clear is not None, "the playing segment was never cleared"
        assert sink.frames_at_clear >= HEARD_FRAMES
        assert len(sink.frames) == sink.frames_at_clear, "audio captured after the interruption"
        history = assistant_text(session)
        sent = "".join(scripted.sent)
        assert not scripted.finished and sent.startswith(history) and len(history) < len(sent)
        assert history and reply.startswith(history)
    finally:
        await session.aclose()
        await sync.aclose()
    assert len(sink.frames) == sink.frames_at_clear, "audio captured after the interruption"


async def test_a_whitespace_only_first_delta_stays_in_the_chat_history(tiny_engine):
    # LLMs often open a reply with "\n\n": it is part of what the LLM said, and the history (built
    # from our TimedStrings) must keep it, as it keeps every other delta.
    deltas = ["\n\n", "Sure", ", here", " is the", " weather."]
    scripted = ScriptedLLM(delay=0.0, deltas=deltas)
    tts = TTS(engine=tiny_engine, temperature=0.0, n_q=4)
    session, _, _, sync = await start_session(tts, scripted)
    try:
        handle = session.generate_reply(user_input="What is the weather?")
        await asyncio.wait_for(handle, HANG_GUARD_S)
        assert not handle.interrupted
        assert assistant_text(session) == "".join(deltas)
    finally:
        await session.aclose()
        await sync.aclose()
    assert tiny_engine.active_sessions == 0
