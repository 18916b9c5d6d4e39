"""Finding and checking checkpoint files: config.json, LM, Mimi, tokenizer and voice embeddings.

A checkpoint is either a local directory (config.json plus the files it names) or a Hugging Face repo
id, fetched with `huggingface_hub` into its standard cache (``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``
honoured). Every problem becomes a `CheckpointError` naming the file and saying what to do.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shutil
import socket
import struct
import tempfile
import threading
import urllib.parse
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .errors import CheckpointError, VoiceNotFoundError

DEFAULT_MODEL_REPO = "kyutai/tts-1.6b-en_fr"
DEFAULT_VOICE_REPO = "kyutai/tts-voices"
DEFAULT_VOICE = "expresso/ex03-ex01_happy_001_channel1_334s.wav"
FRAME_RATE = 12.5  # Mimi frames per second

# moshi's defaults for the file names when config.json does not give them (`moshi/models/loaders.py`).
_DEFAULT_LM_NAME = "model.safetensors"
_DEFAULT_MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
_DEFAULT_TOKENIZER_NAME = "tokenizer_spm_32k_3.model"

_NORMS = ("layer_norm", "layer_norm_f32", "rms_norm", "rms_norm_f32")
_GATINGS = (
    "none",
    "sigmoid",
    "tanh",
    "relu",
    "leaky_relu",
    "elu",
    "gelu",
    "silu",
    "mish",
    "softsign",
    "identity",
)
_POS_EMBS = ("sin", "rope", "sin_rope", "none", "rope_concat")
_CONDITIONER_TYPES = ("lut", "tensor")

_AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg")  # voices of a model that takes audio prompts
_ANY_VOICE_SUFFIX = re.compile(r"(.+)\.[0-9A-Za-z]+@\d+\.safetensors")
_REQUIRED = object()  # marks a config key without a default


def _config_help(source: str) -> str:
    return (
        f"{source} must be the config.json of a Kyutai DSM-TTS checkpoint such as {DEFAULT_MODEL_REPO}: "
        "re-download it, or fix the key."
    )


class _Reader:
    """Typed access to one JSON object, raising CheckpointError that names the file and key."""

    def __init__(self, data: dict[str, Any], source: str, prefix: str = "") -> None:
        self.data, self.source, self.prefix = data, source, prefix

    def fail(self, key: str, problem: str) -> CheckpointError:
        return CheckpointError(
            f"{self.source}: key '{self.prefix}{key}' {problem}. {_config_help(self.source)}"
        )

    def get(self, key: str, kind: str, default: Any = _REQUIRED) -> Any:
        if key not in self.data:
            if default is _REQUIRED:
                raise self.fail(key, "is missing")
            return default
        value = self.data[key]
        if value is None and kind.endswith("?"):
            return None
        kind = kind.rstrip("?")
        ok = {
            # bool is an int in Python; a `true` where a number belongs is a mistake.
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
            "dict": isinstance(value, dict),
            "int_list": isinstance(value, list)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
            "str_list": isinstance(value, list) and all(isinstance(v, str) for v in value),
            "str_or_int": isinstance(value, (str, int)) and not isinstance(value, bool),
        }[kind]
        if not ok:
            raise self.fail(key, f"has the wrong type (expected {kind.replace('_', ' ')}, got {value!r})")
        return float(value) if kind == "float" else value

    def sub(self, key: str, default: Any = _REQUIRED) -> _Reader:
        value = self.get(key, "dict", default)
        return _Reader(value if value is not None else {}, self.source, f"{self.prefix}{key}.")

    def choice(self, key: str, choices: tuple[str, ...], default: Any = _REQUIRED) -> str:
        value = self.get(key, "str", default)
        if value not in choices:
            raise self.fail(key, f"is {value!r}, expected one of {', '.join(choices)}")
        return value


@dataclass(frozen=True)
class TTSConfig:
    """config.json of a DSM-TTS checkpoint, typed. Defaults are moshi's where moshi has one."""

    # LM core
    card: int
    n_q: int
    dep_q: int
    delays: tuple[int, ...]
    dim: int
    text_card: int
    num_heads: int
    num_layers: int
    text_card_out: int | None = None
    existing_text_padding_id: int = 3
    hidden_scale: float = 4.0
    causal: bool = True
    layer_scale: float | None = None
    context: int | None = None
    max_period: float = 10000.0
    gating: str = "none"
    norm: str = "layer_norm"
    positional_embedding: str = "sin"
    cross_attention: bool = False
    demux_second_stream: bool = False
    # Depformer (None: inherit the backbone's value, as moshi does)
    depformer_dim: int = 256
    depformer_num_heads: int | None = None
    depformer_num_layers: int | None = None
    depformer_dim_feedforward: int | None = None
    depformer_multi_linear: bool = False
    depformer_pos_emb: str = "sin"
    depformer_weights_per_step: bool = False
    depformer_low_rank_embeddings: int | None = None
    depformer_weights_per_step_schedule: tuple[int, ...] | None = None
    # Conditioning
    conditioners: dict[str, Any] = field(default_factory=dict)
    fuser: dict[str, Any] | None = None
    # TTS
    audio_delay: float = 0.0
    second_stream_ahead: int = 0
    model_sig: str = ""
    model_epoch: str = ""
    model_type: str = "moshi"
    lm_gen_config: dict[str, Any] = field(default_factory=dict)
    # Files
    moshi_name: str = _DEFAULT_LM_NAME
    mimi_name: str = _DEFAULT_MIMI_NAME
    tokenizer_name: str = _DEFAULT_TOKENIZER_NAME
    mimi_config_name: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> TTSConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise CheckpointError(f"{path}: not found; a checkpoint directory must hold config.json.") from e
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e}); re-download the checkpoint.") from e
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: expected a JSON object; re-download the checkpoint.")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> TTSConfig:
        r = _Reader(d, source)
        n_q, dep_q = r.get("n_q", "int"), r.get("dep_q", "int")
        if n_q < 1:
            raise r.fail("n_q", f"is {n_q}, expected at least 1")
        if not 0 <= dep_q <= n_q:
            raise r.fail("dep_q", f"is {dep_q}, expected 0..n_q ({n_q})")
        delays = r.get("delays", "int_list")
        if len(delays) != n_q + 1:
            raise r.fail("delays", f"has {len(delays)} entries, expected n_q + 1 = {n_q + 1}")
        if min(delays) < 0:
            raise r.fail("delays", "has a negative entry")
        dim, num_heads = r.get("dim", "int"), r.get("num_heads", "int")
        if num_heads < 1 or dim % num_heads:
            raise r.fail("num_heads", f"is {num_heads}, which does not divide dim = {dim}")
        text_card = r.get("text_card", "int")
        if text_card <= 3:
            raise r.fail("text_card", f"is {text_card}, expected more than the 4 control tokens")
        dep_dim = r.get("depformer_dim", "int", 256)
        dep_heads = r.get("depformer_num_heads", "int?", None)
        if dep_heads is not None and (dep_heads < 1 or dep_dim % dep_heads):
            raise r.fail("depformer_num_heads", f"is {dep_heads}, which does not divide depformer_dim")
        schedule = r.get("depformer_weights_per_step_schedule", "int_list?", None)
        if schedule is not None and len(schedule) != dep_q:
            raise r.fail(
                "depformer_weights_per_step_schedule",
                f"has {len(schedule)} entries, expected dep_q = {dep_q}",
            )
        conditioners = r.get("conditioners", "dict", {})
        _check_conditioners(r.sub("conditioners", {}), conditioners)
        fuser = r.get("fuser", "dict?", None)
        if fuser is not None:
            fr = r.sub("fuser")
            for method in ("sum", "cross", "prepend"):
                for name in fr.get(method, "str_list", []):
                    if name not in conditioners:
                        raise fr.fail(method, f"names conditioner '{name}', which 'conditioners' lacks")
        tts = r.sub("tts_config")
        audio_delay = tts.get("audio_delay", "float")
        if audio_delay < 0:
            raise tts.fail("audio_delay", f"is {audio_delay}, expected >= 0")
        model_id = r.sub("model_id")
        model_type = r.get("model_type", "str", "moshi")
        if model_type != "tts":
            raise r.fail(
                "model_type", f"is {model_type!r}, but this engine only runs text-to-speech ('tts') models"
            )
        config = cls(
            card=r.get("card", "int"),
            n_q=n_q,
            dep_q=dep_q,
            delays=tuple(delays),
            dim=dim,
            text_card=text_card,
            num_heads=num_heads,
            num_layers=r.get("num_layers", "int"),
            text_card_out=r.get("text_card_out", "int?", None),
            existing_text_padding_id=r.get("existing_text_padding_id", "int", 3),
            hidden_scale=r.get("hidden_scale", "float", 4.0),
            causal=r.get("causal", "bool", True),
            layer_scale=r.get("layer_scale", "float?", None),
            context=r.get("context", "int?", None),
            max_period=r.get("max_period", "float", 10000.0),
            gating=r.choice("gating", _GATINGS, "none"),
            norm=r.choice("norm", _NORMS, "layer_norm"),
            positional_embedding=r.choice("positional_embedding", _POS_EMBS, "sin"),
            cross_attention=r.get("cross_attention", "bool", False),
            demux_second_stream=r.get("demux_second_stream", "bool", False),
            depformer_dim=dep_dim,
            depformer_num_heads=dep_heads,
            depformer_num_layers=r.get("depformer_num_layers", "int?", None),
            depformer_dim_feedforward=r.get("depformer_dim_feedforward", "int?", None),
            depformer_multi_linear=r.get("depformer_multi_linear", "bool", False),
            depformer_pos_emb=r.choice("depformer_pos_emb", _POS_EMBS, "sin"),
            depformer_weights_per_step=r.get("depformer_weights_per_step", "bool", False),
            depformer_low_rank_embeddings=r.get("depformer_low_rank_embeddings", "int?", None),
            depformer_weights_per_step_schedule=None if schedule is None else tuple(schedule),
            conditioners=conditioners,
            fuser=fuser,
            audio_delay=audio_delay,
            second_stream_ahead=tts.get("second_stream_ahead", "int", 0),
            model_sig=str(model_id.get("sig", "str_or_int")),
            model_epoch=str(model_id.get("epoch", "str_or_int")),
            model_type=model_type,
            lm_gen_config=r.get("lm_gen_config", "dict", {}),
            moshi_name=r.get("moshi_name", "str", _DEFAULT_LM_NAME),
            mimi_name=r.get("mimi_name", "str", _DEFAULT_MIMI_NAME),
            tokenizer_name=r.get("tokenizer_name", "str", _DEFAULT_TOKENIZER_NAME),
            mimi_config_name=r.get("mimi_config_name", "str?", None),
            raw=d,
        )
        return config

    @property
    def voice_suffix(self) -> str:
        """What follows a voice name in its file name, e.g. ``.1e68beda@240.safetensors``; empty for a
        model whose voices are audio prompts (the voice file is the audio itself, as in moshi)."""
        if self.voice_kind == "prompt":
            return ""
        return f".{self.model_sig}@{self.model_epoch}.safetensors"

    @property
    def voice_kind(self) -> str:
        """"embedding": voices condition the model as speaker embeddings (a `speaker_wavs`
        conditioner, the 1.6B model); "prompt": the voice is an audio prefix (the 0.75B model)."""
        return "embedding" if "speaker_wavs" in self.conditioners else "prompt"

    @property
    def delay_steps(self) -> int:
        """Text-to-audio delay in frames (16 for the released model)."""
        return int(self.audio_delay * FRAME_RATE)

    @property
    def cfg_values(self) -> tuple[float, ...]:
        """The CFG coefficients the model was distilled for (empty without a `cfg` conditioner)."""
        cfg = self.conditioners.get("cfg")
        if not cfg:
            return ()
        return tuple(float(v) for v in cfg["lut"]["possible_values"])

    @property
    def depformer_schedule(self) -> tuple[int, ...]:
        """Which depformer weight set serves each codebook (as moshi derives it)."""
        if self.depformer_weights_per_step_schedule is not None:
            return self.depformer_weights_per_step_schedule
        if self.depformer_weights_per_step:
            return tuple(range(self.dep_q))
        return (0,) * self.dep_q

    @property
    def speaker_dim(self) -> int | None:
        """Channels of a voice embedding (`speaker_wavs`), None for a model without voices."""
        spk = self.conditioners.get("speaker_wavs")
        return int(spk["tensor"]["dim"]) if spk and spk.get("type") == "tensor" else None

    @property
    def has_speaker_cross_attention(self) -> bool:
        """Whether voices condition the model through cross-attention (the 1.6B model does)."""
        cross = (self.fuser or {}).get("cross", [])
        return self.cross_attention and "speaker_wavs" in cross and self.speaker_dim is not None


