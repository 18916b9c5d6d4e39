"""One command for one NVIDIA GPU: parity, CUDA graph capture, speed next to moshi, first audio, memory.

    python benchmarks/gpu_check.py                          # CUDA, the whole check (< 8 min, H100-class)
    python benchmarks/gpu_check.py --device cpu --smoke     # CPU smoke test of every part (tiny model)
    python benchmarks/gpu_check.py --device cpu --batch 1 8 --steps 4 --compile both --parts speed

Parts (`--parts`, all by default):

* parity: the tiny test checkpoint, greedy, on `--device` in float32 (and with `compile=True`, which
  captures CUDA graphs on CUDA) against the CPU float32 engine: tokens equal, PCM close.
* speed: real-size random weights (`--dtype`, bfloat16 by default) saved once as a checkpoint in the
  real file layout under /tmp and loaded through `TTSEngine.from_pretrained`; ms per step of ours
  at each `--batch`, next to moshi's `LMGen` (the reference, with its own CUDA graphs) on the same
  weights; memory per session from `torch.cuda.max_memory_allocated`.
* latency: first audio for N sessions arriving at uniformly random times within `--window` seconds,
  each with its whole text ready (the DSM paper's Table 6 protocol), p50 and p95.

Ours is timed through the public API only: a step observer stamps each engine step, and a step counts
when every session of the batch generated audio in it. Ours includes the Mimi decode and the text
state machine; moshi's `LMGen.step` is the LM alone, so the comparison is conservative for us.
`--smoke` swaps the real-size model for the tiny one and shrinks every count, so that every line of
this file runs on a CPU in about two minutes. Figures go to benchmarks/RESULTS.md (`--out`) unless
`--smoke`. moshi (test-only dependency: `pip install --no-deps moshi==0.2.13`) must be installed.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# moshi compiles with torch.compile unless told not to (minutes of warm-up); its CUDA graphs, the
# mechanism its servers use, stay on unless NO_CUDA_GRAPH is set.
os.environ.setdefault("NO_TORCH_COMPILE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kyutai_tts_plugin.configs import REAL_CONFIG_JSON  # noqa: E402
from kyutai_tts_plugin.engine import EngineStep, TTSEngine  # noqa: E402
from kyutai_tts_plugin.mimi import TINY_MIMI_CONFIG  # noqa: E402
from kyutai_tts_plugin.testing import (  # noqa: E402
    TINY_LM_CONFIG,
    StepRecorder,
    make_test_checkpoint,
    train_test_tokenizer,
    write_test_voices,
)
from kyutai_tts_plugin.types import AudioChunk, SessionOptions  # noqa: E402

TEXT = (
    "the quick brown fox jumps over the lazy dog while seven bright stars shine above the quiet "
    "hills and people talk about music food travel and small things until the night is over "
) * 4
PARITY_TEXT = "hello world, this is a parity check of the streaming engine on another device."
VOICE = "bench.wav"
DELAY_STEPS = 16  # text-only steps before a session's first audio (1.28 s at 12.5 Hz)
MAX_DELAY = 2  # acoustic delay of the DSM checkpoints: audio comes 2 steps after the first audio step

# Targets of issue 10 (H100-class GPU, n_q 32).
TARGET_STEP_MS_B1 = 8.0
TARGET_P50_FIRST_AUDIO_MS = 60.0
TARGET_SESSIONS = 256
TARGET_P95_FIRST_AUDIO_MS = 300.0
TARGET_SPEEDUP_B64 = 3.0
REAL_TIME_STEP_MS = 80.0


@dataclass
class Report:
    args: argparse.Namespace
    lines: list[str] = field(default_factory=list)  # markdown for RESULTS.md
    checks: list[tuple[str, bool | None, str]] = field(default_factory=list)  # (what, passed, figure)
    moshi: dict[int, tuple[float, int]] = field(default_factory=dict)  # batch -> (ms/step, bytes)
    ours: dict[tuple[int, bool], tuple[float, int]] = field(default_factory=dict)  # (batch, compile) -> same
    latency: dict[int, tuple[float, float]] = field(default_factory=dict)  # sessions -> (p50, p95) ms
    skipped: list[int] = field(default_factory=list)  # sizes not measured for lack of time

    def say(self, text: str) -> None:
        print(text, flush=True)

    def check(self, what: str, passed: bool | None, figure: str) -> None:
        self.checks.append((what, passed, figure))
        verdict = "n/a " if passed is None else ("PASS" if passed else "FAIL")
        print(f"[{verdict}] {what}: {figure}", flush=True)


# ------------------------------------------------------------------------------------------------
# devices


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> int:
    """Release what is free and restart the peak counter; returns the bytes allocated now."""
    gc.collect()
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def machine_line(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    text = f"{cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        text = (
            f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, compute "
            f"capability {props.major}.{props.minor}; host {text}"
        )
    return text


# ------------------------------------------------------------------------------------------------
# engines through the public API


def open_engine(root: Path, device: torch.device, dtype: str, compile_: bool, **kwargs: Any) -> TTSEngine:
    """`TTSEngine.from_pretrained`, passing `compile=True` only when asked (older engines lack it)."""
    if compile_:
        kwargs["compile"] = True
    try:
        return TTSEngine.from_pretrained(
            root, voice_repo=root / "voices", default_voice=VOICE, device=str(device), dtype=dtype, **kwargs
        )
    except TypeError as e:
        if compile_ and "compile" in str(e):
            raise SystemExit(
                f"this engine has no compile=True ({e}); run with --compile off, or update the package"
            ) from e
        raise


def close_engine(engine: TTSEngine) -> None:
    engine.close()
    del engine
    gc.collect()


def greedy_run(engine: TTSEngine, text: str, n_q: int) -> tuple[list[Any], np.ndarray]:
    with StepRecorder(engine) as rec:
        session = engine.open_session(SessionOptions(n_q=n_q, temperature=0.0, voice=VOICE))
        session.push_text(text)
        session.flush()
        pcm = [ev.pcm for ev in session if isinstance(ev, AudioChunk)]
        return rec.tokens(session), np.concatenate(pcm)


def compile_modes(args: argparse.Namespace) -> list[bool]:
    return {"off": [False], "on": [True], "both": [False, True]}[args.compile]


# ------------------------------------------------------------------------------------------------
# part 1: parity on the device, and CUDA graph capture


def part_parity(report: Report, device: torch.device, workdir: Path) -> None:
    args = report.args
    root = make_test_checkpoint(workdir / "tiny-ours", voices=[VOICE])
    n_q = 32
    cpu = open_engine(root, torch.device("cpu"), "float32", False, max_sessions=1)
    try:
        ref_tokens, ref_pcm = greedy_run(cpu, PARITY_TEXT, n_q)
    finally:
        close_engine(cpu)
    report.say(f"parity: CPU float32 reference, {len(ref_tokens)} steps")
    rows = []
    for compiled in sorted({False, *([True] if args.compile != "off" or device.type == "cuda" else [])}):
        label = f"{device.type} float32{' compile=True' if compiled else ''}"
        t0 = time.perf_counter()
        try:
            engine = open_engine(root, device, "float32", compiled, max_sessions=1)
        except (SystemExit, Exception) as e:  # a missing compile=True fails this check, not the run
            report.check(f"{label}: the engine starts", False, str(e))
            continue
        try:
            tokens, pcm = greedy_run(engine, PARITY_TEXT, n_q)
            graph_note = count_graph_launches(engine, device) if compiled else ""
        finally:
            close_engine(engine)
        seconds = time.perf_counter() - t0
        same = tokens == ref_tokens
        diff = float(np.abs(pcm - ref_pcm).max()) if pcm.shape == ref_pcm.shape else float("inf")
        # CUDA convolutions may use TF32 (cuDNN's default), so the PCM is close, not bit-equal.
        close = diff <= args.pcm_tol
        rows.append((label, same, diff, seconds, graph_note))
        report.check(f"greedy parity, {label} vs CPU float32: tokens equal", same, f"{len(tokens)} steps")
        report.check(
            f"greedy parity, {label} vs CPU float32: PCM max diff <= {args.pcm_tol:g}", close, f"{diff:.2e}"
        )
        if compiled:
            what = "CUDA graph capture (compile=True) runs and gives the same tokens"
            report.check(
                what if device.type == "cuda" else "compile=True runs on CPU, same tokens",
                same,
                graph_note or "-",
            )
    report.lines += [
        "| engine | tokens equal to CPU float32 | PCM max abs diff | seconds (load, compile, run) "
        "| graph launches |",
        "|---|---|---:|---:|---|",
        *[
            f"| {lab} | {'yes' if s else 'NO'} | {d:.2e} | {sec:.1f} | {g or '-'} |"
            for lab, s, d, sec, g in rows
        ],
        "",
    ]


def count_graph_launches(engine: TTSEngine, device: torch.device) -> str:
    """CUDA graph launches and plain kernel launches per engine step, seen by the profiler."""
    if device.type != "cuda":
        return ""
    from torch.profiler import ProfilerActivity, profile

    steps = 0

    def count(_: EngineStep) -> None:
        nonlocal steps
        steps += 1

    try:
        remove = engine.add_step_observer(count)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            greedy_run(engine, "one more short run to profile", 32)
        remove()
        names = [e.name for e in prof.events()]
        graphs = sum(n == "cudaGraphLaunch" for n in names)
        kernels = sum(n in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC") for n in names)
        per = max(steps, 1)
        return f"{graphs / per:.1f} graph launches, {kernels / per:.0f} kernel launches per step"
    except Exception as e:  # the profiler is a diagnostic: its failure must not hide the figures
        return f"profiler failed: {e}"


# ------------------------------------------------------------------------------------------------
# the real-size checkpoint (random weights), shared by ours and moshi


def lm_and_mimi_configs(smoke: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    if smoke:
        return copy.deepcopy(TINY_LM_CONFIG), TINY_MIMI_CONFIG.to_dict()
    return copy.deepcopy(REAL_CONFIG_JSON), None


def build_checkpoint(
    root: Path, smoke: bool, dtype: torch.dtype, device: torch.device, report: Report
) -> tuple[Path, Any]:
    """moshi's LM with random weights on `device`, and the same weights saved in the real layout.

    The checkpoint is written once per (size, dtype) and reused: loading it is what `from_pretrained`
    does in production. Returns (checkpoint dir, moshi LM).
    """
    from moshi.models import loaders
    from safetensors.torch import save_file

    # The released files' attention names, and the config keys that are not LM arguments.
    from tests.moshi_oracle import _NON_LM_KEYS, _fused_names, save_random_mimi

    config, mimi_config = lm_and_mimi_configs(smoke)
    if mimi_config is not None:
        config["mimi_config_name"] = "mimi_config.json"
    lm_kwargs = {k: v for k, v in config.items() if k not in _NON_LM_KEYS}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    ref = loaders.get_moshi_lm(None, lm_kwargs=copy.deepcopy(lm_kwargs), device=device, dtype=dtype)
    ref.eval()
    report.say(f"moshi LM built on {device} in {time.perf_counter() - t0:.0f} s")
    marker = root / "complete.json"
    if marker.exists() and json.loads(marker.read_text()) == {"config": config, "dtype": str(dtype)}:
        report.say(f"reusing the checkpoint in {root}")
        # Same seed, same init: the moshi LM built above has the weights that were saved.
        return root, ref
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, value in ref.state_dict().items():
        keep_f32 = key.startswith(("condition_provider.", "fuser."))
        state[key] = value.detach().to("cpu", torch.float32 if keep_f32 else dtype).contiguous()
    save_file(_fused_names(state), str(root / config["moshi_name"]))
    del state
    save_random_mimi(root / config["mimi_name"], 0, mimi_config, scale=0.02)
    if mimi_config is not None:
        (root / config["mimi_config_name"]).write_text(json.dumps(mimi_config))
    train_test_tokenizer(root / config["tokenizer_name"])
    write_test_voices(root / "voices", config, voices=[VOICE])
    (root / "config.json").write_text(json.dumps(config, indent=2))
    marker.write_text(json.dumps({"config": config, "dtype": str(dtype)}))
    report.say(f"checkpoint written to {root} in {time.perf_counter() - t0:.0f} s")
    return root, ref


# ------------------------------------------------------------------------------------------------
# part 2: ms per step, ours and moshi LMGen, and memory per session


class StepClock:
    """Step observer: the time of every engine step in which all `batch` sessions made audio."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.full: list[float] = []  # durations of full steps (s)
        self._last: float | None = None
        self._cv = threading.Condition()

    def __call__(self, step: EngineStep) -> None:
        now = time.perf_counter()
        full = len(step.sessions) == self.batch and all(
            s.step >= DELAY_STEPS + MAX_DELAY for s in step.sessions
        )
        with self._cv:
            if full and self._last is not None:
                self.full.append(now - self._last)
            self._last = now
            self._cv.notify_all()

    def wait(self, n: int, timeout: float) -> None:
        with self._cv:
            if not self._cv.wait_for(lambda: len(self.full) >= n, timeout=timeout):
                raise RuntimeError(f"only {len(self.full)} full steps of {n} within {timeout:.0f} s")


