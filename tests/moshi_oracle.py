"""Helpers that build tiny random models with moshi's own classes (the reference, test-only) and save
them in the real checkpoint layout, so our engine can be checked against moshi token for token."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402
from moshi.models import loaders  # noqa: E402
from moshi.models.tts import TTSModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from kyutai_tts_plugin.mimi import TINY_MIMI_CONFIG  # noqa: E402
from kyutai_tts_plugin.testing import TINY_LM_CONFIG, train_test_tokenizer  # noqa: E402

VOICES = (
    "expresso/ex03-ex01_happy_001_channel1_334s.wav",
    "voice-donations/alice.wav",
    "voice-donations/bob.wav",
)


@dataclass
class MoshiCheckpoint:
    root: Path
    config: dict[str, Any]
    voices_dir: Path

    def voice_path(self, name: str) -> Path:
        sig = self.config["model_id"]
        return self.voices_dir / f"{name}.{sig['sig']}@{sig['epoch']}.safetensors"

    def load_moshi(self, n_q: int, temp: float, dtype: torch.dtype = torch.float32) -> TTSModel:
        info = loaders.CheckpointInfo.from_hf_repo(
            "local/test",
            moshi_weights=self.root / self.config["moshi_name"],
            mimi_weights=self.root / self.config["mimi_name"],
            tokenizer=self.root / self.config["tokenizer_name"],
            config_path=self.root / "config.json",
            mimi_config_path=self.root / self.config["mimi_config_name"],
        )
        return TTSModel.from_checkpoint_info(info, n_q=n_q, temp=temp, device="cpu", dtype=dtype)


def _fused_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """moshi module names -> the released checkpoint's fused attention names."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        for part, fused in ((".in_projs.", ".in_proj_weight"), (".out_projs.", ".out_proj.weight")):
            if part in key:
                prefix, rest = key.split(part, 1)
                groups.setdefault(prefix + fused, {})[int(rest.split(".")[0])] = value
                break
        else:
            out[key] = value
    for key, parts in groups.items():
        out[key] = torch.cat([parts[i] for i in sorted(parts)])
    return out


def _start_checkpoint(root: Path, config: dict[str, Any], seed: int) -> Any:
    """Write a tiny checkpoint's config, Mimi config and tokenizer; return moshi's LM for `config`,
    built after seeding torch with `seed` (its weights are then randomized by the caller)."""
    root.mkdir(parents=True, exist_ok=True)
    train_test_tokenizer(root / config["tokenizer_name"])
    (root / config["mimi_config_name"]).write_text(json.dumps(TINY_MIMI_CONFIG.to_dict()))
    (root / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    lm_kwargs = {k: v for k, v in config.items() if k not in _NON_LM_KEYS}
    return loaders.get_moshi_lm(None, lm_kwargs=copy.deepcopy(lm_kwargs), device="cpu", dtype=torch.float32)


def build_moshi_checkpoint(root: Path, seed: int = 0, fused: bool = True) -> MoshiCheckpoint:
    """A tiny random moshi LM + Mimi saved like `kyutai/tts-1.6b-en_fr` (plus a mimi_config file)."""
    config = copy.deepcopy(TINY_LM_CONFIG)
    lm = _start_checkpoint(root, config, seed)
    state = {}
    for key, value in lm.state_dict().items():
        value = torch.randn_like(value) * 0.5 if "alpha" not in key else value
        state[key] = value.float() if key.startswith("condition_provider.") else value.to(torch.bfloat16)
    save_file(_fused_names(state) if fused else state, root / config["moshi_name"])

    save_random_mimi(root / config["mimi_name"], seed, TINY_MIMI_CONFIG.to_dict())

    voices_dir = root / "voices"
    ckpt = MoshiCheckpoint(root, config, voices_dir)
    dim = config["conditioners"]["speaker_wavs"]["tensor"]["dim"]
    for i, name in enumerate(VOICES):
        path = ckpt.voice_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        emb = torch.randn(1, dim, 125, generator=torch.Generator().manual_seed(100 + i))
        meta = {"sig": str(config["model_id"]["sig"]), "epoch": str(config["model_id"]["epoch"])}
        save_file({"speaker_wavs": emb}, path, metadata=meta)
    return ckpt


_NON_LM_KEYS = {
    "moshi_name",
    "mimi_name",
    "mimi_config_name",
    "tokenizer_name",
    "lora_name",
    "model_type",
    "lm_gen_config",
    "tts_config",
    "stt_config",
    "model_id",
}


# ----------------------------------------------------------------------------------------------
# The 0.75B layout (`kyutai/tts-0.75b-en-public`): voices are audio prefixes, real CFG


def prefix_model_config() -> dict[str, Any]:
    """TINY_LM_CONFIG reshaped like the published 0.75B config.json: n_q = dep_q = 16, 5 text
    outputs, no conditioners (no speaker cross-attention, no CFG table), schedule 0..7 then 8 x 8."""
    config = copy.deepcopy(TINY_LM_CONFIG)
    config.update(
        n_q=16,
        dep_q=16,
        delays=[0, 0] + [2] * 15,
        text_card_out=5,
        depformer_weights_per_step_schedule=list(range(8)) + [8] * 8,
        cross_attention=False,
        conditioners={},
        fuser={
            "cross_attention_pos_emb": False,
            "cross_attention_pos_emb_scale": 1,
            "sum": [],
            "prepend": [],
            "cross": [],
        },
        model_id={"sig": "d6ef30c7", "epoch": 1000},
        moshi_name="dsm_tts_d6ef30c7@1000.safetensors",
    )
    return config


def write_prompt_wav(path: Path, seconds: float, seed: int = 0, sample_rate: int = 24000) -> Path:
    """A speech-like test prompt: a few gliding tones with noise bursts, float32 PCM in a WAV file."""
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.1 * t) ** 2
    pcm = 0.2 * voiced * envelope + 0.02 * rng.standard_normal(t.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), pcm.astype(np.float32), sample_rate, subtype="FLOAT")
    return path