def _check_conditioners(r: _Reader, conditioners: dict[str, Any]) -> None:
    for name in conditioners:
        c = r.sub(name)
        kind = c.choice("type", _CONDITIONER_TYPES)
        params = c.sub(kind)
        if kind == "tensor":
            if params.get("dim", "int") < 1:
                raise params.fail("dim", "must be positive")
            continue
        values = params.get("possible_values", "str_list")
        n_bins = params.get("n_bins", "int")
        params.get("dim", "int")
        if len(values) != n_bins:
            raise params.fail("possible_values", f"has {len(values)} entries but n_bins is {n_bins}")
        if name == "cfg":
            try:
                for v in values:
                    float(v)
            except ValueError as e:
                raise params.fail("possible_values", f"has a value that is not a number ({e})") from e


@dataclass
class CheckpointFiles:
    """Local paths of everything a checkpoint is made of."""

    root: Path | None  # the directory holding config.json (a local dir or an HF cache snapshot)
    config: TTSConfig
    lm_path: Path
    mimi_path: Path
    tokenizer_path: Path
    mimi_config: dict[str, Any] | None  # from `mimi_config_name`; None: the standard Mimi


# -- Hugging Face -------------------------------------------------------------------------------


def _offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; read it again so a later change counts.
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return hf_constants.HF_HUB_OFFLINE or value.upper() in ("1", "ON", "YES", "TRUE")


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_HUB_PROBE_TIMEOUT_S = 3.0
_hub_seen_reachable = False


