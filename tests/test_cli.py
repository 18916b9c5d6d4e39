"""The `kyutai-tts` command line, end to end on the tiny random checkpoint."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import pytest

from kyutai_tts_plugin.cli import main
from kyutai_tts_plugin.testing import TEST_VOICES, TINY_LM_CONFIG

TEXT = "Hello world, this is a tiny test."


def test_make_test_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "tiny"
    assert main(["make-test-checkpoint", str(root), "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "random weights: produces noise, for testing pipelines offline" in out
    assert f"kyutai-tts synthesize --model {root} --voice-repo {root / 'voices'}" in out
    for name in ("config.json", "mimi_config.json", "tokenizer_spm_test.model"):
        assert (root / name).is_file(), name
    assert (root / TINY_LM_CONFIG["moshi_name"]).stat().st_size > 100_000
    assert (root / TINY_LM_CONFIG["mimi_name"]).stat().st_size > 100_000
    assert json.loads((root / "config.json").read_text()) == TINY_LM_CONFIG
    for voice in TEST_VOICES:
        assert (root / "voices" / f"{voice}.0123abcd@7.safetensors").is_file()


def test_voices(tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["voices", "--model", str(tiny_checkpoint), "--voice-repo", str(tiny_checkpoint / "voices")])
    assert code == 0
    assert capsys.readouterr().out.splitlines() == sorted(TEST_VOICES)


def test_synthesize_wav_and_timings(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, timings = tmp_path / "out.wav", tmp_path / "timings.json"
    args = ["synthesize", "--model", str(tiny_checkpoint), "--voice-repo", str(tiny_checkpoint / "voices")]
    args += [
        "--text",
        TEXT,
        "--out",
        str(out),
        "--timings",
        str(timings),
        "--temperature",
        "0",
        "--seed",
        "3",
    ]
    assert main(args) == 0
    assert f"wrote {out}" in capsys.readouterr().err
    with wave.open(str(out), "rb") as f:
        assert (f.getframerate(), f.getnchannels(), f.getsampwidth()) == (24000, 1, 2)
        assert f.getnframes() > 0 and f.getnframes() % 1920 == 0
    words = json.loads(timings.read_text())
    assert [w["word"] for w in words] == TEXT.split()
    assert all(0 <= w["start"] <= w["end"] for w in words)
    assert [w["start"] for w in words] == sorted(w["start"] for w in words)


def test_synthesize_from_text_file_with_options(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text_file, out = tmp_path / "in.txt", tmp_path / "out.wav"
    text_file.write_text("Bonjour à tous.\n", encoding="utf-8")
    args = ["synthesize", "--model", str(tiny_checkpoint), "--voice-repo", str(tiny_checkpoint / "voices")]
    args += ["--text-file", str(text_file), "--out", str(out), "--voice", "vctk/p225_023", "--n-q", "8"]
    args += ["--cfg", "1.5", "--padding-bonus", "0.5", "--seed", "1", "--dtype", "float32", "--device", "cpu"]
    assert main(args) == 0
    with wave.open(str(out), "rb") as f:
        assert f.getnframes() > 0


def test_bad_voice_exits_2_with_close_matches(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["synthesize", "--model", str(tiny_checkpoint), "--voice-repo", str(tiny_checkpoint / "voices")]
    args += ["--text", "hi", "--out", str(tmp_path / "x.wav"), "--voice", "expresso/ex03-ex01_happy"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("kyutai-tts: error: Voice 'expresso/ex03-ex01_happy' not found in voice directory")
    assert "Close matches: expresso/ex03-ex01_happy_001_channel1_334s.wav." in err
    assert "`kyutai-tts voices --voice-repo" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "x.wav").exists()


def test_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["voices", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kyutai-tts: error: {tmp_path / 'missing'}: no such directory")
    assert len(err.strip().splitlines()) == 1
    args = [
        "synthesize",
        "--model",
        str(tmp_path),
        "--text-file",
        str(tmp_path / "none.txt"),
        "--out",
        "x.wav",
    ]
    assert main(args) == 2
    assert "none.txt" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["synthesize", "--text", "hi"])  # --out is required
    assert info.value.code == 2
    assert "--out" in capsys.readouterr().err
