"""KyutaiTTSService in real Pipecat pipelines, on the tiny checkpoint (CPU)."""

from __future__ import annotations

import asyncio
import time

import pytest
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    ErrorFrame,
    Frame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    TTSUpdateSettingsFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.tests.utils import SleepFrame, run_test

from kyutai_tts_plugin.pipecat import KyutaiTTSService
from kyutai_tts_plugin.types import SessionOptions

GREEDY = KyutaiTTSService.Settings(temperature=0.0, n_q=4)


class Recorder(FrameProcessor):
    """Timestamps every frame leaving the TTS (a pass-through, like a transport would see them)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[float, Frame]] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        self.seen.append((time.monotonic(), frame))
        await self.push_frame(frame, direction)


async def wait_idle(engine, timeout: float = 5.0) -> None:
    """The engine has no session left (over the network, the server frees it a moment later)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while engine.active_sessions and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert engine.active_sessions == 0


def tokens_of(text: str, size: int = 3) -> list[str]:
    """LLM-like tokens, split mid-word."""
    return [text[i : i + size] for i in range(0, len(text), size)]


def reply(text: str, pause: float = 0.0) -> list[Frame]:
    frames: list[Frame] = [LLMFullResponseStartFrame()]
    for tok in tokens_of(text):
        frames.append(LLMTextFrame(tok))
        if pause:
            frames.append(SleepFrame(sleep=pause))
    frames.append(LLMFullResponseEndFrame())
    return frames


def pcm16(frames: list[Frame]) -> bytes:
    return b"".join(f.audio for f in frames if isinstance(f, TTSAudioRawFrame))


def one_shot(engine, text: str) -> bytes:
    from kyutai_tts_plugin.types import AudioChunk

    out = engine.synthesize(text, SessionOptions(temperature=0.0, n_q=4))
    return b"".join(AudioChunk(out.pcm[i : i + 1920], 0).pcm16() for i in range(0, len(out.pcm), 1920))


async def test_streamed_reply_equals_one_shot_with_word_timestamps(tiny_engine, backend):
    text = "Hello there, it is 12 degrees and sunny today in Paris."
    tts = KyutaiTTSService(engine=backend, settings=GREEDY)
    rec = Recorder()
    t0 = time.monotonic()
    down, _ = await run_test(Pipeline([tts, rec]), frames_to_send=reply(text, pause=0.03))
    audio = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    assert audio and all(f.sample_rate == 24000 and f.num_channels == 1 for f in audio)
    assert pcm16(down) == one_shot(tiny_engine, text)
    words = [f.text for f in down if isinstance(f, TTSTextFrame)]
    expected = [w.word for w in tiny_engine.synthesize(text, SessionOptions(temperature=0.0, n_q=4)).words]
    assert "".join(words).replace(" ", "") == "".join(expected)
    types = [type(f) for f in down]
    assert types.index(TTSStartedFrame) < types.index(TTSAudioRawFrame)
    assert len([t for t in types if t is TTSStoppedFrame]) == 1
    # The first audio left the service while the LLM was still streaming its tokens.
    n_tokens = len(tokens_of(text))
    first_audio = next(t for t, f in rec.seen if isinstance(f, TTSAudioRawFrame))
    assert first_audio - t0 < n_tokens * 0.03
    await wait_idle(tiny_engine)


async def test_interruption_cancels_session_and_next_turn_is_clean(tiny_engine, backend):
    long_text = " ".join(["alpha bravo charlie delta echo foxtrot golf hotel"] * 6)
    tts = KyutaiTTSService(engine=backend, settings=GREEDY)
    frames = reply(long_text) + [SleepFrame(sleep=0.4), InterruptionFrame(), SleepFrame(sleep=0.3)]
    frames += reply("A fresh start.")
    down, _ = await run_test(tts, frames_to_send=frames)
    cut = next(i for i, f in enumerate(down) if isinstance(f, InterruptionFrame))
    before, after = down[:cut], down[cut:]
    first_ctx = next(f.context_id for f in before if isinstance(f, TTSAudioRawFrame))
    assert not any(
        getattr(f, "context_id", None) == first_ctx
        for f in after
        if isinstance(f, (TTSAudioRawFrame, TTSTextFrame, TTSStoppedFrame))
    )
    assert len(pcm16(before)) < len(one_shot(tiny_engine, long_text))
    assert pcm16(after) == one_shot(tiny_engine, "A fresh start.")
    await wait_idle(tiny_engine)