def ours_ms_per_step(engine: TTSEngine, args: argparse.Namespace, batch: int) -> float:
    """Median ms per full step of ours with `batch` sessions speaking (seeded, temperature 0.6)."""
    clock = StepClock(batch)
    remove = engine.add_step_observer(clock)
    sessions = []
    try:
        for i in range(batch):
            s = engine.open_session(SessionOptions(n_q=args.n_q, temperature=0.6, seed=i, voice=VOICE))
            s.push_text(TEXT)
            s.flush()
            sessions.append(s)
        clock.wait(args.warmup + args.steps, timeout=args.step_timeout)
    finally:
        remove()
        for s in sessions:
            s.cancel()
    return statistics.median(clock.full[args.warmup : args.warmup + args.steps]) * 1000


def moshi_steps(ref: Any, device: torch.device, batch: int, n_q: int) -> Iterator[float]:
    """moshi's LMGen at `batch` (temperature 0.6, the cfg-distilled conditioning): s per step."""
    from moshi.conditioners import ConditionAttributes, TensorCondition
    from moshi.models.lm import LMGen

    ref.dep_q = n_q
    config = TINY_LM_CONFIG if ref.dim == TINY_LM_CONFIG["dim"] else REAL_CONFIG_JSON
    speaker_dim = int(config["conditioners"]["speaker_wavs"]["tensor"]["dim"])
    voice = torch.randn(1, 5 * 125, speaker_dim, device=device)
    mask = torch.zeros(1, 5 * 125, dtype=torch.bool, device=device)
    mask[:, :125] = True
    attrs = ConditionAttributes(
        text={"control": "ok", "cfg": "2.0"}, tensor={"speaker_wavs": TensorCondition(voice, mask)}
    )
    cond = ref.condition_provider.prepare_and_provide([attrs] * batch)
    gen = LMGen(ref, temp=0.6, temp_text=0.6, condition_tensors=cond)
    inp = torch.full((batch, ref.n_q - n_q, 1), -1, dtype=torch.long, device=device)
    try:
        with gen.streaming(batch), torch.no_grad():
            while True:
                sync(device)
                t0 = time.perf_counter()
                gen.step(inp)
                sync(device)
                yield time.perf_counter() - t0
    finally:
        ref.dep_q = ref.n_q


