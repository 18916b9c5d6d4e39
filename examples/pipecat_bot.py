"""A Pipecat voice-agent turn with Kyutai TTS, runnable offline.

    python examples/pipecat_bot.py --model /tmp/kyutai-test --voice-repo /tmp/kyutai-test/voices \
        --out conversation.wav

With `OPENAI_API_KEY` set (and `pip install "pipecat-ai[openai]"`), the reply comes from an OpenAI
LLM streaming its tokens; without it, a scripted reply is streamed token by token the same way. The
bot's audio is written to a WAV file. `--model` defaults to `kyutai/tts-1.6b-en_fr` (downloaded into
the Hugging Face cache on first use); `kyutai-tts make-test-checkpoint DIR` writes an offline test
checkpoint (random weights: noise).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import wave

from pipecat.frames.frames import (
    EndFrame,
    Frame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSAudioRawFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from kyutai_tts_plugin.pipecat import KyutaiTTSService

SCRIPTED_REPLY = (
    "Hi! I'm a voice agent speaking with Kyutai's streaming text to speech. "
    "Every word you hear was spoken while the rest of the sentence was still arriving."
)


class WavWriter(FrameProcessor):
    """Collects the bot's audio (a real transport would play it)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.audio = bytearray()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            self.audio.extend(frame.audio)
        await self.push_frame(frame, direction)

    def save(self) -> None:
        with wave.open(self.path, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(24000)
            w.writeframes(bytes(self.audio))


async def scripted_llm(task: PipelineWorker, text: str) -> None:
    """Streams `text` the way an LLM does: small tokens, some of them mid-word."""
    await task.queue_frame(LLMFullResponseStartFrame())
    for i in range(0, len(text), 4):
        await task.queue_frame(LLMTextFrame(text[i : i + 4]))
        await asyncio.sleep(0.02)
    await task.queue_frame(LLMFullResponseEndFrame())


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="kyutai/tts-1.6b-en_fr")
    ap.add_argument("--voice-repo", default="kyutai/tts-voices")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="conversation.wav")
    args = ap.parse_args()

    tts = KyutaiTTSService(model=args.model, voice_repo=args.voice_repo, device=args.device, dtype=args.dtype)
    writer = WavWriter(args.out)
    task = PipelineWorker(Pipeline([tts, writer]))

    async def converse() -> None:
        await asyncio.sleep(0.5)
        if os.environ.get("OPENAI_API_KEY"):
            text = await openai_reply("Say hello to a new user in two sentences.")
        else:
            text = SCRIPTED_REPLY
        await scripted_llm(task, text)
        await task.queue_frame(EndFrame())

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(task)
    await asyncio.gather(runner.run(), converse())
    writer.save()
    print(f"wrote {args.out}: {len(writer.audio) / 2 / 24000:.2f} s of audio")


async def openai_reply(prompt: str) -> str:
    """The reply text from an OpenAI model (the tokens are then streamed to the TTS)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI()
    out = await client.chat.completions.create(
        model=os.environ.get("OPENAI_MODEL", "gpt-4o-mini"), messages=[{"role": "user", "content": prompt}]
    )
    return out.choices[0].message.content or ""


if __name__ == "__main__":
    asyncio.run(main())
