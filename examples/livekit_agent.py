"""A LiveKit voice agent speaking with Kyutai TTS in-process.

    python -m livekit.agents download-files           # model + default voice into the HF cache
    python examples/livekit_agent.py console           # talk to it in the terminal (needs a sound card)
    python examples/livekit_agent.py dev               # join rooms of your LiveKit server

The LLM is OpenAI's when `OPENAI_API_KEY` is set (`pip install "livekit-agents[openai]"`); otherwise
the agent answers with a scripted reply, streamed token by token like an LLM would. STT/VAD come
from your LiveKit setup (e.g. `livekit-agents[deepgram,silero]`); `KYUTAI_TTS_MODEL` and
`KYUTAI_TTS_VOICES` point the TTS (and `download-files`) at another model or at local directories
(`kyutai-tts make-test-checkpoint DIR`).

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
import sys

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
    # The model and voices come from KYUTAI_TTS_MODEL / KYUTAI_TTS_VOICES (else the defaults),
    # the same ones `python -m livekit.agents download-files` fetched.
    tts = kyutai.TTS(device=os.environ.get("KYUTAI_TTS_DEVICE", "cpu"))
    tts.prewarm()  # loads in a background thread
    proc.userdata["tts"] = tts


class ScriptedLLM(llm.LLM):
    """Stands in for an LLM when no key is set: streams a fixed reply as small deltas, some split
    mid-word, the way a real LLM streams (also the tests' LLM double).

    `hold_last`, when given, holds back the last delta until that event is set: tests use it to
    prove that audio starts while the LLM is still talking, whatever the machine's speed.
    `deltas`, when given, are the exact deltas to stream (their concatenation is the reply).
    """

    def __init__(
        self,
        reply: str = SCRIPTED_REPLY,
        delay: float = 0.03,
        *,
        hold_last: asyncio.Event | None = None,
        deltas: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.reply = "".join(deltas) if deltas is not None else reply
        self.delay, self.hold_last, self._deltas = delay, hold_last, deltas
        self.sent: list[str] = []  # the deltas sent so far, in order
        self.finished = False  # the whole reply was sent

    @property
    def script(self) -> list[str]:
        """The deltas the reply is streamed as."""
        if self._deltas is not None:
            return list(self._deltas)
        return [self.reply[i : i + 3] for i in range(0, len(self.reply), 3)]

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
        script = scripted.script
        for i, delta in enumerate(script):
            if i == len(script) - 1 and scripted.hold_last is not None:
                await scripted.hold_last.wait()
            scripted.sent.append(delta)
            self._event_ch.send_nowait(
                llm.ChatChunk(id="scripted", delta=llm.ChoiceDelta(role="assistant", content=delta))
            )
            if scripted.delay:
                await asyncio.sleep(scripted.delay)
        scripted.finished = True


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
    from kyutai_tts_plugin import KyutaiTTSError
    from kyutai_tts_plugin.hardware import resolve_device

    try:  # a device this machine lacks: one line now, not a traceback in every job process
        resolve_device(os.environ.get("KYUTAI_TTS_DEVICE", "cpu"))
    except KyutaiTTSError as e:
        sys.exit(f"livekit_agent.py: error: {e} (KYUTAI_TTS_DEVICE)")
    cli.run_app(WorkerOptions(entrypoint_fnc=entrypoint, prewarm_fnc=prewarm, initialize_process_timeout=120))