def _hub_unreachable() -> bool:
    """True when the Hub's host cannot even be connected to (no DNS, no route, firewalled).

    huggingface_hub retries a failed request for about half a minute before giving up; one quick
    connection attempt first makes a machine without network fail at once with the right advice.
    Behind a proxy a direct connection proves nothing, so the probe is skipped there.
    """
    global _hub_seen_reachable
    if _hub_seen_reachable or any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return False
    url = urllib.parse.urlsplit(hf_constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=_HUB_PROBE_TIMEOUT_S):
            _hub_seen_reachable = True
            return False
    except OSError:
        return True


def _local_only() -> bool:
    """Use only the local cache: offline by choice (HF_HUB_OFFLINE) or by necessity."""
    return _offline() or _hub_unreachable()


def _unreachable_reason(missing: str = "the file is not", with_cache: bool = False) -> str:
    cache = f" ({_cache_dir()})" if with_cache else ""
    if _offline():
        return f"HF_HUB_OFFLINE is set and {missing} in the local cache{cache}"
    return (
        f"the Hub ({hf_constants.ENDPOINT}) cannot be reached from this machine and {missing} in the "
        f"local cache{cache}; set HF_HUB_OFFLINE=1 to use only the cache without trying the Hub"
    )


def _cache_dir() -> str:
    return os.path.expanduser(os.environ.get("HF_HUB_CACHE") or hf_constants.HF_HUB_CACHE)


