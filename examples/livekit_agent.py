"""A LiveKit voice agent speaking with Kyutai TTS in-process.

    python examples/livekit_agent.py download-files   # model + default voice into the HF cache
    python examples/livekit_agent.py console           # talk to it in the terminal (needs a sound card)
    python examples/livekit_agent.py dev               # join rooms of your LiveKit server

The LLM is OpenAI's when `OPENAI_API_KEY` is set (`pip install "livekit-agents[openai]"`); otherwise
the agent answers with a scripted reply, streamed token by token like an LLM would. STT/VAD come
from your LiveKit setup (e.g. `livekit-agents[deepgram,silero]`); `KYUTAI_TTS_MODEL` and
`KYUTAI_TTS_VOICES` point the TTS at local directories (`kyutai-tts make-test-checkpoint DIR`).

One engine is shared by every job of a worker process (`shared_engine`). Loading the 1.6B model takes
tens of seconds, longer than LiveKit's default job initialization timeout: the TTS is created in
`prewarm` (once per process) and `initialize_process_timeout` is raised below. With the default
process job executor each job process loads its own copy of the weights; use thread jobs
(`job_executor_type=JobExecutorType.THREAD`) to share one copy between jobs, or `kyutai-tts serve`
plus `RemoteTTS` to share one GPU between many worker processes.
"""

from __future__ import annotations

import asyncio
import os
import time

from livekit.agents import (
    DEFAULT_API_CONNECT_OPTIONS,
    Agent,
    AgentSession,
    APIConnectOptions,
    JobContext,
    JobProcess,
    WorkerOptions,
    cli,
    llm,
)

import kyutai_tts_plugin.livekit as kyutai  # registers the download-files hook (main thread)

SCRIPTED_REPLY = "Hello! I'm speaking with Kyutai's streaming text to speech, word by word."


def prewarm(proc: JobProcess) -> None:
    tts = kyutai.TTS(
        model=os.environ.get("KYUTAI_TTS_MODEL", "kyutai/tts-1.6b-en_fr"),
        voice_repo=os.environ.get("KYUTAI_TTS_VOICES", "kyutai/tts-voices"),
        device=os.environ.get("KYUTAI_TTS_DEVICE", "cpu"),
    )
    tts.prewarm()  # loads in a background thread
    proc.userdata["tts"] = tts


class ScriptedLLM(llm.LLM):
    """Stands in for an LLM when no key is set: streams a fixed reply as small deltas, some split
    mid-word, the way a real LLM streams (also the tests' LLM double)."""

    def __init__(self, reply: str = SCRIPTED_REPLY, delay: float = 0.03) -> None:
        super().__init__()
        self.reply, self.delay = reply, delay
        self.deltas: list[tuple[float, str]] = []  # (monotonic time, delta) as sent
        self.finished_at: float | None = None

    def chat(
        self,
        *,
        chat_ctx: llm.ChatContext,
        tools: list | None = None,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        **_: object,
    ) -> llm.LLMStream:
        return _ScriptedStream(self, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options)


class _ScriptedStream(llm.LLMStream):
    async def _run(self) -> None:
        scripted: ScriptedLLM = self._llm  # type: ignore[assignment]
        for i in range(0, len(scripted.reply), 3):
            delta = scripted.reply[i : i + 3]
            scripted.deltas.append((time.monotonic(), delta))
            self._event_ch.send_nowait(
                llm.ChatChunk(id="scripted", delta=llm.ChoiceDelta(role="assistant", content=delta))
            )
            await asyncio.sleep(scripted.delay)
        scripted.finished_at = time.monotonic()


async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
    llm_service: llm.LLM = ScriptedLLM()
    if os.environ.get("OPENAI_API_KEY"):
        from livekit.plugins import openai

        llm_service = openai.LLM(model=os.environ.get("OPENAI_MODEL", "gpt-4o-mini"))
    session = AgentSession(tts=ctx.proc.userdata["tts"], llm=llm_service, use_tts_aligned_transcript=True)
    await session.start(
        Agent(instructions="You are a friendly voice assistant. Keep answers short."), room=ctx.room
    )
    await session.generate_reply(instructions="Greet the user.")


if __name__ == "__main__":
    cli.run_app(WorkerOptions(entrypoint_fnc=entrypoint, prewarm_fnc=prewarm, initialize_process_timeout=120))