def moshi_ms_per_step(ref: Any, device: torch.device, args: argparse.Namespace, batch: int) -> float:
    it = moshi_steps(ref, device, batch, args.n_q)
    # moshi's first steps run eagerly, then it captures its CUDA graphs: skip them, and the delays.
    times = [next(it) for _ in range(args.warmup + MAX_DELAY + 2 + args.steps)]
    it.close()
    return statistics.median(times[-args.steps :]) * 1000


def part_engines(report: Report, device: torch.device, root: Path, ref: Any, started: float) -> None:
    """Speed (with moshi next to it) and first audio, one engine per size: `max_sessions` = size."""
    args = report.args
    modes = compile_modes(args)
    sizes = sorted(set(args.batch if "speed" in args.parts else []) | set(args.latency_sizes))
    for size in sizes:
        if args.budget and time.perf_counter() - started > args.budget:
            report.say(f"time budget ({args.budget:.0f} s) spent: sizes from {size} on are skipped")
            report.skipped.append(size)
            continue
        if size in args.batch and "speed" in args.parts:
            base = reset_peak(device)
            m_ms = moshi_ms_per_step(ref, device, args, size)
            report.moshi[size] = (m_ms, peak(device) - base)
            report.say(f"batch {size:4d}: moshi LMGen {m_ms:8.1f} ms/step")
        for compiled in modes:
            timed = size in args.batch and "speed" in args.parts
            latency = size in args.latency_sizes and compiled == modes[-1]
            if not (timed or latency):
                continue
            base = reset_peak(device)
            t0 = time.perf_counter()
            label = f"ours{' compile=True' if compiled else ''}"
            try:
                engine = open_engine(
                    root,
                    device,
                    args.dtype,
                    compiled,
                    max_sessions=size,
                    max_waiting=size,
                    num_threads=args.threads,
                )
            except SystemExit as e:  # no compile=True in this engine: the other figures still count
                report.check(f"{label}: the engine starts", False, str(e))
                continue
            report.say(f"{label}: engine for {size} sessions loaded in {time.perf_counter() - t0:.0f} s")
            try:
                if timed:
                    o_ms = ours_ms_per_step(engine, args, size)
                    report.ours[(size, compiled)] = (o_ms, peak(device) - base)
                    m_ms = report.moshi[size][0]
                    report.say(
                        f"batch {size:4d}: {label} {o_ms:8.1f} ms/step (moshi / ours x{m_ms / o_ms:.2f})"
                    )
                if latency:
                    lat = first_audio_ms(engine, args, size)
                    p50, p95 = float(np.percentile(lat, 50)), float(np.percentile(lat, 95))
                    report.latency[size] = (p50, p95)
                    report.say(
                        f"first audio, {size} sessions arriving within {args.window:g} s ({label}): "
                        f"p50 {p50:.0f} ms, p95 {p95:.0f} ms"
                    )
            finally:
                close_engine(engine)
    tables(report, device)


