"""Where the model runs: the device and dtype names every entry point accepts, checked in one place.

The Python API, the CLI, the server and the adapters all go through `resolve_device` and
`resolve_dtype`, so the same names work everywhere and a device this machine does not have is a
one-line error that says what to do, before any weight is read.
"""

from __future__ import annotations

import torch

from .errors import InvalidInputError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_ALIASES = {
    "fp32": "float32",
    "f32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
}
DTYPE_NAMES = (*DTYPES, *DTYPE_ALIASES)  # what `--dtype` accepts


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name (``float32``, ``bfloat16``, ``float16`` or ``fp32``/``bf16``/``fp16``)."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise InvalidInputError(f"dtype {dtype} is not supported; use one of: {', '.join(DTYPES)}")
    name = str(dtype).strip().lower()
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise InvalidInputError(
            f"dtype {dtype!r} is not supported; use one of: {', '.join(DTYPE_NAMES)} "
            "(bfloat16 on a GPU, float32 or bfloat16 on a CPU)"
        )
    return DTYPES[name]


def resolve_device(device: str | torch.device) -> torch.device:
    """A device this machine has, or an `InvalidInputError` saying what to use instead."""
    text = str(device).strip().lower()
    if text == "gpu":
        text = "cuda"
    try:
        dev = torch.device(text)
    except RuntimeError as e:
        raise InvalidInputError(
            f"device {str(device)!r} is not a device name; use cpu, cuda or cuda:N (an NVIDIA GPU), or mps"
        ) from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = (
                "this torch build has no CUDA support"
                if torch.version.cuda is None
                else "no CUDA GPU is visible"
            )
            raise InvalidInputError(
                f"device {str(device)!r} is not available: {build} (torch {torch.__version__}). Use "
                "--device cpu (device='cpu'), or install a CUDA build of torch on a machine with an "
                "NVIDIA GPU."
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InvalidInputError(
                f"device {str(device)!r} is not available: this machine has {count} CUDA device(s), "
                f"cuda:0..cuda:{count - 1}"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise InvalidInputError(
                f"device {str(device)!r} is not available: MPS needs an Apple-silicon Mac; use --device cpu"
            )
    elif dev.type != "cpu":
        raise InvalidInputError(f"device {str(device)!r} is not supported; use cpu, cuda or cuda:N, or mps")
    return dev
