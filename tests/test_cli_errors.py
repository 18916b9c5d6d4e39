"""What a new user meets first: each mistake is one line that says what to do, with exit code 2.

Every case runs the real command line in a subprocess, on a machine where the Hub cannot be reached
(a closed loopback port stands in for huggingface.co), so nothing is downloaded whatever the network.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kyutai_tts_plugin import cli
from kyutai_tts_plugin.errors import InvalidInputError
from kyutai_tts_plugin.hardware import resolve_device, resolve_dtype

CLOSED_PORT_HUB = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused


def run_cli(*args: str, home: Path, offline: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY") and k != "HF_HUB_OFFLINE"}
    env.update(HF_HOME=str(home), HF_ENDPOINT=CLOSED_PORT_HUB, PYTHONUNBUFFERED="1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "kyutai_tts_plugin.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,  # a hang guard only
    )


def assert_error(result: subprocess.CompletedProcess[str], first_line_start: str, *mentions: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    assert lines[0].startswith(first_line_start), lines[0]
    for text in mentions:
        assert text in lines[0], (text, lines[0])


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf-home")


SYNTH = ("synthesize", "--text", "Hello there.", "--out")


def test_a_device_this_machine_lacks(home: Path, tmp_path: Path, tiny_checkpoint: Path) -> None:
    out = str(tmp_path / "x.wav")
    result = run_cli(*SYNTH, out, "--model", str(tiny_checkpoint), "--device", "cuda:99", home=home)
    assert_error(result, "kyutai-tts: error: device 'cuda:99' is not available", "cpu")
    result = run_cli(*SYNTH, out, "--model", str(tiny_checkpoint), "--device", "tpu", home=home)
    assert_error(result, "kyutai-tts: error: device 'tpu' is not a device name", "cuda")
    assert not Path(out).exists()
    result = run_cli(
        "serve", "--model", str(tiny_checkpoint), "--device", "cuda:99", "--port", "0", home=home
    )
    assert_error(result, "kyutai-tts: error: device 'cuda:99' is not available", "cpu")


def test_an_unreachable_hub_fails_fast_and_names_hf_hub_offline(home: Path, tmp_path: Path) -> None:
    result = run_cli(*SYNTH, str(tmp_path / "x.wav"), home=home)
    assert_error(
        result,
        "kyutai-tts: error: Cannot get 'config.json' (model configuration) of Hugging Face repo "
        "'kyutai/tts-1.6b-en_fr': the Hub (http://127.0.0.1:9) cannot be reached",
        "HF_HUB_OFFLINE=1",
        "hf download kyutai/tts-1.6b-en_fr",
    )
    result = run_cli(*SYNTH, str(tmp_path / "x.wav"), home=home, offline=True)
    assert_error(result, "kyutai-tts: error: Cannot get 'config.json'", "HF_HUB_OFFLINE is set")


def test_voices_needs_only_the_voice_repo(home: Path, tiny_checkpoint: Path) -> None:
    result = run_cli("voices", "--voice-repo", str(tiny_checkpoint / "voices"), home=home)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "expresso/ex03-ex01_happy_001_channel1_334s.wav",
        "unmute-prod-website/default_voice.wav",
        "vctk/p225_023.wav",
    ]
    with_model = run_cli(
        "voices", "--model", str(tiny_checkpoint), "--voice-repo", str(tiny_checkpoint / "voices"), home=home
    )
    assert with_model.returncode == 0 and with_model.stdout == result.stdout


def test_voices_without_a_voice_repo_offline(home: Path, tiny_checkpoint: Path) -> None:
    result = run_cli("voices", "--model", str(tiny_checkpoint), home=home)
    assert_error(
        result,
        "kyutai-tts: error: Cannot list voices of Hugging Face repo 'kyutai/tts-voices': the Hub",
        "HF_HUB_OFFLINE=1",
        "--voice-repo DIR",
    )


def test_missing_voice_repo_directory(home: Path, tmp_path: Path) -> None:
    result = run_cli("voices", "--voice-repo", str(tmp_path / "nowhere"), home=home)
    assert_error(result, f"kyutai-tts: error: {tmp_path / 'nowhere'}: no such directory")


def test_outputs_are_checked_before_the_model_loads(home: Path, tmp_path: Path) -> None:
    # The model named here does not exist: an output error must come first, before any loading.
    missing_model = str(tmp_path / "no-model")
    result = run_cli(*SYNTH, str(tmp_path / "no-dir" / "x.wav"), "--model", missing_model, home=home)
    assert_error(result, f"kyutai-tts: error: {tmp_path / 'no-dir' / 'x.wav'}: the directory", "create it")
    result = run_cli(*SYNTH, str(tmp_path), "--model", missing_model, home=home)
    assert_error(result, f"kyutai-tts: error: {tmp_path}: is a directory")
    timings = str(tmp_path / "no-dir" / "t.json")
    result = run_cli(
        *SYNTH, str(tmp_path / "x.wav"), "--timings", timings, "--model", missing_model, home=home
    )
    assert_error(result, f"kyutai-tts: error: {timings}: the directory")


def test_empty_text_is_an_error(home: Path, tmp_path: Path) -> None:
    result = run_cli("synthesize", "--text", " \n ", "--out", str(tmp_path / "x.wav"), home=home)
    assert_error(result, "kyutai-tts: error: the text is empty")
    assert not (tmp_path / "x.wav").exists()


def test_make_test_checkpoint_never_overwrites(home: Path, tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    result = run_cli("make-test-checkpoint", str(tmp_path), home=home)
    assert_error(result, f"kyutai-tts: error: {tmp_path}: is not empty", "--force")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_dtype_names(home: Path, tmp_path: Path) -> None:
    result = run_cli(*SYNTH, str(tmp_path / "x.wav"), "--dtype", "fp17", home=home)
    assert result.returncode == 2 and "argument --dtype: invalid choice: 'fp17'" in result.stderr
    # The CLI and the Python API accept the same names.
    for name in ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16"):
        resolve_dtype(name)
    with pytest.raises(InvalidInputError, match="dtype 'fp17' is not supported; use one of: float32"):
        resolve_dtype("fp17")
    with pytest.raises(InvalidInputError, match="device 'cuda:99' is not available"):
        resolve_device("cuda:99")


def test_serve_without_the_server_extra(home: Path) -> None:
    code = (
        "import sys; sys.modules['aiohttp'] = None\n"  # as if the server extra were not installed
        "from kyutai_tts_plugin.cli import main\n"
        "sys.exit(main(['serve', '--model', 'X', '--port', '1234']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert_error(result, "kyutai-tts: error: serve needs aiohttp and msgpack", "pip install aiohttp msgpack")


def test_version(home: Path) -> None:
    result = run_cli("--version", home=home)
    assert result.returncode == 0 and result.stdout.strip() == f"kyutai-tts {cli._version()}"
    assert cli._version()[0].isdigit()


def test_ctrl_c_during_start_up_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path) -> None:
    from kyutai_tts_plugin import engine

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.TTSEngine, "from_pretrained", interrupted)
    assert cli.main([*SYNTH, str(tmp_path / "x.wav")]) == 130
    assert capsys.readouterr().err == "kyutai-tts: interrupted\n"


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_examples_name_a_missing_device_in_one_line(home: Path) -> None:
    env = {**os.environ, "HF_HOME": str(home), "HF_ENDPOINT": CLOSED_PORT_HUB, "KYUTAI_TTS_DEVICE": "cuda:99"}
    runs = {
        "pipecat_bot.py": [str(EXAMPLES / "pipecat_bot.py"), "--device", "cuda:99"],
        "pipecat_webrtc_bot.py": [str(EXAMPLES / "pipecat_webrtc_bot.py"), "--device", "cuda:99"],
        "livekit_agent.py": [str(EXAMPLES / "livekit_agent.py"), "download-files"],
    }
    for name, args in runs.items():
        result = subprocess.run(
            [sys.executable, *args], capture_output=True, text=True, env=env, timeout=300, cwd=home
        )
        assert result.returncode != 0, (name, result.stderr)
        ours = [line for line in result.stderr.splitlines() if line.startswith(f"{name}: error:")]
        assert len(ours) == 1 and "device 'cuda:99' is not available" in ours[0], (name, result.stderr)
        assert "Traceback" not in result.stderr, (name, result.stderr)