def _download_help(repo: str) -> str:
    return (
        f"On a machine with internet access run `hf download {repo}` (older huggingface_hub: "
        f"`huggingface-cli download {repo}`) and copy the Hugging Face cache ({_cache_dir()}), or pass "
        'a local directory, model="/path/to/dir", holding config.json and the LM, Mimi and tokenizer files '
        "it names."
    )


def _hf_file(repo: str, filename: str, revision: str | None, what: str) -> Path:
    """Download (or find in the cache) one file of a Hugging Face repo."""
    where = f"'{filename}' ({what}) of Hugging Face repo '{repo}'" + (
        f" at revision {revision}" if revision else ""
    )
    try:
        return Path(
            hf_hub_download(
                repo, filename, revision=revision, cache_dir=_cache_dir(), local_files_only=_local_only()
            )
        )
    except GatedRepoError as e:
        raise CheckpointError(f"Cannot get {where}: the repo is gated; log in with `hf auth login`.") from e
    except RepositoryNotFoundError as e:
        raise CheckpointError(
            f"Cannot get {where}: no such repo on the Hub "
            "(if you meant a local directory, it does not exist)."
        ) from e
    except RevisionNotFoundError as e:
        raise CheckpointError(f"Cannot get {where}: the revision does not exist.") from e
    except LocalEntryNotFoundError as e:
        raise CheckpointError(f"Cannot get {where}: {_unreachable_reason()}. {_download_help(repo)}") from e
    except EntryNotFoundError as e:
        raise CheckpointError(f"Cannot get {where}: the repo has no such file.") from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        # ValueError: a malformed repo id (HFValidationError).
        raise CheckpointError(f"Cannot get {where}: {e}. {_download_help(repo)}") from e


