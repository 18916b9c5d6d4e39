"""Load and fault test of `kyutai-tts serve` on the tiny random-weight model (loopback only).

N concurrent websocket clients (default 64) for a fixed time (default 120 s), each running one session
after another: normal streamed sessions (text split mid-word, trickled in), slow readers, random
disconnects (clean close or TCP abort, before or after Eos), malformed or over-limit messages, and
idle clients. Checks: the server stays up, every completed session gets all its audio in order (equal
to a solo greedy run of the same text), every bad message gets its documented Error, the engine and
connection counts return to zero and RSS returns near its baseline. Appends its figures to
benchmarks/RESULTS.md.

    python benchmarks/load_test_server.py [--sessions 64] [--duration 120] [--warmup 15] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
KEY = "load-test-key"
HEADERS = {"kyutai-api-key": KEY}
IDLE_TIMEOUT_S = 2.0
MAX_MESSAGE_BYTES = 16 * 1024
TEXTS = [
    "Hello there, how are you doing today?",
    "The quick brown fox jumps over the lazy dog.",
    "Streaming speech synthesis for voice agents, one word at a time.",
    "Numbers like 42 and 1984 are spoken too.",
    "Short one.",
    "A slightly longer sentence, with commas, pauses and several clauses to speak.",
]
# (message, expected error code, expected close code)
BAD_MESSAGES: list[tuple[bytes, str, int]] = [
    (b"\x93\xff garbage", "malformed_message", 1003),
    (msgpack.packb([1, 2, 3]), "malformed_message", 1003),
    (msgpack.packb({"type": "Dance"}), "malformed_message", 1003),
    (msgpack.packb({"type": "Text", "text": 7}), "malformed_message", 1003),
    (msgpack.packb({"type": "Voice", "embeddings": [0.0], "shape": [1]}), "unsupported", 1003),
    (b"\x00" * (MAX_MESSAGE_BYTES + 1), "message_too_large", 1009),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fragments(text: str, rng: random.Random) -> list[str]:
    """The text cut at random places, mid-word included, as an LLM streams it."""
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(2, 12))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


class Client:
    def __init__(self, url: str, references: dict[str, np.ndarray], deadline: float, seed: int) -> None:
        self.url = url
        self.references = references
        self.deadline = deadline
        self.rng = random.Random(seed)
        self.outcomes: Counter[str] = Counter()
        self.audio_s = 0.0

    async def run(self, http: aiohttp.ClientSession) -> None:
        scenarios = [self.normal, self.slow_reader, self.disconnect, self.malformed, self.idle]
        weights = [0.5, 0.12, 0.16, 0.16, 0.06]
        while time.monotonic() < self.deadline:
            scenario = self.rng.choices(scenarios, weights)[0]
            try:
                await asyncio.wait_for(scenario(http), 120)
            except Exception as e:  # anything not planned is a finding
                self.outcomes[f"unexpected:{scenario.__name__}:{type(e).__name__}:{str(e)[:60]}"] += 1

    async def connect(self, http: aiohttp.ClientSession) -> aiohttp.ClientWebSocketResponse:
        return await http.ws_connect(f"{self.url}/api/tts_streaming?temperature=0", headers=HEADERS)

    async def send_text(self, ws: aiohttp.ClientWebSocketResponse, text: str) -> None:
        # As RemoteTTS does: only whole words go out; the cut text is re-joined on whitespace.
        pending = ""
        for frag in fragments(text, self.rng):
            pending += frag
            head, sep, tail = pending.rpartition(" ")
            if sep and head:
                await ws.send_bytes(msgpack.packb({"type": "Text", "text": head}))
                pending = " " + tail if tail else ""
            await asyncio.sleep(self.rng.uniform(0, 0.03))
        if pending.strip():
            await ws.send_bytes(msgpack.packb({"type": "Text", "text": pending}))
        await ws.send_bytes(msgpack.packb({"type": "Eos"}))

    async def receive_all(self, ws: aiohttp.ClientWebSocketResponse, slow: bool) -> list[dict[str, Any]]:
        messages = []
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                messages.append(msgpack.unpackb(msg.data))
            if slow:
                await asyncio.sleep(self.rng.uniform(0.02, 0.08))
        return messages

    async def normal(self, http: aiohttp.ClientSession, slow: bool = False) -> None:
        text = self.rng.choice(TEXTS)
        async with await self.connect(http) as ws:
            sender = asyncio.create_task(self.send_text(ws, text))
            messages = await self.receive_all(ws, slow)
            await sender
            code = ws.close_code
        kind = "slow_reader" if slow else "normal"
        errors = [m for m in messages if m.get("type") == "Error"]
        if errors:
            self.outcomes[f"error:{kind}:{errors[0].get('code')}"] += 1
            return
        if not messages or messages[0] != {"type": "Ready"} or code != 1000:
            self.outcomes[f"bad_stream:{kind}:close={code}"] += 1
            return
        pcm = [np.asarray(m["pcm"], np.float32) for m in messages if m["type"] == "Audio"]
        got = np.concatenate(pcm) if pcm else np.zeros(0, np.float32)
        want = self.references[text]
        if got.shape != want.shape:
            self.outcomes[f"audio_length_mismatch:{kind}"] += 1
        elif np.abs(got - want).max() > 1e-4:
            self.outcomes[f"audio_differs:{kind}"] += 1
        else:
            self.outcomes[f"completed:{kind}"] += 1
            self.audio_s += got.size / 24000

    async def slow_reader(self, http: aiohttp.ClientSession) -> None:
        await self.normal(http, slow=True)

    async def disconnect(self, http: aiohttp.ClientSession) -> None:
        ws = await self.connect(http)
        text = self.rng.choice(TEXTS)
        if self.rng.random() < 0.7:
            await ws.send_bytes(msgpack.packb({"type": "Text", "text": text}))
            if self.rng.random() < 0.7:
                await ws.send_bytes(msgpack.packb({"type": "Eos"}))
        for _ in range(self.rng.randint(0, 12)):
            msg = await ws.receive(timeout=30)
            if msg.type != aiohttp.WSMsgType.BINARY:
                break
        if self.rng.random() < 0.5:
            ws._writer.transport.abort()  # no close frame
            self.outcomes["disconnected:abort"] += 1
        else:
            await ws.close()
            self.outcomes["disconnected:close"] += 1

    async def malformed(self, http: aiohttp.ClientSession) -> None:
        if self.rng.random() < 0.2:  # Text after Eos
            payload, code, close = b"", "text_after_eos", 1008
        else:
            payload, code, close = self.rng.choice(BAD_MESSAGES)
        async with await self.connect(http) as ws:
            if code == "text_after_eos":
                await ws.send_bytes(msgpack.packb({"type": "Text", "text": self.rng.choice(TEXTS)}))
                await ws.send_bytes(msgpack.packb({"type": "Eos"}))
                await ws.send_bytes(msgpack.packb({"type": "Text", "text": "late"}))
            else:
                await ws.send_bytes(payload)
            messages = await self.receive_all(ws, slow=False)
            got_close = ws.close_code
        errors = [m for m in messages if m.get("type") == "Error"]
        if len(errors) == 1 and errors[0].get("code") == code and got_close == close:
            self.outcomes[f"expected_error:{code}"] += 1
        else:
            self.outcomes[f"wrong_error:{code}:{errors[:1]}:close={got_close}"] += 1

    async def idle(self, http: aiohttp.ClientSession) -> None:
        async with await self.connect(http) as ws:
            await ws.send_bytes(msgpack.packb({"type": "Text", "text": "waiting"}))
            messages = await self.receive_all(ws, slow=False)
        codes = [m.get("code") for m in messages if m.get("type") == "Error"]
        self.outcomes[
            "expected_error:idle_timeout" if codes == ["idle_timeout"] else f"wrong_idle:{codes}"
        ] += 1


async def references(url: str) -> dict[str, np.ndarray]:
    """Each text alone on the server, greedy: what every concurrent session must get back."""
    out = {}
    async with aiohttp.ClientSession() as http:
        for text in TEXTS:
            async with http.ws_connect(f"{url}/api/tts_streaming?temperature=0", headers=HEADERS) as ws:
                await ws.send_bytes(msgpack.packb({"type": "Text", "text": text}))
                await ws.send_bytes(msgpack.packb({"type": "Eos"}))
                pcm = []
                async for msg in ws:
                    m = msgpack.unpackb(msg.data)
                    if m["type"] == "Audio":
                        pcm.append(np.asarray(m["pcm"], np.float32))
            out[text] = np.concatenate(pcm)
    return out


async def get_json(url: str, path: str) -> Any:
    async with aiohttp.ClientSession(headers=HEADERS) as http:
        async with http.get(url + path, timeout=aiohttp.ClientTimeout(total=10)) as resp:
            return await resp.json() if path.startswith("/api") else await resp.text()


async def wait_health(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await get_json(url, "/api/health")
            return
        except (aiohttp.ClientError, OSError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def run_clients(
    n: int, url: str, refs: dict[str, np.ndarray], duration: float, seed: int
) -> list[Client]:
    deadline = time.monotonic() + duration
    clients = [Client(url, refs, deadline, seed=seed + i) for i in range(n)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        await asyncio.gather(*(c.run(http) for c in clients))
    return clients


async def wait_drained(url: str) -> dict[str, Any]:
    """Everything must drain: no engine session and no connection left."""
    deadline = time.monotonic() + 30
    health = await get_json(url, "/api/health")
    while (health["sessions"] or health["connections"]) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        health = await get_json(url, "/api/health")
    await asyncio.sleep(3)
    return health


async def drive(args: argparse.Namespace, url: str, server: subprocess.Popen[bytes]) -> dict[str, Any]:
    await wait_health(url, 120)
    refs = await references(url)
    rss_start = rss_mib(server.pid)
    # A warm-up at full concurrency first: torch and the allocator grow once to the largest batch, and
    # what matters is whether memory keeps growing afterwards.
    await run_clients(args.sessions, url, refs, args.warmup, seed=10_000)
    await wait_drained(url)
    rss_before = rss_mib(server.pid)
    start = time.monotonic()
    clients = await run_clients(args.sessions, url, refs, args.duration, seed=0)
    elapsed = time.monotonic() - start
    health = await wait_drained(url)
    rss_after = rss_mib(server.pid)
    metrics = await get_json(url, "/metrics")
    outcomes: Counter[str] = Counter()
    for c in clients:
        outcomes.update(c.outcomes)
    return {
        "elapsed": elapsed,
        "outcomes": outcomes,
        "audio_s": sum(c.audio_s for c in clients),
        "health": health,
        "rss_start": rss_start,
        "rss_before": rss_before,
        "rss_after": rss_after,
        "server_up": server.poll() is None,
        "metrics": metrics,
    }


def report(args: argparse.Namespace, r: dict[str, Any]) -> str:
    outcomes: Counter[str] = r["outcomes"]
    completed = sum(v for k, v in outcomes.items() if k.startswith("completed:"))
    expected = sum(v for k, v in outcomes.items() if k.startswith(("expected_error:", "disconnected:")))
    unexpected = {
        k: v
        for k, v in outcomes.items()
        if not k.startswith(("completed:", "expected_error:", "disconnected:"))
    }
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = "?"
    server_errors = [line for line in r["metrics"].splitlines() if line.startswith("kyutai_tts_errors_total")]
    lines = [
        f"## Network server load test ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"- Command: `python benchmarks/load_test_server.py --sessions {args.sessions} "
        f"--duration {args.duration:g} --warmup {args.warmup:g}`",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, torch {torch_version}; tiny "
        f"random-weight model (make_test_checkpoint), engine {args.slots} slots; server (1 torch thread) "
        "and clients on loopback on the same machine",
        f"- {args.sessions} concurrent websocket clients for {r['elapsed']:.0f} s, each running one "
        "session after another",
        f"- Server stayed up: {'yes' if r['server_up'] else 'NO'}; after the run: "
        f"{r['health']['sessions']} engine sessions, {r['health']['connections']} connections open",
        f"- Completed sessions (all audio, in order, equal to a solo greedy run): {completed} "
        f"({r['audio_s']:.0f} s of audio); of which slow readers: {outcomes['completed:slow_reader']}",
        f"- Planned faults handled as documented: {expected}",
        f"- Unexpected outcomes: {sum(unexpected.values())}" + (f" {dict(unexpected)}" if unexpected else ""),
        f"- Server RSS: {r['rss_start']:.0f} MiB after start-up, {r['rss_before']:.0f} MiB after a "
        f"{args.warmup:g} s warm-up at full concurrency (baseline), {r['rss_after']:.0f} MiB after the run "
        f"and drain ({r['rss_after'] - r['rss_before']:+.0f} MiB vs baseline)",
        "",
        "| client outcome | count |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in sorted(outcomes.items())),
        "",
        "Server-side error counters (`/metrics`, warm-up included): "
        + ", ".join(f"`{e}`" for e in server_errors),
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds (default 120)")
    parser.add_argument("--warmup", type=float, default=15.0, help="seconds of warm-up load (default 15)")
    parser.add_argument("--slots", type=int, default=16, help="engine slots (default 16)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print the figures, do not append them")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))  # this checkout, also when another one is installed
    from kyutai_tts_plugin.testing import make_test_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_test_checkpoint(Path(tmp) / "tiny")
        port = free_port()
        cmd = [
            sys.executable, "-m", "kyutai_tts_plugin.server",
            "--model", str(ckpt), "--voice-repo", str(ckpt / "voices"),
            "--host", "127.0.0.1", "--port", str(port),
            "--max-sessions", str(args.slots), "--max-waiting", str(args.sessions * 2),
            "--queue-timeout", "90", "--idle-timeout", str(IDLE_TIMEOUT_S),
            "--max-message-bytes", str(MAX_MESSAGE_BYTES), "--send-timeout", "20",
            "--max-sessions-per-key", str(args.sessions * 2), "--num-threads", "1",
        ]  # fmt: skip
        env = {**os.environ, "KYUTAI_TTS_API_KEYS": KEY, "PYTHONPATH": str(ROOT)}
        log = open(Path(tmp) / "server.log", "wb")  # noqa: SIM115  # closed below
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            result = asyncio.run(drive(args, f"http://127.0.0.1:{port}", server))
        finally:
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            log.close()
            tail = (Path(tmp) / "server.log").read_text(errors="replace").splitlines()[-15:]
    text = report(args, result)
    print(text)
    if "Traceback" in "\n".join(tail):
        print("server log tail:\n" + "\n".join(tail), file=sys.stderr)
    if not args.no_write:
        with args.results.open("a", encoding="utf-8") as f:
            f.write("\n" + text)
        print(f"appended to {args.results}", file=sys.stderr)
    unexpected = any(
        not k.startswith(("completed:", "expected_error:", "disconnected:")) for k in result["outcomes"]
    )
    return 0 if result["server_up"] and not unexpected else 1


if __name__ == "__main__":
    sys.exit(main())
