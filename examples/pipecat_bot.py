"""A Pipecat bot that answers with Kyutai TTS and writes the conversation audio to a WAV file.

    python examples/pipecat_bot.py "What is the tallest mountain?" "And the deepest lake?" --out bot.wav

Each message is one user turn. The replies come from an OpenAI-compatible LLM when ``OPENAI_API_KEY``
is set (``OPENAI_BASE_URL`` and ``OPENAI_MODEL`` pick another endpoint, e.g. a local vLLM or Ollama
server); without a key a scripted reply is streamed token by token, so the example runs offline.
The LLM's tokens reach the TTS as they stream; the bot's audio (24 kHz mono) goes to ``--out``.

The model is ``kyutai/tts-1.6b-en_fr`` from the Hugging Face Hub unless ``--model`` names a local
checkpoint directory (``--voice-repo`` likewise for the voices).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import wave
from pathlib import Path

from loguru import logger
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMMessagesAppendFrame,
    LLMTextFrame,
    TTSAudioRawFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from kyutai_tts_plugin import KyutaiTTSError
from kyutai_tts_plugin.hardware import resolve_device
from kyutai_tts_plugin.pipecat import KyutaiTTSService

SYSTEM_PROMPT = (
    "You are a friendly voice assistant. Your replies are spoken aloud: answer in one to three short "
    "sentences of plain text, without lists, markdown or emoji."
)


class ScriptedLLM(FrameProcessor):
    """Stands in for an LLM when no API key is set: streams a canned reply token by token."""

    def __init__(self, token_delay_s: float = 0.03) -> None:
        """Initialize the scripted LLM.

        Args:
            token_delay_s: Pause between tokens, like a real LLM's streaming pace.
        """
        super().__init__()
        self._delay = token_delay_s

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Answer each context with a reply about the user's last message."""
        await super().process_frame(frame, direction)
        if not isinstance(frame, LLMContextFrame):
            await self.push_frame(frame, direction)
            return
        users = [m for m in frame.context.get_messages() if m.get("role") == "user"]
        question = str(users[-1]["content"]) if users else ""
        reply = (
            f"You said: {question.strip() or 'nothing'}. This is a scripted answer, because no LLM "
            "key is set; with one, a real model answers, and every token is spoken as it arrives."
        )
        await self.push_frame(LLMFullResponseStartFrame())
        # Cut like an LLM tokenizer: pieces of words, each space at the start of a piece.
        for token in re.findall(r"\s?[^\s]{1,4}", reply):
            await asyncio.sleep(self._delay)
            await self.push_frame(LLMTextFrame(token))
        await self.push_frame(LLMFullResponseEndFrame())


def make_llm() -> FrameProcessor:
    """An OpenAI-compatible LLM service when OPENAI_API_KEY is set, else the scripted LLM."""
    api_key = os.environ.get("OPENAI_API_KEY")
    if not api_key:
        logger.info("OPENAI_API_KEY is not set: using a scripted LLM")
        return ScriptedLLM()
    from pipecat.services.openai.llm import OpenAILLMService

    return OpenAILLMService(
        api_key=api_key,
        base_url=os.environ.get("OPENAI_BASE_URL"),
        settings=OpenAILLMService.Settings(model=os.environ.get("OPENAI_MODEL", "gpt-4.1-mini")),
    )


class WavRecorder(FrameProcessor):
    """Writes the bot's audio to a WAV file when the pipeline ends."""

    def __init__(self, path: Path) -> None:
        """Initialize the recorder.

        Args:
            path: Where to write the WAV file.
        """
        super().__init__()
        self._path = path
        self._chunks: list[bytes] = []
        self._sample_rate = 24000

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Keep the TTS audio; write the file at the end."""
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            self._chunks.append(frame.audio)
            self._sample_rate = frame.sample_rate
        elif isinstance(frame, EndFrame):
            with wave.open(str(self._path), "wb") as out:
                out.setnchannels(1)
                out.setsampwidth(2)
                out.setframerate(self._sample_rate)
                out.writeframes(b"".join(self._chunks))
            seconds = sum(map(len, self._chunks)) / 2 / self._sample_rate
            print(f"wrote {seconds:.1f} s of audio to {self._path}")
        await self.push_frame(frame, direction)


async def main() -> None:
    """Run one conversation: each command-line message is a user turn."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("messages", nargs="*", default=["Hello! Who are you?"], help="user turns")
    parser.add_argument("--out", type=Path, default=Path("pipecat_bot.wav"), help="WAV file to write")
    parser.add_argument("--model", help="checkpoint: Hugging Face repo id or local directory")
    parser.add_argument("--voice-repo", help="voices: Hugging Face repo id or local directory")
    parser.add_argument("--voice", help="voice name, e.g. vctk/p225_023.wav")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help="torch CPU threads (default: all cores but one, which the pipeline needs)",
    )
    args = parser.parse_args()
    try:
        resolve_device(args.device)  # a device this machine lacks: say so now, in one line
    except KyutaiTTSError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")

    tts = KyutaiTTSService(
        model=args.model,
        voice_repo=args.voice_repo,
        device=args.device,
        dtype="bfloat16" if args.device.startswith("cuda") else "float32",
        engine_kwargs={"num_threads": args.threads},
        settings=KyutaiTTSService.Settings(voice=args.voice),
        # The audio goes to a file, not to a listener in real time: no reason to pace the engine to
        # playback (a bot with an output transport keeps the default few seconds of lead).
        max_lead_s=None,
    )
    logger.info("loading the TTS model...")
    try:
        await tts.wait_until_ready()  # the constructor started loading it in the background
    except KyutaiTTSError as e:
        parser.exit(2, f"{parser.prog}: error: the TTS model could not be loaded: {e}\n")

    context = LLMContext([{"role": "system", "content": SYSTEM_PROMPT}])
    aggregators = LLMContextAggregatorPair(context)
    pipeline = Pipeline([aggregators.user(), make_llm(), tts, WavRecorder(args.out), aggregators.assistant()])
    worker = PipelineWorker(pipeline, params=PipelineParams(enable_metrics=True, enable_usage_metrics=True))

    @worker.event_handler("on_pipeline_started")
    async def on_started(worker: PipelineWorker, frame: Frame) -> None:
        # The LLM answers the turns one after the other; the TTS speaks the replies in order.
        for message in args.messages:
            turn = LLMMessagesAppendFrame([{"role": "user", "content": message}], run_llm=True)
            await worker.queue_frame(turn)
        await worker.queue_frame(EndFrame())

    runner = WorkerRunner(handle_sigint=True)
    await runner.add_workers(worker)
    await runner.run()
    for message in context.get_messages()[1:]:
        print(f"{message['role']}: {message['content']}")


if __name__ == "__main__":
    asyncio.run(main())