def _local_dir(source: str | os.PathLike[str], what: str) -> Path | None:
    """The directory `source` names, None if it is a Hugging Face repo id."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = os.fspath(source)
    # "owner/name" is a repo id; anything else path-like must exist.
    if (
        isinstance(source, os.PathLike)
        or text.startswith((".", "/", "~"))
        or text.count("/") > 1
        or "\\" in text
    ):
        raise CheckpointError(
            f"{text}: no such directory; pass an existing {what} directory or a Hugging Face repo id "
            f"such as '{DEFAULT_MODEL_REPO if what == 'checkpoint' else DEFAULT_VOICE_REPO}'."
        )
    return None


# -- checkpoints --------------------------------------------------------------------------------


def resolve_checkpoint(
    model: str | os.PathLike[str] = DEFAULT_MODEL_REPO, revision: str | None = None
) -> CheckpointFiles:
    """Find every file of a checkpoint (local directory or Hugging Face repo id) and check them."""
    local = _local_dir(model, "checkpoint")
    if local is not None:

        def get(name: str, what: str) -> Path:
            path = local / name
            if not path.is_file():
                raise CheckpointError(
                    f"{path}: missing; config.json names '{name}' as the {what}. Copy it into {local} "
                    f"(it comes with the checkpoint, e.g. `hf download {DEFAULT_MODEL_REPO}`)."
                )
            return path

    else:
        repo = os.fspath(model)

        def get(name: str, what: str) -> Path:
            return _hf_file(repo, name, revision, what)

    config_path = get("config.json", "model configuration")
    config = TTSConfig.from_json(config_path)
    tokenizer_path = get(config.tokenizer_name, "text tokenizer")
    mimi_config = None
    if config.mimi_config_name is not None:
        mimi_config_path = get(config.mimi_config_name, "Mimi configuration")
        try:
            mimi_config = json.loads(mimi_config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{mimi_config_path}: not valid JSON ({e}); re-download it.") from e
        if not isinstance(mimi_config, dict):
            raise CheckpointError(f"{mimi_config_path}: expected a JSON object; re-download it.")
    mimi_path = get(config.mimi_name, "Mimi codec weights")
    lm_path = get(config.moshi_name, "language model weights")
    for path in (mimi_path, lm_path):
        check_safetensors(path)
    return CheckpointFiles(config_path.parent, config, lm_path, mimi_path, tokenizer_path, mimi_config)


def load_config(model: str | os.PathLike[str] = DEFAULT_MODEL_REPO, revision: str | None = None) -> TTSConfig:
    """Only config.json of a checkpoint (local directory or Hugging Face repo id), e.g. to list voices."""
    local = _local_dir(model, "checkpoint")
    if local is not None:
        return TTSConfig.from_json(local / "config.json")
    return TTSConfig.from_json(_hf_file(os.fspath(model), "config.json", revision, "model configuration"))


def check_safetensors(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a safetensors header and check that the file is as long as it says; return the header."""
    path = Path(path)
    redo = "re-download it (a download was probably interrupted)"
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated ({size} bytes, not even a header); {redo}.")
            (header_len,) = struct.unpack("<Q", head)
            if 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: truncated or not a safetensors file (header of {header_len} bytes, file of "
                    f"{size}); {redo}."
                )
            header = json.loads(f.read(header_len))
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: not found.") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e}); {redo}.") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e}).") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header; {redo}.")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header (tensor '{name}'); {redo}.") from e
    expected = 8 + header_len + end
    if size < expected:
        raise CheckpointError(f"{path}: truncated: {size} bytes, its header describes {expected}; {redo}.")
    return header


