"""config.json parsing, checkpoint resolution (local dir and Hugging Face cache), voices, file checks."""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from kyutai_tts_plugin import checkpoint
from kyutai_tts_plugin.checkpoint import (
    DEFAULT_MODEL_REPO,
    DEFAULT_VOICE,
    DEFAULT_VOICE_REPO,
    TTSConfig,
    VoiceLibrary,
    check_safetensors,
    load_config,
    load_safetensors,
    load_voice_embedding,
    resolve_checkpoint,
)
from kyutai_tts_plugin.configs import REAL_CONFIG_JSON
from kyutai_tts_plugin.errors import CheckpointError, VoiceNotFoundError
from kyutai_tts_plugin.testing import TEST_VOICES, TINY_LM_CONFIG, train_test_tokenizer, write_test_voices

TINY_SUFFIX = ".0123abcd@7.safetensors"

# The released config.json of kyutai/tts-1.6b-en_fr (engine.md §1).
REAL_CONFIG: dict[str, Any] = copy.deepcopy(REAL_CONFIG_JSON)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_test_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer_spm_test.model")


def write_checkpoint_dir(root: Path, tokenizer_file: Path) -> Path:
    """The tiny checkpoint's file layout; LM/Mimi are small valid safetensors (only headers are read)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(TINY_LM_CONFIG))
    (root / "mimi_config.json").write_text(json.dumps({"sample_rate": 24000, "frame_rate": 12.5}))
    shutil.copy(tokenizer_file, root / TINY_LM_CONFIG["tokenizer_name"])
    save_file({"w": torch.zeros(4, 4, dtype=torch.bfloat16)}, str(root / TINY_LM_CONFIG["moshi_name"]))
    save_file({"m": torch.ones(8)}, str(root / TINY_LM_CONFIG["mimi_name"]))
    return root


def write_hf_cache(cache: Path, repo: str, source: Path, commit: str = "a" * 40) -> Path:
    """Copy `source` into a Hugging Face cache layout: blobs, snapshots/<commit> symlinks, refs/main."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        rel = file.relative_to(source)
        blob = repo_dir / "blobs" / hashlib.sha256(rel.as_posix().encode()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(file, blob)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


# -- config.json ---------------------------------------------------------------------------------


def test_tiny_config() -> None:
    c = TTSConfig.from_dict(copy.deepcopy(TINY_LM_CONFIG), source="tiny")
    assert (c.dim, c.num_heads, c.num_layers, c.text_card, c.card, c.n_q, c.dep_q) == (
        64,
        4,
        2,
        512,
        2048,
        32,
        32,
    )
    assert c.voice_suffix == TINY_SUFFIX
    assert c.delay_steps == 16
    assert c.second_stream_ahead == 2
    assert c.cfg_values == (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
    assert c.has_speaker_cross_attention and c.speaker_dim == 32
    assert c.mimi_config_name == "mimi_config.json"
    assert c.raw == TINY_LM_CONFIG


def test_tiny_config_has_exactly_the_real_keys() -> None:
    def shape(d: Any) -> Any:
        return {k: shape(v) for k, v in d.items()} if isinstance(d, dict) else type(d).__name__

    tiny = {k: v for k, v in TINY_LM_CONFIG.items() if k != "mimi_config_name"}
    assert shape(tiny) == shape(REAL_CONFIG)
    assert tiny["depformer_weights_per_step_schedule"] == REAL_CONFIG["depformer_weights_per_step_schedule"]


def test_real_config() -> None:
    c = TTSConfig.from_dict(copy.deepcopy(REAL_CONFIG), source="config.json")
    assert c.voice_suffix == ".1e68beda@240.safetensors"
    assert c.delay_steps == 16
    assert c.delays == (0, 0) + (2,) * 31
    assert c.cfg_values == (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
    assert len(c.depformer_schedule) == 32 and len(set(c.depformer_schedule)) == 11
    assert c.has_speaker_cross_attention and c.speaker_dim == 512
    assert (c.norm, c.gating, c.positional_embedding, c.depformer_pos_emb) == (
        "rms_norm_f32",
        "silu",
        "rope",
        "none",
    )
    assert (c.hidden_scale, c.max_period, c.context, c.layer_scale, c.text_card_out) == (
        4.125,
        10000.0,
        500,
        None,
        None,
    )
    assert (c.depformer_dim, c.depformer_num_heads, c.depformer_num_layers) == (1024, 16, 4)
    assert (c.depformer_dim_feedforward, c.depformer_low_rank_embeddings) == (3072, 128)
    assert c.depformer_multi_linear and c.depformer_weights_per_step and c.demux_second_stream and c.causal
    assert (c.model_sig, c.model_epoch, c.model_type) == ("1e68beda", "240", "tts")
    assert c.moshi_name == "dsm_tts_1e68beda@240.safetensors"
    assert c.mimi_name == "tokenizer-e351c8d8-checkpoint125.safetensors"
    assert c.tokenizer_name == "tokenizer_spm_8k_en_fr_audio.model"
    assert c.mimi_config_name is None
    assert c.lm_gen_config == {"temp": 0.6, "text_temp": 0.6}


def test_defaults_are_moshis() -> None:
    """Keys left out of config.json take moshi's defaults (read from moshi's own signatures)."""
    from moshi.models import loaders
    from moshi.models.lm import LMModel
    from moshi.modules.transformer import StreamingTransformer, StreamingTransformerLayer

    minimal = {k: REAL_CONFIG[k] for k in ("card", "n_q", "dep_q", "delays", "dim", "text_card")}
    minimal |= {"num_heads": 16, "num_layers": 16, "tts_config": {"audio_delay": 1.28}, "model_type": "tts"}
    minimal["model_id"] = {"sig": "x", "epoch": 1}
    c = TTSConfig.from_dict(minimal)
    params = {
        **inspect.signature(StreamingTransformerLayer).parameters,
        **inspect.signature(StreamingTransformer).parameters,
        **inspect.signature(LMModel).parameters,
    }
    checked = 0
    for name, param in params.items():
        if hasattr(c, name) and param.default is not inspect.Parameter.empty and name not in minimal:
            assert getattr(c, name) == param.default, name
            checked += 1
    assert checked >= 15
    assert c.moshi_name == loaders.MOSHI_NAME
    assert c.mimi_name == loaders.MIMI_NAME
    assert c.tokenizer_name == loaders.TEXT_TOKENIZER_NAME
    assert c.demux_second_stream is False and c.conditioners == {} and c.fuser is None
    assert c.depformer_schedule == (0,) * 32
    assert c.cfg_values == () and not c.has_speaker_cross_attention


def _broken(edit: Any) -> dict[str, Any]:
    d = copy.deepcopy(REAL_CONFIG)
    edit(d)
    return d


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("dim"), "key 'dim' is missing"),
        (lambda d: d.update(n_q="32"), "key 'n_q' has the wrong type (expected int, got '32')"),
        (lambda d: d.update(card=True), "key 'card' has the wrong type (expected int, got True)"),
        (lambda d: d.update(causal=1), "key 'causal' has the wrong type (expected bool, got 1)"),
        (lambda d: d.update(delays=[0] * 32), "key 'delays' has 32 entries, expected n_q + 1 = 33"),
        (
            lambda d: d.update(delays=[0, "0"] + [2] * 31),
            "key 'delays' has the wrong type (expected int list",
        ),
        (lambda d: d.update(dep_q=40), "key 'dep_q' is 40, expected 0..n_q (32)"),
        (lambda d: d.update(norm="batch_norm"), "key 'norm' is 'batch_norm', expected one of layer_norm,"),
        (lambda d: d.update(gating="swiglu"), "key 'gating' is 'swiglu', expected one of"),
        (lambda d: d.update(positional_embedding="alibi"), "key 'positional_embedding' is 'alibi'"),
        (lambda d: d.update(num_heads=15), "key 'num_heads' is 15, which does not divide dim = 2048"),
        (lambda d: d.update(text_card=3), "key 'text_card' is 3, expected more than the 4 control tokens"),
        (
            lambda d: d.update(depformer_weights_per_step_schedule=[0] * 31),
            "key 'depformer_weights_per_step_schedule' has 31 entries, expected dep_q = 32",
        ),
        (
            lambda d: d["conditioners"]["cfg"].update(type="embedding"),
            "key 'conditioners.cfg.type' is 'embedding', expected one of lut, tensor",
        ),
        (
            lambda d: d["conditioners"]["speaker_wavs"]["tensor"].pop("dim"),
            "key 'conditioners.speaker_wavs.tensor.dim' is missing",
        ),
        (
            lambda d: d["conditioners"]["cfg"]["lut"].update(n_bins=8),
            "key 'conditioners.cfg.lut.possible_values' has 7 entries but n_bins is 8",
        ),
        (
            lambda d: d["conditioners"]["cfg"]["lut"]["possible_values"].__setitem__(0, "one"),
            "key 'conditioners.cfg.lut.possible_values' has a value that is not a number",
        ),
        (
            lambda d: d["fuser"]["sum"].append("style"),
            "key 'fuser.sum' names conditioner 'style', which 'conditioners' lacks",
        ),
        (lambda d: d.pop("tts_config"), "key 'tts_config' is missing"),
        (lambda d: d["tts_config"].pop("audio_delay"), "key 'tts_config.audio_delay' is missing"),
        (
            lambda d: d["tts_config"].update(audio_delay=-1),
            "key 'tts_config.audio_delay' is -1.0, expected >= 0",
        ),
        (lambda d: d["model_id"].pop("sig"), "key 'model_id.sig' is missing"),
        (
            lambda d: d.update(model_type="stt"),
            "key 'model_type' is 'stt', but this engine only runs text-to-speech",
        ),
        (lambda d: d.pop("model_type"), "key 'model_type' is 'moshi'"),
        (lambda d: d.update(moshi_name=None), "key 'moshi_name' has the wrong type (expected str, got None)"),
    ],
)
def test_config_errors_name_the_file_and_key(edit: Any, message: str) -> None:
    with pytest.raises(CheckpointError) as info:
        TTSConfig.from_dict(_broken(edit), source="/models/x/config.json")
    text = str(info.value)
    assert text.startswith("/models/x/config.json: ")
    assert message in text
    assert "re-download it, or fix the key" in text


