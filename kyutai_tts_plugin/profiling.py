"""Counting the host work of engine steps: aten ops and device->host synchronisations.

A *sync* is any point where the host waits for a tensor's value: ``aten._local_scalar_dense`` (``int(t)``,
``t.item()``, ``bool(t)``), a copy from a non-CPU device to the CPU, and ``Tensor.tolist`` /
``Tensor.numpy`` (these read the data without going through the dispatcher, so they are wrapped here).
On a CPU-only machine this still counts the places that would wait on a GPU, so the counts are
machine-independent. For tests and benchmarks only.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SCALAR = torch.ops.aten._local_scalar_dense.default
_COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


class _CountingMode(TorchDispatchMode):
    def __init__(self, counter: HostWorkCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        c = self.counter
        c.ops += 1
        c.by_op[str(func)] += 1
        if func is _SCALAR:
            c.syncs += 1
        elif func in _COPIES:
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst_dev = args[0].device if func is torch.ops.aten.copy_.default else kwargs.get("device")
            if (
                isinstance(src, torch.Tensor)
                and src.device.type not in ("cpu", "meta")
                and (dst_dev is not None and torch.device(dst_dev).type == "cpu")
            ):
                c.syncs += 1
        return func(*args, **kwargs)


class HostWorkCounter:
    """Counts aten ops and host syncs made by the current thread inside `counting()`."""

    def __init__(self) -> None:
        self.ops = 0
        self.syncs = 0
        self.by_op: Counter[str] = Counter()
        self._thread: int | None = None

    @contextmanager
    def counting(self) -> Iterator[None]:
        self._thread = threading.get_ident()
        originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

        def wrap(name: str) -> Callable[..., Any]:
            original = originals[name]

            def wrapped(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                if threading.get_ident() == self._thread:
                    self.syncs += 1
                return original(t, *args, **kwargs)

            return wrapped

        for name in originals:
            setattr(torch.Tensor, name, wrap(name))
        try:
            with _CountingMode(self):
                yield
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)
            self._thread = None


def count_engine_steps(
    engine: Any, audio_only: bool = False
) -> tuple[list[tuple[int, int, int]], Callable[[], None]]:
    """Count the host work of each engine step (on the worker thread, where steps run).

    Returns (records, remove): records gets one (batch size, ops, syncs) per step; with `audio_only`,
    only the steps where every session stepped generates audio (past the text-only delay).
    """
    records: list[tuple[int, int, int]] = []
    original = engine._step

    def step(sessions: Any, *args: Any, **kwargs: Any) -> Any:
        if not sessions or (
            audio_only and any(s.run is None or s.run.step < engine.delay_steps for s in sessions)
        ):
            return original(sessions, *args, **kwargs)
        counter = HostWorkCounter()
        with counter.counting():
            out = original(sessions, *args, **kwargs)
        records.append((len(sessions), counter.ops, counter.syncs))
        return out

    engine._step = step

    def remove() -> None:
        engine._step = original

    return records, remove