def load_safetensors(path: str | os.PathLike[str], device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; CheckpointError naming the file if it is truncated or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors(path)
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e}); re-download it.") from e


# -- voices -------------------------------------------------------------------------------------


class VoiceLibrary:
    """Precomputed voice embeddings: a local directory or a Hugging Face repo (`kyutai/tts-voices`).

    A voice is named by its path in the repo without the model suffix, e.g.
    ``expresso/ex03-ex01_happy_001_channel1_334s.wav`` for the file
    ``expresso/ex03-ex01_happy_001_channel1_334s.wav.1e68beda@240.safetensors``. With
    ``suffix=None`` the library only lists, the voices made for any model (no model needed). With
    ``suffix=""`` (a model whose voices are audio prompts) the voices are the repo's audio files
    themselves, named by their path (``expresso/...334s.wav``).

    Embeddings that arrive at run time (moshi-server's ``Voice`` message) are registered with
    `register_embedding`, which names them by content; `resolve` then finds them like any voice file.
    """

    # Registered embeddings kept at most (least recently used dropped first): each is a small file, and
    # a client may send a new one per connection.
    max_registered = 64
    REGISTERED_PREFIX = "custom:"

    def __init__(
        self,
        source: str | os.PathLike[str] = DEFAULT_VOICE_REPO,
        *,
        suffix: str | None,
        revision: str | None = None,
    ) -> None:
        self.source = os.fspath(source)
        self.suffix = suffix
        self.revision = revision
        self.directory = _local_dir(source, "voice")
        self._resolved: dict[str, Path] = {}
        self._listed: list[str] | None = None
        self._lock = threading.Lock()
        self._registered: OrderedDict[str, Path] = OrderedDict()
        self._registry_dir: Path | None = None

    def list(self) -> list[str]:
        """Every available voice name, sorted. Offline, a Hugging Face repo lists its cached voices."""
        if self.directory is not None:
            return self._names(p.relative_to(self.directory).as_posix() for p in self._files(self.directory))
        with self._lock:
            if self._listed is None:
                self._listed = self._list_hf()
            return list(self._listed)

    def resolve(self, name: str | os.PathLike[str]) -> Path:
        """Local path of a voice file: a voice name (with or without ".wav" and the model suffix) or
        the path of a local ``.safetensors`` file."""
        key = os.fspath(name)
        with self._lock:
            if key in self._registered:
                self._registered.move_to_end(key)
                return self._registered[key]
            if key in self._resolved:
                return self._resolved[key]
        path = self._resolve(key)
        with self._lock:
            self._resolved[key] = path
        return path

    def register_embedding(self, embedding: torch.Tensor) -> str:
        """Make a speaker embedding (float32 ``[1, dim, T]``, already validated by the caller) usable as a
        voice; returns its name (``custom:<content hash>``: the same embedding gets the same name, so the
        engine's per-voice caches are shared). The embedding is written to a private temporary file, so
        that every path that loads voice files (`resolve`, `load_voice_embedding`) works for it."""
        emb = embedding.detach().to("cpu", torch.float32).contiguous()
        digest = hashlib.sha256(repr(list(emb.shape)).encode() + emb.numpy().tobytes()).hexdigest()[:32]
        name = self.REGISTERED_PREFIX + digest
        with self._lock:
            if name in self._registered:
                self._registered.move_to_end(name)
                return name
            if self._registry_dir is None:
                self._registry_dir = Path(tempfile.mkdtemp(prefix="kyutai-tts-voices-"))
                # removed with the library (or at exit): the files only live as long as their names
                weakref.finalize(self, shutil.rmtree, self._registry_dir, ignore_errors=True)
            path = self._registry_dir / f"{digest}.safetensors"
        from safetensors.torch import save_file

        save_file({"speaker_wavs": emb}, str(path))
        with self._lock:
            self._registered[name] = path
            while len(self._registered) > self.max_registered:
                _, old = self._registered.popitem(last=False)
                old.unlink(missing_ok=True)
        return name

    # -- internals

    def _candidates(self, name: str) -> list[str]:
        if self.suffix is None:
            raise CheckpointError("this voice library only lists voices: give it the model's voice suffix")
        if self.suffix == "":
            return [name] if name.lower().endswith(_AUDIO_EXTENSIONS) else [name + ".wav", name]
        base = name[: -len(self.suffix)] if name.endswith(self.suffix) else name
        return [base] if base.endswith(".wav") else [base + ".wav", base]

    def _resolve(self, name: str) -> Path:
        if name.endswith(".safetensors"):
            local = Path(name).expanduser()
            if local.is_file():
                return local
        candidates = [c for c in self._candidates(name) if c]
        if self.directory is not None:
            for c in candidates:
                path = self.directory / (c + self.suffix)
                if path.is_file():
                    return path
        else:
            for c in candidates:
                path = self._hf_voice(c + self.suffix)
                if path is not None:
                    return path
        raise self._not_found(name)

    def _hf_voice(self, filename: str) -> Path | None:
        try:
            return Path(
                hf_hub_download(
                    self.source,
                    filename,
                    revision=self.revision,
                    cache_dir=_cache_dir(),
                    local_files_only=_local_only(),
                )
            )
        except LocalEntryNotFoundError as e:
            if _offline():
                return None  # not in the cache; the error message lists the cached voices
            raise CheckpointError(
                f"Cannot get voice file '{filename}' from Hugging Face repo '{self.source}': "
                f"{_unreachable_reason(with_cache=True)}. On a machine with internet access run "
                f"`hf download {self.source}` and copy the cache, or pass a local directory of voice "
                "files (voice_repo=...)."
            ) from e
        except EntryNotFoundError:  # the repo has no such file
            return None
        except (HfHubHTTPError, OSError, ValueError) as e:
            raise CheckpointError(
                f"Cannot get voice file '{filename}' from Hugging Face repo '{self.source}': {e}. "
                "Pass a local directory of voice files (voice_repo=...) to work without the Hub."
            ) from e

    def _not_found(self, name: str) -> VoiceNotFoundError:
        try:
            voices = self.list()
        except CheckpointError:
            voices = []
        query = self._candidates(name)[0]
        needle = Path(query).stem.lower()
        close = [v for v in voices if needle and needle in v.lower()]
        close += [v for v in difflib.get_close_matches(query, voices, n=5, cutoff=0.5) if v not in close]
        where = (
            f"voice directory {self.directory}" if self.directory else f"Hugging Face repo '{self.source}'"
        )
        if self.directory is None and _offline():
            where += " (offline: only voices already in the local cache are available)"
        hint = f" Close matches: {', '.join(close[:5])}." if close else ""
        return VoiceNotFoundError(
            f"Voice '{name}' not found in {where}.{hint} List the available voices with "
            f"engine.list_voices() or `kyutai-tts voices --voice-repo {self.source}`."
        )

    def _list_hf(self) -> list[str]:
        if not _local_only():
            try:
                files = HfApi().list_repo_files(self.source, revision=self.revision)
                return self._names(files)
            except (RepositoryNotFoundError, RevisionNotFoundError) as e:
                raise CheckpointError(f"Cannot list voices of Hugging Face repo '{self.source}': {e}") from e
            except (HfHubHTTPError, OSError):
                pass  # no network: fall back to what the cache holds
        snapshot = self._cached_snapshot()
        if snapshot is None:
            raise CheckpointError(
                f"Cannot list voices of Hugging Face repo '{self.source}': "
                f"{_unreachable_reason('nothing of it is', with_cache=True)}. On a machine with "
                f"internet access run `hf download {self.source}` and copy the cache, or pass a local "
                "directory of voice files (--voice-repo DIR, voice_repo=...)."
            )
        return self._names(p.relative_to(snapshot).as_posix() for p in self._files(snapshot))

    def _files(self, directory: Path) -> list[Path]:
        if self.suffix == "":
            return [p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in _AUDIO_EXTENSIONS]
        return [p for p in directory.rglob(f"*{self.suffix or '.safetensors'}") if p.is_file()]

    def _names(self, files: Iterable[str]) -> list[str]:
        """Voice names of the voice files among `files` (those of this model, or of any model)."""
        if self.suffix == "":
            return sorted({f for f in files if f.lower().endswith(_AUDIO_EXTENSIONS)})
        if self.suffix is not None:
            names = {f[: -len(self.suffix)] for f in files if f.endswith(self.suffix)}
        else:
            names = {m.group(1) for f in files if (m := _ANY_VOICE_SUFFIX.fullmatch(f))}
        return sorted(names)

    def _cached_snapshot(self) -> Path | None:
        repo_dir = Path(_cache_dir()) / ("models--" + self.source.replace("/", "--"))
        revision = self.revision or "main"
        if (repo_dir / "snapshots" / revision).is_dir():
            return repo_dir / "snapshots" / revision
        ref = repo_dir / "refs" / revision
        if ref.is_file():
            snapshot = repo_dir / "snapshots" / ref.read_text().strip()
            if snapshot.is_dir():
                return snapshot
        return None


def load_voice_embedding(path: str | os.PathLike[str], dim: int) -> torch.Tensor:
    """The `speaker_wavs` tensor of a voice file, as float32 [1, dim, T]."""
    tensors = load_safetensors(path)
    expected = f"[1, {dim}, T]"
    if "speaker_wavs" not in tensors:
        raise CheckpointError(
            f"{path}: no 'speaker_wavs' tensor (found: {', '.join(sorted(tensors)) or 'none'}); a voice file "
            f"holds 'speaker_wavs' of shape {expected}. Use a voice made for this model (kyutai/tts-voices)."
        )
    emb = tensors["speaker_wavs"]
    if not emb.is_floating_point():
        raise CheckpointError(f"{path}: 'speaker_wavs' has dtype {emb.dtype}, expected float32 {expected}.")
    if emb.dim() != 3 or emb.shape[0] != 1 or emb.shape[1] != dim or emb.shape[2] < 1:
        raise CheckpointError(
            f"{path}: 'speaker_wavs' has shape {list(emb.shape)}, expected {expected}: this voice was "
            "made for another model; use the voices of kyutai/tts-voices that match the checkpoint."
        )
    return emb.float()