def test_config_json_file_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json: not found; a checkpoint directory must hold"):
        TTSConfig.from_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON .*re-download the checkpoint"):
        TTSConfig.from_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json: expected a JSON object"):
        TTSConfig.from_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps(REAL_CONFIG))
    assert TTSConfig.from_json(tmp_path / "config.json").voice_suffix == ".1e68beda@240.safetensors"


# -- local checkpoints ---------------------------------------------------------------------------


def test_resolve_local_directory(tmp_path: Path, tokenizer_file: Path) -> None:
    root = write_checkpoint_dir(tmp_path / "ckpt", tokenizer_file)
    for model in (root, str(root)):
        files = resolve_checkpoint(model)
        assert files.root == root
        assert files.lm_path == root / "dsm_tts_0123abcd@7.safetensors"
        assert files.mimi_path == root / "tokenizer-test-mimi.safetensors"
        assert files.tokenizer_path == root / "tokenizer_spm_test.model"
        assert files.mimi_config == {"sample_rate": 24000, "frame_rate": 12.5}
        assert files.config.voice_suffix == TINY_SUFFIX
    assert load_config(root).model_sig == "0123abcd"


def test_real_layout_without_mimi_config(tmp_path: Path, tokenizer_file: Path) -> None:
    root = write_checkpoint_dir(tmp_path / "ckpt", tokenizer_file)
    config = {k: v for k, v in TINY_LM_CONFIG.items() if k != "mimi_config_name"}
    (root / "config.json").write_text(json.dumps(config))
    (root / "mimi_config.json").unlink()
    assert resolve_checkpoint(root).mimi_config is None


