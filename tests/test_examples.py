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