def tables(report: Report, device: torch.device) -> None:
    args = report.args
    modes = compile_modes(args)
    timed = [b for b in args.batch if b in report.moshi]

    def cell(b: int, c: bool) -> str:
        if (b, c) not in report.ours:
            return " - | - |"
        ms = report.ours[(b, c)][0]
        return f" {ms:.2f} | {report.moshi[b][0] / ms:.2f} |"

    if timed:
        head = "| batch | moshi LMGen ms/step |" + "".join(
            f" ours{' compile=True' if c else ''} ms/step | moshi / ours |" for c in modes
        )
        rows = [f"| {b} | {report.moshi[b][0]:.2f} |" + "".join(cell(b, c) for c in modes) for b in timed]
        report.lines += [
            f"Milliseconds per step, n_q {args.n_q}, temperature 0.6:",
            "",
            head,
            "|---:|---:|" + "---:|---:|" * len(modes),
            *rows,
            "",
        ]
    if device.type == "cuda" and len(timed) >= 2:
        lo, hi = min(timed), max(timed)
        modes = [c for c in modes if (lo, c) in report.ours and (hi, c) in report.ours]
        report.lines += [
            "| memory (peak allocated by the engine, CUDA) | ours | moshi LMGen |",
            "|---|---:|---:|",
        ]
        m_lo, m_hi = report.moshi[lo][1], report.moshi[hi][1]
        for c in modes:
            o_lo, o_hi = report.ours[(lo, c)][1], report.ours[(hi, c)][1]
            per_o, per_m = (o_hi - o_lo) / (hi - lo), (m_hi - m_lo) / (hi - lo)
            label = f"ours{' compile=True' if c else ''}"
            report.say(
                f"memory per session ({label}): {per_o / 2**20:.1f} MiB; moshi {per_m / 2**20:.1f} MiB"
            )
            report.lines += [
                f"| per session, from batch {lo} to {hi} (MiB), {label} "
                f"| {per_o / 2**20:.1f} | {per_m / 2**20:.1f} |",
                f"| added at batch {hi} (GiB; ours with its weights, moshi without), {label} "
                f"| {o_hi / 2**30:.2f} | {m_hi / 2**30:.2f} |",
            ]
        report.lines += [""]
    if report.latency:
        report.lines += [
            "First audio (ms from `open_session` with the whole text to the first 80 ms chunk), sessions "
            f"arriving at uniformly random times within {args.window:g} s, max_sessions = sessions"
            f"{', compile=True' if modes[-1] else ''}:",
            "",
            "| sessions | p50 ms | p95 ms |",
            "|---:|---:|---:|",
            *[f"| {n} | {p50:.0f} | {p95:.0f} |" for n, (p50, p95) in sorted(report.latency.items())],
            "",
        ]
    if report.skipped:
        report.lines += [
            f"Not measured (time budget spent): sizes {', '.join(map(str, report.skipped))}.",
            "",
        ]