@pytest.mark.parametrize(
    ("missing", "what"),
    [
        ("dsm_tts_0123abcd@7.safetensors", "language model weights"),
        ("tokenizer-test-mimi.safetensors", "Mimi codec weights"),
        ("tokenizer_spm_test.model", "text tokenizer"),
        ("mimi_config.json", "Mimi configuration"),
    ],
)
def test_missing_file_in_local_directory(
    tmp_path: Path, tokenizer_file: Path, missing: str, what: str
) -> None:
    root = write_checkpoint_dir(tmp_path / "ckpt", tokenizer_file)
    (root / missing).unlink()
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(root)
    assert str(info.value) == (
        f"{root / missing}: missing; config.json names '{missing}' as the {what}. Copy it into {root} "
        f"(it comes with the checkpoint, e.g. `hf download {DEFAULT_MODEL_REPO}`)."
    )


def test_missing_config_and_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json: missing; config.json names 'config.json'"):
        resolve_checkpoint(tmp_path)
    for bad in (tmp_path / "nope", str(tmp_path / "nope"), "./nope", "a/b/c"):
        with pytest.raises(CheckpointError, match="nope: no such directory|a/b/c: no such directory") as info:
            resolve_checkpoint(bad)
        assert f"Hugging Face repo id such as '{DEFAULT_MODEL_REPO}'" in str(info.value)