def build_moshi_prefix_checkpoint(root: Path, seed: int = 0) -> MoshiCheckpoint:
    """A tiny random moshi LM + Mimi in the 0.75B layout (config.json, dsm_tts_<sig>@<epoch>, Mimi,
    tokenizer), with a voices/ directory of prompt WAVs (the layout of kyutai/tts-voices' .wav files)."""
    config = prefix_model_config()
    lm = _start_checkpoint(root, config, seed)
    state = {k: (torch.randn_like(v) * 0.5 if "alpha" not in k else v).to(torch.bfloat16)
             for k, v in lm.state_dict().items()}  # fmt: skip
    save_file(_fused_names(state), root / config["moshi_name"])
    save_random_mimi(root / config["mimi_name"], seed, TINY_MIMI_CONFIG.to_dict())
    voices_dir = root / "voices"
    for i, name in enumerate(VOICES):
        write_prompt_wav(voices_dir / name, 1.2 + 0.2 * i, seed=seed + i)
    return MoshiCheckpoint(root, config, voices_dir)


def save_random_mimi(path: Path, seed: int, config: dict[str, Any] | None, scale: float = 0.1) -> None:
    """A random moshi Mimi saved under the checkpoint's names (`config` None: the released shape)."""
    mimi = loaders.get_mimi(None, config, num_codebooks=32)
    mimi_state = {}
    gen = torch.Generator().manual_seed(seed + 1)
    for key, value in mimi.state_dict().items():
        if key.endswith("_initialized"):
            value = torch.ones_like(value)
        elif key.endswith("cluster_usage"):
            value = torch.rand(value.shape, generator=gen) + 0.5
        elif value.is_floating_point():
            value = torch.randn(value.shape, generator=gen) * scale
        mimi_state[key] = value.float().contiguous()
    save_file(_fused_names(mimi_state), path)


class CounterNoise:
    """moshi's own `sample_token` (its law: temperature, top-k, exponential race) drawing our engine's
    counter-based noise instead of torch's RNG: the draw of (seed, step, stream, vocabulary entry), so
    a seeded engine session and this moshi run must pick the same tokens. Install with
    ``monkeypatch.setattr(moshi.models.lm, "sample_token", CounterNoise(seed, text_vocab))``.

    Streams are counted as the engine keys them: each step samples the text (stream 0), then the
    depformer codebooks in order (streams 1..), when it runs."""

    def __init__(self, seed: int, text_vocab: int) -> None:
        self.seed = seed
        self.text_vocab = text_vocab
        self.step = -1
        self.stream = 0

    def __call__(self, logits: torch.Tensor, use_sampling: bool = False, temp: float = 1.0,
                 top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:  # fmt: skip
        import types

        from moshi.utils import sampling as ref

        from kyutai_tts_plugin.sampling import exponential_noise, stream_keys, to_seed

        vocab = logits.shape[-1]
        if vocab == self.text_vocab:
            self.step, self.stream = self.step + 1, 0
        else:
            self.stream += 1
        assert logits.shape[0] == 1, "one batch item: its noise is keyed by its own step"
        keys = stream_keys(
            torch.tensor([to_seed(self.seed)]), torch.tensor([self.step]), torch.tensor([self.stream])
        )
        noise = exponential_noise(keys[:, 0], torch.arange(vocab)[None])[0]  # [vocab]
        captured: dict[str, torch.Tensor] = {}

        class Shim(types.SimpleNamespace):
            def __getattr__(self, name: str) -> Any:
                return getattr(torch, name)

            def topk(self, probs: torch.Tensor, k: int, dim: int = -1) -> Any:
                values, indices = torch.topk(probs, k, dim=dim)
                captured["indices"] = indices
                return values, indices

            def empty_like(self, x: torch.Tensor) -> Any:
                idx = captured.get("indices")
                drawn = noise.expand(x.shape) if idx is None else noise[idx].reshape(x.shape)
                return types.SimpleNamespace(exponential_=lambda *a, **kw: drawn.clone())

        real = ref.torch
        ref.torch = Shim()  # type: ignore[assignment]
        try:
            return ref.sample_token(logits, use_sampling, temp, top_k, top_p)
        finally:
            ref.torch = real
