"""The examples run as users run them, on the tiny offline checkpoint."""

from __future__ import annotations

import subprocess
import sys
import wave
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pipecat_bot_writes_the_conversation(tiny_checkpoint, tmp_path):
    out = tmp_path / "conversation.wav"
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "pipecat_bot.py"),
            "--model",
            str(tiny_checkpoint),
            "--voice-repo",
            str(tiny_checkpoint / "voices"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    with wave.open(str(out)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
        assert w.getnframes() > 24000
    assert "s of audio" in proc.stdout


def test_livekit_agent_cli_starts():
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "livekit_agent.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for command in ("console", "dev", "download-files"):
        assert command in proc.stdout


async def test_livekit_agent_scripted_llm_streams_the_reply_in_split_words():
    from livekit.agents import llm

    sys.path.insert(0, str(ROOT / "examples"))
    from livekit_agent import SCRIPTED_REPLY, ScriptedLLM

    scripted = ScriptedLLM()  # as the example runs it: paced deltas, nothing held back
    async with scripted.chat(chat_ctx=llm.ChatContext()) as stream:
        deltas = [chunk.delta.content async for chunk in stream if chunk.delta and chunk.delta.content]
    assert "".join(deltas) == SCRIPTED_REPLY and deltas == scripted.sent == scripted.script
    assert scripted.finished and len(deltas) > 1
    pairs = zip(deltas, deltas[1:], strict=False)
    assert any(d[-1].isalpha() and n[0].isalpha() for d, n in pairs), "no delta ends mid-word"