def test_truncated_weights_are_named(tmp_path: Path, tokenizer_file: Path) -> None:
    root = write_checkpoint_dir(tmp_path / "ckpt", tokenizer_file)
    lm = root / "dsm_tts_0123abcd@7.safetensors"
    data = lm.read_bytes()
    lm.write_bytes(data[:-5])
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(root)
    assert str(info.value) == (
        f"{lm}: truncated: {len(data) - 5} bytes, its header describes {len(data)}; "
        "re-download it (a download was probably interrupted)."
    )
    with pytest.raises(CheckpointError, match="truncated: "):
        load_safetensors(lm)
    lm.write_bytes(data[:20])
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        resolve_checkpoint(root)
    lm.write_bytes(data[:4])
    with pytest.raises(CheckpointError, match="truncated .4 bytes, not even a header"):
        load_safetensors(lm)


def test_corrupt_safetensors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((10).to_bytes(8, "little") + b"not json!!" + b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: corrupt safetensors header"):
        load_safetensors(bad)
    with pytest.raises(CheckpointError, match=r"missing\.safetensors: not found"):
        check_safetensors(tmp_path / "missing.safetensors")
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.arange(6.0).reshape(2, 3)}, str(good))
    assert torch.equal(load_safetensors(good)["a"], torch.arange(6.0).reshape(2, 3))
    assert set(check_safetensors(good)) == {"a"}