# ------------------------------------------------------------------------------------------------
# part 3: first audio, sessions arriving at random times with their text ready


def first_audio_ms(engine: TTSEngine, args: argparse.Namespace, n: int) -> list[float]:
    """First-audio times (ms) of `n` sessions arriving at random times within `args.window`."""
    sessions = []
    try:
        # Warm-up: n sessions at once until each has made audio (compiles and captures every batch
        # size the timed run can meet), then cancelled.
        warm = [engine.open_session(SessionOptions(n_q=args.n_q, voice=VOICE, seed=i)) for i in range(n)]
        for s in warm:
            s.push_text(TEXT)
            s.flush()
        for s in warm:
            next(e for e in s if isinstance(e, AudioChunk))
            s.cancel()

        rng = random.Random(args.seed + n)
        arrivals = sorted(rng.uniform(0.0, args.window if n > 1 else 0.0) for _ in range(n))
        latencies: list[float] = [float("nan")] * n
        done = threading.Semaphore(0)

        def reader(i: int, session: Any, opened: float) -> None:
            try:
                for ev in session:
                    if isinstance(ev, AudioChunk):
                        latencies[i] = time.perf_counter() - opened
                        break
            finally:
                done.release()

        t0 = time.perf_counter()
        for i, at in enumerate(arrivals):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            opened = time.perf_counter()
            s = engine.open_session(SessionOptions(n_q=args.n_q, voice=VOICE, seed=1000 + i))
            s.push_text(TEXT)
            s.flush()
            sessions.append(s)
            threading.Thread(target=reader, args=(i, s, opened), daemon=True).start()
        for _ in range(n):
            if not done.acquire(timeout=args.step_timeout):
                raise RuntimeError("a session made no audio in time")
    finally:
        for s in sessions:
            s.cancel()
    return [x * 1000 for x in latencies]