async def test_speak_frame_empty_and_emoji_replies_and_settings_update(tiny_engine):
    tts = KyutaiTTSService(engine=tiny_engine, settings=GREEDY)
    frames = [
        TTSSpeakFrame("Speak this now."),
        *reply("🙂🚀"),
        LLMFullResponseStartFrame(),
        LLMFullResponseEndFrame(),
        TTSUpdateSettingsFrame(delta=KyutaiTTSService.Settings(n_q=2)),
        *reply("after the update"),
    ]
    down, up = await asyncio.wait_for(run_test(tts, frames_to_send=frames), timeout=60)
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    ctxs = []
    for f in down:
        if isinstance(f, TTSAudioRawFrame) and f.context_id not in ctxs:
            ctxs.append(f.context_id)
    assert len(ctxs) == 3  # speak frame, emoji-only reply (80 ms of silence), the last reply

    def audio_of(ctx: str) -> bytes:
        return b"".join(f.audio for f in down if isinstance(f, TTSAudioRawFrame) and f.context_id == ctx)

    assert audio_of(ctxs[0]) == one_shot(tiny_engine, "Speak this now.")
    assert audio_of(ctxs[1]) == bytes(2 * 1920)
    last = tiny_engine.synthesize("after the update", SessionOptions(temperature=0.0, n_q=2))
    assert len(audio_of(ctxs[2])) == 2 * len(last.pcm)
    assert [type(f) for f in down].count(TTSStoppedFrame) == 3
    assert tiny_engine.active_sessions == 0


@pytest.mark.parametrize("final", [EndFrame, CancelFrame])
async def test_end_and_cancel_mid_utterance_are_prompt(tiny_engine, final):
    tts = KyutaiTTSService(engine=tiny_engine, settings=GREEDY)
    frames = [
        LLMFullResponseStartFrame(),
        *[LLMTextFrame(t) for t in tokens_of("one two three four five six")],
        SleepFrame(sleep=0.2),
    ]
    t0 = time.monotonic()
    if final is CancelFrame:
        frames.append(CancelFrame())
    await asyncio.wait_for(run_test(tts, frames_to_send=frames, send_end_frame=final is EndFrame), timeout=30)
    assert time.monotonic() - t0 < 2.5  # no stop_frame_timeout wait
    assert tiny_engine.active_sessions == 0


async def test_bad_voice_becomes_error_frame_and_pipeline_continues(tiny_engine):
    tts = KyutaiTTSService(engine=tiny_engine, settings=GREEDY)
    frames = [
        TTSUpdateSettingsFrame(delta=KyutaiTTSService.Settings(voice="no-such-voice")),
        *reply("this one fails"),
        TTSUpdateSettingsFrame(
            delta=KyutaiTTSService.Settings(voice="expresso/ex03-ex01_happy_001_channel1_334s.wav")
        ),
        *reply("this one speaks"),
    ]
    down, up = await asyncio.wait_for(run_test(tts, frames_to_send=frames), timeout=60)
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    assert errors and "no-such-voice" in errors[0].error and "voices" in errors[0].error
    assert pcm16(down) == one_shot(tiny_engine, "this one speaks")
    assert tiny_engine.active_sessions == 0


def test_no_engine_loaded_on_construction(tiny_checkpoint):
    tts = KyutaiTTSService(model=tiny_checkpoint, voice_repo=tiny_checkpoint / "voices")
    assert tts.engine is None  # loaded in setup(), in a thread