def test_bad_mimi_config(tmp_path: Path, tokenizer_file: Path) -> None:
    root = write_checkpoint_dir(tmp_path / "ckpt", tokenizer_file)
    (root / "mimi_config.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"mimi_config.json: not valid JSON .*re-download it"):
        resolve_checkpoint(root)


# -- Hugging Face --------------------------------------------------------------------------------


def test_resolve_from_offline_hf_cache(tmp_path: Path, tokenizer_file: Path, offline_cache: Path) -> None:
    source = write_checkpoint_dir(tmp_path / "src", tokenizer_file)
    snapshot = write_hf_cache(offline_cache, DEFAULT_MODEL_REPO, source)
    files = resolve_checkpoint()  # the default repo id, from the cache only
    assert files.root == snapshot
    assert files.lm_path == snapshot / "dsm_tts_0123abcd@7.safetensors"
    assert files.lm_path.read_bytes() == (source / "dsm_tts_0123abcd@7.safetensors").read_bytes()
    assert files.mimi_config == {"sample_rate": 24000, "frame_rate": 12.5}
    assert resolve_checkpoint(DEFAULT_MODEL_REPO, revision="a" * 40).root == snapshot
    assert load_config(DEFAULT_MODEL_REPO).voice_suffix == TINY_SUFFIX


def test_offline_and_not_cached(offline_cache: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint("kyutai/tts-1.6b-en_fr")
    assert str(info.value) == (
        "Cannot get 'config.json' (model configuration) of Hugging Face repo 'kyutai/tts-1.6b-en_fr': "
        "HF_HUB_OFFLINE is set and the file is not in the local cache. On a machine with internet access run "
        "`hf download kyutai/tts-1.6b-en_fr` (older huggingface_hub: `huggingface-cli download "
        f"kyutai/tts-1.6b-en_fr`) and copy the Hugging Face cache ({offline_cache}), or pass a local "
        'directory, model="/path/to/dir", holding config.json and the LM, Mimi and tokenizer files it names.'
    )


def test_partially_cached_repo_names_the_missing_file(
    tmp_path: Path, tokenizer_file: Path, offline_cache: Path
) -> None:
    source = write_checkpoint_dir(tmp_path / "src", tokenizer_file)
    (source / "dsm_tts_0123abcd@7.safetensors").unlink()
    write_hf_cache(offline_cache, DEFAULT_MODEL_REPO, source)
    with pytest.raises(
        CheckpointError, match=r"Cannot get 'dsm_tts_0123abcd@7.safetensors' \(language model"
    ):
        resolve_checkpoint()


def _hub_raising(error: Exception) -> Any:
    def fake_download(*args: Any, **kwargs: Any) -> str:
        assert kwargs["local_files_only"] is False  # online: the Hub is asked
        raise error

    return fake_download


@pytest.fixture
def hub_online(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine that can connect to the Hub (the requests themselves are faked per test)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(checkpoint.hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(checkpoint, "_hub_unreachable", lambda: False)


def test_no_network_and_not_cached(hub_online: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setattr(checkpoint, "hf_hub_download", _hub_raising(LocalEntryNotFoundError("no connection")))
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint("kyutai/tts-1.6b-en_fr", revision="main")
    text = str(info.value)
    assert text.startswith(
        "Cannot get 'config.json' (model configuration) of Hugging Face repo 'kyutai/tts-1.6b-en_fr' "
        "at revision main: the Hub (https://huggingface.co) cannot be reached from this machine and the "
        "file is not in the local cache; set HF_HUB_OFFLINE=1 to use only the cache without trying the Hub. "
    )
    assert "`huggingface-cli download kyutai/tts-1.6b-en_fr`" in text and 'model="/path/to/dir"' in text


def test_unreachable_hub_fails_at_once_from_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """No connection to the Hub's host: one quick probe, then the cache only (no half-minute retries)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(checkpoint.hf_constants, "HF_HUB_OFFLINE", False)
    for variable in checkpoint._PROXY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(checkpoint, "_hub_seen_reachable", False)
    probes: list[tuple[Any, float]] = []

    def refuse(address: Any, timeout: float) -> Any:
        probes.append((address, timeout))
        raise OSError("Name or service not known")

    asked: list[bool] = []

    def download(*args: Any, **kwargs: Any) -> str:
        asked.append(kwargs["local_files_only"])
        raise LocalEntryNotFoundError("not cached")

    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setattr(checkpoint.socket, "create_connection", refuse)
    monkeypatch.setattr(checkpoint, "hf_hub_download", download)
    with pytest.raises(CheckpointError, match=r"cannot be reached from this machine .* HF_HUB_OFFLINE=1"):
        resolve_checkpoint("kyutai/tts-1.6b-en_fr")
    assert probes == [(("huggingface.co", 443), checkpoint._HUB_PROBE_TIMEOUT_S)]
    assert asked == [True], "an unreachable Hub must not be asked (huggingface_hub would retry for ~30 s)"
    # Behind a proxy a direct connection proves nothing: the Hub is asked as usual.
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    with pytest.raises(CheckpointError):
        resolve_checkpoint("kyutai/tts-1.6b-en_fr")
    assert asked == [True, False] and len(probes) == 1


def test_unknown_repo(hub_online: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub.errors import RepositoryNotFoundError

    # Built without __init__, which wants a response object of huggingface_hub's HTTP client.
    error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
    Exception.__init__(error, "404 Repository Not Found")
    monkeypatch.setattr(checkpoint, "hf_hub_download", _hub_raising(error))
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint("someone/typo")
    assert str(info.value) == (
        "Cannot get 'config.json' (model configuration) of Hugging Face repo 'someone/typo': no such repo on "
        "the Hub (if you meant a local directory, it does not exist)."
    )


# -- voices --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def voices_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_voices(tmp_path_factory.mktemp("voices"))


def test_list_local_voices(voices_dir: Path) -> None:
    (voices_dir / "other-model.wav.deadbeef@1.safetensors").write_bytes(b"")  # another model's voice
    assert VoiceLibrary(voices_dir, suffix=TINY_SUFFIX).list() == sorted(TEST_VOICES)
    assert VoiceLibrary(str(voices_dir), suffix=TINY_SUFFIX).list() == sorted(TEST_VOICES)
    assert DEFAULT_VOICE in TEST_VOICES


@pytest.mark.parametrize(
    "name",
    [
        "expresso/ex03-ex01_happy_001_channel1_334s.wav",
        "expresso/ex03-ex01_happy_001_channel1_334s",
        "expresso/ex03-ex01_happy_001_channel1_334s.wav" + TINY_SUFFIX,
    ],
)
def test_resolve_local_voice(voices_dir: Path, name: str) -> None:
    path = VoiceLibrary(voices_dir, suffix=TINY_SUFFIX).resolve(name)
    assert path == voices_dir / ("expresso/ex03-ex01_happy_001_channel1_334s.wav" + TINY_SUFFIX)


def test_resolve_voice_file_path_and_name_without_wav(voices_dir: Path, tmp_path: Path) -> None:
    custom = tmp_path / "my voice.safetensors"
    save_file({"speaker_wavs": torch.zeros(1, 32, 125)}, str(custom))
    lib = VoiceLibrary(voices_dir, suffix=TINY_SUFFIX)
    assert lib.resolve(str(custom)) == custom
    assert lib.resolve(custom) == custom
    plain = voices_dir / ("plain" + TINY_SUFFIX)  # a local voice whose name has no .wav
    shutil.copy(custom, plain)
    try:
        assert lib.resolve("plain") == plain
    finally:
        plain.unlink()


def test_unknown_voice_lists_close_matches(voices_dir: Path) -> None:
    lib = VoiceLibrary(voices_dir, suffix=TINY_SUFFIX)
    with pytest.raises(VoiceNotFoundError) as info:
        lib.resolve("expresso/ex03-ex01_happy_001_channel1_335s.wav")
    assert str(info.value) == (
        f"Voice 'expresso/ex03-ex01_happy_001_channel1_335s.wav' not found in voice directory {voices_dir}. "
        "Close matches: expresso/ex03-ex01_happy_001_channel1_334s.wav. List the available voices with "
        f"engine.list_voices() or `kyutai-tts voices --voice-repo {voices_dir}`."
    )
    with pytest.raises(VoiceNotFoundError, match="Close matches: unmute-prod-website/default_voice.wav."):
        lib.resolve("default_voice")
    with pytest.raises(VoiceNotFoundError) as info:
        lib.resolve("zzzzzzzz")
    assert "Close matches" not in str(info.value) and "kyutai-tts voices" in str(info.value)
    with pytest.raises(VoiceNotFoundError, match="not found"):
        lib.resolve(str(voices_dir / "missing.safetensors"))


def test_voices_from_offline_hf_cache(voices_dir: Path, offline_cache: Path) -> None:
    write_hf_cache(offline_cache, DEFAULT_VOICE_REPO, voices_dir)
    lib = VoiceLibrary(suffix=TINY_SUFFIX)
    assert lib.list() == sorted(TEST_VOICES)
    path = lib.resolve("vctk/p225_023")
    assert path.name == "p225_023.wav" + TINY_SUFFIX and path.read_bytes()
    with pytest.raises(VoiceNotFoundError) as info:
        lib.resolve("vctk/p226_023.wav")
    assert str(info.value) == (
        "Voice 'vctk/p226_023.wav' not found in Hugging Face repo 'kyutai/tts-voices' (offline: only voices "
        "already in the local cache are available). Close matches: vctk/p225_023.wav. List the available "
        "voices with engine.list_voices() or `kyutai-tts voices --voice-repo kyutai/tts-voices`."
    )


def test_hf_voices_offline_and_not_cached(offline_cache: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        VoiceLibrary(suffix=TINY_SUFFIX).list()
    assert str(info.value) == (
        "Cannot list voices of Hugging Face repo 'kyutai/tts-voices': HF_HUB_OFFLINE is set and nothing of "
        f"it is in the local cache ({offline_cache}). On a machine "
        "with internet access run `hf download kyutai/tts-voices` and copy the cache, or pass a local "
        "directory of voice files (--voice-repo DIR, voice_repo=...)."
    )


def test_missing_voice_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such directory; pass an existing voice directory"):
        VoiceLibrary(tmp_path / "voices", suffix=TINY_SUFFIX)


def test_load_voice_embedding(voices_dir: Path, tmp_path: Path) -> None:
    path = voices_dir / (DEFAULT_VOICE + TINY_SUFFIX)
    emb = load_voice_embedding(path, 32)
    assert emb.shape == (1, 32, 125) and emb.dtype == torch.float32

    def write(tensors: dict[str, torch.Tensor]) -> Path:
        p = tmp_path / "v.safetensors"
        save_file(tensors, str(p))
        return p

    half = write({"speaker_wavs": torch.ones(1, 32, 125, dtype=torch.bfloat16)})
    assert load_voice_embedding(half, 32).dtype == torch.float32
    with pytest.raises(CheckpointError) as info:
        load_voice_embedding(write({"speaker": torch.zeros(1, 32, 125)}), 32)
    assert str(info.value).startswith(
        f"{tmp_path / 'v.safetensors'}: no 'speaker_wavs' tensor (found: speaker); a voice file holds "
        "'speaker_wavs' of shape [1, 32, T]."
    )
    with pytest.raises(
        CheckpointError, match=r"'speaker_wavs' has shape \[1, 512, 125\], expected \[1, 32, T\]"
    ):
        load_voice_embedding(write({"speaker_wavs": torch.zeros(1, 512, 125)}), 32)
    with pytest.raises(CheckpointError, match=r"'speaker_wavs' has shape \[32, 125\], expected \[1, 32, T\]"):
        load_voice_embedding(write({"speaker_wavs": torch.zeros(32, 125)}), 32)
    with pytest.raises(
        CheckpointError, match=r"'speaker_wavs' has dtype torch.int64, expected float32 \[1, 32, T\]"
    ):
        load_voice_embedding(write({"speaker_wavs": torch.zeros(1, 32, 125, dtype=torch.long)}), 32)


class _FakeApi:
    files: list[str] = []
    error: Exception | None = None

    def list_repo_files(self, repo_id: str, revision: str | None = None) -> list[str]:
        assert repo_id == DEFAULT_VOICE_REPO
        if self.error is not None:
            raise self.error
        return self.files


def test_list_hf_voices_online(
    monkeypatch: pytest.MonkeyPatch, offline_cache: Path, hub_online: None
) -> None:
    api = type("Api", (_FakeApi,), {"files": ["README.md", "b/x.wav" + TINY_SUFFIX, "a/y.wav" + TINY_SUFFIX]})
    monkeypatch.setattr(checkpoint, "HfApi", api)
    assert VoiceLibrary(suffix=TINY_SUFFIX).list() == ["a/y.wav", "b/x.wav"]


def test_list_hf_voices_without_network_falls_back_to_the_cache(
    monkeypatch: pytest.MonkeyPatch, offline_cache: Path, voices_dir: Path, hub_online: None
) -> None:
    monkeypatch.setattr(checkpoint, "HfApi", type("Api", (_FakeApi,), {"error": OSError("network down")}))
    write_hf_cache(offline_cache, DEFAULT_VOICE_REPO, voices_dir)
    assert VoiceLibrary(suffix=TINY_SUFFIX).list() == sorted(TEST_VOICES)