# ------------------------------------------------------------------------------------------------
# targets, RESULTS.md


def judge(report: Report) -> None:
    """The issue's targets, pass/fail (n/a where the figure was not measured)."""
    args = report.args
    gpu = args.device.startswith("cuda") and not args.smoke
    note = "" if gpu else " (targets are for an H100-class GPU)"
    ours: dict[int, float] = {}  # the faster mode measured at each batch (compile=True unless it failed)
    for (b, _), (ms, _) in report.ours.items():
        ours[b] = min(ours.get(b, ms), ms)

    def figure(value: float | None, fmt: str) -> str:
        return "not measured" if value is None else fmt.format(value)

    ms1 = ours.get(1)
    report.check(
        f"<= {TARGET_STEP_MS_B1:g} ms/step at batch 1{note}",
        None if ms1 is None else ms1 <= TARGET_STEP_MS_B1,
        figure(ms1, "{:.2f} ms"),
    )
    ratio = report.moshi[64][0] / ours[64] if 64 in ours and 64 in report.moshi else None
    report.check(
        f">= {TARGET_SPEEDUP_B64:g}x moshi at batch 64{note}",
        None if ratio is None else ratio >= TARGET_SPEEDUP_B64,
        figure(ratio, "x{:.2f}"),
    )
    p50 = report.latency[1][0] if 1 in report.latency else None
    report.check(
        f"first audio p50 <= {TARGET_P50_FIRST_AUDIO_MS:g} ms, text ready, one session{note}",
        None if p50 is None else p50 <= TARGET_P50_FIRST_AUDIO_MS,
        figure(p50, "{:.0f} ms"),
    )
    step = ours.get(TARGET_SESSIONS)
    p95 = report.latency[TARGET_SESSIONS][1] if TARGET_SESSIONS in report.latency else None
    what = (
        f">= {TARGET_SESSIONS} real-time sessions (<= {REAL_TIME_STEP_MS:g} ms/step at batch "
        f"{TARGET_SESSIONS}) with p95 first audio <= {TARGET_P95_FIRST_AUDIO_MS:g} ms{note}"
    )
    if step is None or p95 is None:
        report.check(what, None, f"step {figure(step, '{:.1f} ms')}, p95 {figure(p95, '{:.0f} ms')}")
    else:
        passed = step <= REAL_TIME_STEP_MS and p95 <= TARGET_P95_FIRST_AUDIO_MS
        report.check(what, passed, f"{step:.1f} ms/step; p95 {p95:.0f} ms")


