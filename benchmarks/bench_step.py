"""Milliseconds per step of the real-size model (random weights), ours and moshi's `LMGen` side by side.

Both engines share the same weight values (ours loads moshi's state dict), run in one process, one
after the other for each configuration, so the ratio is measured under the same machine load.

    python benchmarks/bench_step.py --batch 1 8 --n-q 32 8 --steps 6 --dtype float32

moshi (the reference, test-only dependency) must be installed: `pip install --no-deps moshi==0.2.13`.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kyutai_tts_plugin.configs import REAL_LM_CONFIG  # noqa: E402
from kyutai_tts_plugin.generator import Generator, SlotSettings  # noqa: E402
from kyutai_tts_plugin.lm import LMModel, LMShape, load_lm  # noqa: E402
from kyutai_tts_plugin.mimi import MimiModel  # noqa: E402


def real_config() -> dict:
    return copy.deepcopy(REAL_LM_CONFIG)


def build(dtype: torch.dtype):
    from moshi.models import loaders

    t0 = time.perf_counter()
    ref = loaders.get_moshi_lm(None, lm_kwargs=real_config(), device="cpu", dtype=dtype)
    with torch.device("meta"):
        ours = LMModel(LMShape.from_config(real_config()))
    ours = load_lm(ours, ref.state_dict(), "moshi", dtype, "cpu")
    print(f"built real-size models in {time.perf_counter() - t0:.0f} s", flush=True)
    return ref, ours


def moshi_steps(ref, batch: int, n_q: int):
    from moshi.conditioners import ConditionAttributes, TensorCondition
    from moshi.models.lm import LMGen

    ref.dep_q = n_q
    voice = torch.randn(1, 5 * 125, 512)
    mask = torch.zeros(1, 5 * 125, dtype=torch.bool)
    mask[:, :125] = True
    attrs = ConditionAttributes(
        text={"control": "ok", "cfg": "2.0"}, tensor={"speaker_wavs": TensorCondition(voice, mask)}
    )
    cond = ref.condition_provider.prepare_and_provide([attrs] * batch)
    gen = LMGen(ref, temp=0.6, temp_text=0.6, condition_tensors=cond)
    inp = torch.full((batch, ref.n_q - n_q, 1), -1, dtype=torch.long)
    try:
        with gen.streaming(batch), torch.no_grad():
            while True:
                t0 = time.perf_counter()
                gen.step(inp)
                yield time.perf_counter() - t0
    finally:
        ref.dep_q = ref.n_q


def our_steps(ours: LMModel, mimi: MimiModel, batch: int, n_q: int, compile: bool):
    """The engine's own device step (`Generator`), every slot stepping, no Mimi decode (moshi's
    `LMGen.step` does not decode either)."""
    gen = Generator(ours, mimi, batch, torch.device("cpu"), delay_steps=16, compile=compile)
    kv = ours.cross_kv(ours.speaker_memory([torch.randn(1, 512, 125)], 5))
    cond = ours.condition_sum(2.0)
    for row in range(batch):
        gen.join(row, SlotSettings(0.6, 250, 0.6, 25, n_q, 0.0, seed=row), cond, kv)
    while True:
        t0 = time.perf_counter()
        sampled = gen.text_step(batch)
        gen.audio_step(sampled, n_q, decode=False)
        yield time.perf_counter() - t0


def alternate(
    ref, ours: LMModel, mimi: MimiModel, batch: int, n_q: int, steps: int, compile: bool
) -> tuple[float, float]:
    """Median ms/step of each engine, stepping them alternately so machine noise hits both alike."""
    m_it, o_it = moshi_steps(ref, batch, n_q), our_steps(ours, mimi, batch, n_q, compile)
    m, o = [], []
    for _ in range(steps + 2):
        m.append(next(m_it))
        o.append(next(o_it))
    m_it.close()
    return statistics.median(m[2:]) * 1000, statistics.median(o[2:]) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--n-q", type=int, nargs="+", default=[32, 8])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--quantize", choices=["int8"], default=None, help="our engine only (moshi has no such mode)"
    )
    ap.add_argument("--compile", action="store_true", help="our step with compile=True (torch.compile)")
    ap.add_argument("--out", default=None, help="append a markdown table to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    ref, ours = build(dtype)
    mimi = MimiModel().to(dtype=torch.float32)  # only its decoder state is allocated: nothing decodes
    if args.quantize:
        from kyutai_tts_plugin.lm import quantize_int8

        quantize_int8(ours)
    rows = []
    for batch in args.batch:
        for n_q in args.n_q:
            m, o = alternate(ref, ours, mimi, batch, n_q, args.steps, args.compile)
            rows.append((batch, n_q, o, m))
            print(
                f"batch {batch:3d} n_q {n_q:2d}: ours {o:8.1f} ms/step  moshi {m:8.1f} ms/step  "
                f"speed-up x{m / o:.2f}",
                flush=True,
            )
    table = [
        f"### Step time, real-size random weights, {args.dtype}"
        f"{', ours with int8 weights' if args.quantize else ''}"
        f"{', ours compiled (compile=True)' if args.compile else ''}, {date.today()}",
        "",
        f"Command: `python benchmarks/bench_step.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads. Median of {args.steps} steps "
        "after 2 warm-up steps; both engines in one process, same weights, stepped alternately.",
        "",
        "| batch | n_q | ours ms/step | moshi LMGen ms/step | moshi / ours |",
        "|---:|---:|---:|---:|---:|",
        *[f"| {b} | {q} | {o:.1f} | {m:.1f} | {m / o:.2f} |" for b, q, o, m in rows],
        "",
    ]
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