def write_results(report: Report, device: torch.device, started: float) -> None:
    args = report.args
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    size = "tiny checkpoint (smoke test)" if args.smoke else "real-size random weights"
    verdicts = [
        f"| {what} | {'n/a' if ok is None else ('pass' if ok else 'FAIL')} | {fig} |"
        for what, ok, fig in report.checks
    ]
    section = [
        f"## GPU check: {device.type}, {size}, {args.dtype}, n_q {args.n_q}, {now}",
        "",
        f"Command: `python benchmarks/gpu_check.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {machine_line(device)}  ",
        f"Ours through the public API (step observer; median of {args.steps} full steps after "
        f"{args.warmup}); "
        "moshi = `LMGen.step` (LM only, its CUDA graphs on where the device is CUDA) on the same weights. "
        f"Whole run: {time.perf_counter() - started:.0f} s.",
        "",
        *report.lines,
        "| check | result | figure |",
        "|---|---|---|",
        *verdicts,
        "",
    ]
    with open(args.out, "a") as f:
        f.write("\n" + "\n".join(section))
    print(f"wrote a section to {args.out}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny model, few steps: checks this script runs")
    ap.add_argument(
        "--parts", nargs="+", default=["parity", "speed", "latency"], choices=["parity", "speed", "latency"]
    )
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="default 1 8 64 256 (smoke: 1 4)")
    ap.add_argument("--arrivals", type=int, nargs="+", default=None, help="default 1 32 128 256 (smoke: 1 4)")
    ap.add_argument("--window", type=float, default=None, help="arrival window, s (default 2; smoke 0.5)")
    ap.add_argument("--steps", type=int, default=None, help="timed full steps (default 30; smoke 3)")
    ap.add_argument("--warmup", type=int, default=None, help="full steps not timed (default 10; smoke 2)")
    ap.add_argument("--n-q", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument(
        "--compile",
        choices=["off", "on", "both"],
        default=None,
        help="ours with compile=True (CUDA graphs on CUDA): default on for CUDA, off for CPU",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--pcm-tol", type=float, default=1e-3, help="parity: largest PCM difference accepted")
    ap.add_argument("--checkpoint-dir", default=None, help="default /tmp/kyutai-gpucheck-{real,tiny}-DTYPE")
    ap.add_argument("--step-timeout", type=float, default=None, help="s to wait for the timed steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--budget", type=float, default=None, help="s after which no new size starts (CUDA default 390)"
    )
    ap.add_argument(
        "--out",
        default=None,
        help="markdown file to append to (default benchmarks/RESULTS.md, none for --smoke)",
    )
    args = ap.parse_args(argv)
    smoke = args.smoke
    args.batch = args.batch or ([1, 4] if smoke else [1, 8, 64, 256])
    args.arrivals = args.arrivals or ([1, 4] if smoke else [1, 32, 128, 256])
    args.window = args.window if args.window is not None else (0.5 if smoke else 2.0)
    args.steps = args.steps or (3 if smoke else 30)
    args.warmup = args.warmup if args.warmup is not None else (2 if smoke else 10)
    args.compile = args.compile or ("on" if args.device.startswith("cuda") else "off")
    args.step_timeout = args.step_timeout or (600.0 if not args.device.startswith("cuda") else 300.0)
    args.latency_sizes = args.arrivals if "latency" in args.parts else []
    if args.budget is None and args.device.startswith("cuda") and not smoke:
        args.budget = 390.0  # leaves the last sizes' engines time to finish within 8 minutes
    if args.out is None and not smoke:
        args.out = str(ROOT / "benchmarks" / "RESULTS.md")
    if smoke:
        args.n_q = min(args.n_q, 32)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on a GPU machine, or pass --device cpu (--smoke)")
    report = Report(args)
    report.say(f"gpu_check on {machine_line(device)}")
    with tempfile.TemporaryDirectory() as tmp:
        if "parity" in args.parts:
            report.lines += ["Greedy parity, tiny checkpoint (float32):", ""]
            part_parity(report, device, Path(tmp))
        if "speed" in args.parts or "latency" in args.parts:
            size = "tiny" if args.smoke else "real"
            root = Path(args.checkpoint_dir or f"/tmp/kyutai-gpucheck-{size}-{args.dtype}")
            root, ref = build_checkpoint(root, args.smoke, getattr(torch, args.dtype), device, report)
            part_engines(report, device, root, ref, started)
    judge(report)
    if args.out:
        write_results(report, device, started)
    failed = [what for what, ok, _ in report.checks if ok is False]
    print(f"done in {time.perf_counter() - started:.0f} s; {len(failed)} check(s) failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
