"""What a production LiveKit agent hits (issue 13, points 6-10), with livekit-agents' own classes.

Order in time is asserted in engine slots, frames and events; the only durations compared are the
event loop's longest stall against a stall the test provokes itself (a slow Hub call).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
from livekit.agents import APIConnectionError, APIConnectOptions, APIError, APITimeoutError, tts
from livekit.agents.types import TimedString

from kyutai_tts_plugin.engine import TTSEngine
from kyutai_tts_plugin.livekit import TTS
from kyutai_tts_plugin.livekit.tts import model_label
from kyutai_tts_plugin.testing import HANG_GUARD_S
from kyutai_tts_plugin.types import SessionOptions

REPO = Path(__file__).resolve().parents[1]
FRAME_S = 0.08
NO_RETRY = APIConnectOptions(max_retry=0, timeout=HANG_GUARD_S)
ONE_RETRY = APIConnectOptions(max_retry=1, retry_interval=0.0, timeout=HANG_GUARD_S)


async def run_stream(
    tts_: tts.TTS, deltas: list[str], conn_options: APIConnectOptions = NO_RETRY, flush_first: bool = False
) -> list[tts.SynthesizedAudio]:
    events = []
    async with tts_.stream(conn_options=conn_options) as stream:
        if flush_first:
            stream.flush()
        for d in deltas:
            stream.push_text(d)
        stream.end_input()
        async for ev in stream:
            events.append(ev)
    return events


def timed_words(events: list[tts.SynthesizedAudio]) -> list[TimedString]:
    words = []
    for ev in events:
        words.extend(ev.frame.userdata.get("lk.timed_transcripts", []))
    return words


def error_events(tts_: tts.TTS) -> list[tts.TTSError]:
    seen: list[tts.TTSError] = []
    tts_.on("error", seen.append)
    return seen


async def wait_for(condition, what: str) -> None:
    """A hang guard, not a timing assertion: fails only if `condition` never holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANG_GUARD_S
    while not condition():
        assert loop.time() < deadline, f"never came: {what}"
        await asyncio.sleep(0.01)


# -- 6. nothing blocks the event loop ------------------------------------------------------------


async def test_opening_sessions_on_a_cold_voice_cache_never_stalls_the_loop(tiny_engine, monkeypatch):
    hub_call_s = 2.0  # the slow Hub call this test provokes; the loop must never stall near it
    resolve = tiny_engine.voices.resolve
    calls: list[float] = []

    def slow_resolve(name):
        calls.append(time.perf_counter())
        time.sleep(hub_call_s)  # a voice download from the Hub
        return resolve(name)

    monkeypatch.setattr(tiny_engine.voices, "resolve", slow_resolve)
    longest = 0.0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal longest
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            longest, last = max(longest, now - last), now

    tick = asyncio.create_task(ticker())
    tts_ = TTS(engine=tiny_engine, temperature=0.0, n_q=4)
    results = await asyncio.gather(
        run_stream(tts_, ["Hello there, ", "friend."]), run_stream(tts_, ["And you ", "too."])
    )
    stop.set()
    await tick
    assert all(results) and len(calls) >= 2, "the voice resolver never ran: the test provoked no stall"
    assert longest < hub_call_s / 4, (
        f"the event loop stalled {longest:.2f} s during a {hub_call_s} s Hub call"
    )


async def test_an_interruption_while_a_voice_is_fetched_frees_the_slot(tiny_engine, monkeypatch):
    resolve = tiny_engine.voices.resolve
    fetching, release = threading.Event(), threading.Event()

    def held_resolve(name):
        fetching.set()
        assert release.wait(HANG_GUARD_S), "the voice fetch was never released"
        return resolve(name)

    open_session = tiny_engine.open_session
    opened = threading.Event()

    def open_and_tell(options=None, **overrides):
        try:
            return open_session(options, **overrides)
        finally:
            opened.set()

    monkeypatch.setattr(tiny_engine.voices, "resolve", held_resolve)
    monkeypatch.setattr(tiny_engine, "open_session", open_and_tell)
    tts_ = TTS(engine=tiny_engine, temperature=0.0, n_q=4)
    stream = tts_.stream(conn_options=NO_RETRY)
    stream.push_text("Hello there, friend.")
    await wait_for(fetching.is_set, "the voice fetch")
    await stream.aclose()  # the user barged in while the session was being opened
    release.set()
    await wait_for(opened.is_set, "the session to open")
    await wait_for(lambda: tiny_engine.active_sessions == 0, "the slot of the session opened meanwhile")


# -- 7. conn_options.timeout and retries -----------------------------------------------------------


@pytest.fixture
def busy_engine(tiny_checkpoint):
    """An engine whose only slot is held by another session for the whole test. Its own queue timeout
    is far beyond the hang guard, and the idle hog is never ended: only `conn_options.timeout` can end
    a wait for its slot, and a session left in its queue stays there."""
    engine = TTSEngine.from_pretrained(
        tiny_checkpoint,
        voice_repo=tiny_checkpoint / "voices",
        max_sessions=1,
        max_waiting=8,
        queue_timeout_s=10 * HANG_GUARD_S,
        idle_timeout_s=None,
    )
    hog = engine.open_session(SessionOptions(n_q=2))
    hog.push_text("two words")
    yield engine, hog
    hog.cancel()
    engine.close()


@pytest.mark.parametrize("remote", [False, True], ids=["in-process", "remote"])
async def test_a_request_waiting_longer_than_conn_timeout_raises_api_timeout_and_retries(
    busy_engine, make_server, remote
):
    from kyutai_tts_plugin.remote import RemoteTTS

    from .conftest import SERVER_TEST_KEY

    engine, hog = busy_engine
    await wait_for(lambda: hog.run is not None, "the hog's slot")
    # Remote: the server queues each attempt (max_waiting), so only conn_options.timeout ends the wait.
    backend = RemoteTTS((await make_server(engine=engine)).url, api_key=SERVER_TEST_KEY) if remote else engine
    tts_ = TTS(engine=backend)
    errors = error_events(tts_)
    options = APIConnectOptions(max_retry=1, retry_interval=0.0, timeout=0.2)
    with pytest.raises(APITimeoutError, match="conn_options.timeout"):
        await asyncio.wait_for(run_stream(tts_, ["hello there friend"], options), HANG_GUARD_S)
    # One error per attempt, as LiveKit reports a retried request; no attempt is left in the queue.
    assert [e.recoverable for e in errors] == [True, False]
    assert all(isinstance(e.error, APITimeoutError) for e in errors)
    await wait_for(lambda: engine.active_sessions == 1, "the timed-out attempts to leave the queue")


@pytest.mark.parametrize("remote", [False, True], ids=["in-process", "remote"])
async def test_fallback_adapter_falls_back_within_conn_timeout(busy_engine, tiny_engine, make_server, remote):
    from kyutai_tts_plugin.remote import RemoteTTS

    from .conftest import SERVER_TEST_KEY

    engine, hog = busy_engine
    await wait_for(lambda: hog.run is not None, "the hog's slot")
    # Remote: the server queues the request (max_waiting) until conn_options.timeout ends the wait.
    backend = RemoteTTS((await make_server(engine=engine)).url, api_key=SERVER_TEST_KEY) if remote else engine
    busy, spare = TTS(engine=backend, temperature=0.0, n_q=4), TTS(engine=tiny_engine, temperature=0.0, n_q=4)
    errors = error_events(busy)
    fallback = tts.FallbackAdapter([busy, spare], max_retry_per_tts=1)
    options = APIConnectOptions(max_retry=0, retry_interval=0.0, timeout=0.2)
    text = "Sure, here is the plan."
    try:
        events = await asyncio.wait_for(run_stream(fallback, [text], options), HANG_GUARD_S)
        assert events and "".join(timed_words(events)) == text  # the spare spoke it
        assert [e.recoverable for e in errors] == [True, False]
        assert all(isinstance(e.error, APITimeoutError) for e in errors)
        assert hog.run is not None and not hog.is_finished  # the busy slot was never freed meanwhile
    finally:
        await fallback.aclose()
    await wait_for(lambda: engine.active_sessions == 1, "the busy engine's queue to empty")


# -- 8. errors map as LiveKit's plugins map them ---------------------------------------------------


def _remote_failure(kind_name: str) -> Exception:
    from kyutai_tts_plugin.remote import RemoteError, RemoteErrorKind

    # Worded to mislead: the mapping reads the kind, never the message.
    return RemoteError("cannot connect to the connection to the server was lost", RemoteErrorKind[kind_name])


@pytest.mark.parametrize(
    ("kind_name", "error_type", "retryable"),
    [
        ("CONNECT_FAILED", APIConnectionError, True),
        ("CONNECTION_LOST", APIConnectionError, True),
        ("TIMEOUT", APITimeoutError, True),
        ("REFUSED", APIError, True),
        ("BAD_REQUEST", APIError, False),
    ],
)
async def test_a_remote_error_maps_by_its_kind(tiny_engine, monkeypatch, kind_name, error_type, retryable):
    def failing_open_session(options=None, **overrides):
        raise _remote_failure(kind_name)

    monkeypatch.setattr(tiny_engine, "open_session", failing_open_session)
    tts_ = TTS(engine=tiny_engine)
    errors = error_events(tts_)
    with pytest.raises(APIError) as err:
        await run_stream(tts_, ["hello there"], ONE_RETRY)
    assert type(err.value) is error_type and err.value.retryable is retryable
    assert [e.recoverable for e in errors] == ([True, False] if retryable else [False])


def test_a_remote_error_is_a_pipecat_error_frame_of_its_kind():
    from pipecat.frames.frames import ErrorCategory

    from kyutai_tts_plugin.pipecat.tts import _error_frame

    expected = {
        "CONNECT_FAILED": ErrorCategory.CONNECTIVITY,
        "CONNECTION_LOST": ErrorCategory.CONNECTIVITY,
        "TIMEOUT": ErrorCategory.CONNECTIVITY,
        "REFUSED": ErrorCategory.SERVER,
        # The request (this text, this key) is at fault, not the service: never written off.
        "BAD_REQUEST": ErrorCategory.APPLICATION,
    }
    for kind_name, category in expected.items():
        frame = _error_frame(_remote_failure(kind_name))
        assert frame.category is category and not frame.category.is_permanent, kind_name


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_an_unreachable_server_is_a_retryable_connection_error():
    from kyutai_tts_plugin.remote import RemoteTTS

    tts_ = TTS(engine=RemoteTTS(f"ws://127.0.0.1:{_closed_port()}"))
    errors = error_events(tts_)
    with pytest.raises(APIConnectionError) as err:
        await run_stream(tts_, ["hello there"], ONE_RETRY)
    assert err.value.retryable and "cannot connect" in str(err.value)
    assert [e.recoverable for e in errors] == [True, False]  # retried once, as LiveKit's plugins are


async def test_a_key_the_server_refuses_is_not_retried(make_server):
    from kyutai_tts_plugin.remote import RemoteTTS

    server = await make_server()
    tts_ = TTS(engine=RemoteTTS(server.url, api_key="not-the-key"))
    errors = error_events(tts_)
    with pytest.raises(APIError) as err:
        await run_stream(tts_, ["hello there"], ONE_RETRY)
    assert type(err.value) is APIError and not err.value.retryable and "api_key" in str(err.value)
    assert [e.recoverable for e in errors] == [False]  # the same key fails the same way


async def test_an_unexpected_engine_exception_is_an_api_error(tiny_engine, monkeypatch):
    def broken_open_session(options=None, **overrides):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(tiny_engine, "open_session", broken_open_session)
    tts_ = TTS(engine=tiny_engine)
    errors = error_events(tts_)
    with pytest.raises(APIError, match="CUDA error") as err:
        await run_stream(tts_, ["hello there"], ONE_RETRY)
    assert isinstance(err.value.__cause__, RuntimeError)
    assert [e.recoverable for e in errors] == [True, False]


async def test_an_engine_failure_while_stepping_is_a_retried_api_error(tiny_engine, monkeypatch):
    def broken_step(sessions):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(tiny_engine, "_step", broken_step)
    tts_ = TTS(engine=tiny_engine, temperature=0.0, n_q=4)
    errors = error_events(tts_)
    # The engine names the exception's type only (its text may carry a server's paths).
    with pytest.raises(APIError, match=r"failed while stepping \(RuntimeError\)") as err:
        await run_stream(tts_, ["hello there, my friend"], ONE_RETRY)
    assert err.value.retryable  # as LiveKit's plugins treat an unexpected failure
    assert [e.recoverable for e in errors] == [True, False]
    assert tiny_engine.active_sessions == 0


async def test_a_bad_voice_is_not_retried(tiny_engine):
    tts_ = TTS(engine=tiny_engine, voice="nope")
    errors = error_events(tts_)
    with pytest.raises(APIError) as err:
        await run_stream(tts_, ["hello there"], ONE_RETRY)
    assert not err.value.retryable and "nope" in str(err.value)
    assert [e.recoverable for e in errors] == [False]


async def test_a_failed_model_load_is_retried_once_the_files_appear(tiny_checkpoint, tmp_path):
    model = tmp_path / "model"
    model.mkdir()  # the files are not there yet
    tts_ = TTS(model=model, voice_repo=tiny_checkpoint / "voices", engine_kwargs={"max_sessions": 1})
    with pytest.raises(APIError, match="download-files") as err:
        await run_stream(tts_, ["hello there"])
    assert not err.value.retryable
    shutil.rmtree(model)
    shutil.copytree(tiny_checkpoint, model)
    try:
        events = await run_stream(tts_, ["hello there"])
        assert events and "".join(timed_words(events)) == "hello there"
    finally:
        if tts_._loader.engine is not None:
            tts_._loader.engine.close()  # type: ignore[attr-defined]


# -- 9. transcript fidelity ------------------------------------------------------------------------


async def test_a_whitespace_only_first_delta_stays_in_the_transcript(tiny_engine):
    tts_ = TTS(engine=tiny_engine, temperature=0.0, n_q=4)
    deltas = ["\n\n", "Sure", ", here", " it is."]
    events = await run_stream(tts_, deltas)
    assert "".join(timed_words(events)) == "".join(deltas)


async def test_a_flush_before_any_text_does_not_lose_the_stream(tiny_engine):
    tts_ = TTS(engine=tiny_engine, temperature=0.0, n_q=4)
    text = "Hello there, my friend."
    events = await run_stream(tts_, [text], flush_first=True)
    assert sum(ev.frame.duration for ev in events) > 0.5
    assert "".join(timed_words(events)) == text


async def test_a_url_has_one_caption_from_its_first_frame_to_the_next_word(tiny_engine):
    # Normalization splits the URL ("https" + "//example.com/..."), and its second piece takes longer
    # than the text-to-audio delay: the engine times that piece well after its audio started.
    url = "https://example.com/some/very/long/path/to/page?x=1"
    text = f"See {url} for details."
    tts_ = TTS(engine=tiny_engine, temperature=0.0, n_q=4)
    events = await run_stream(tts_, [text])
    ref = tiny_engine.synthesize(text, SessionOptions(temperature=0.0, n_q=4))
    pieces = [w for w in ref.words if w.word in ("https", "//example.com/some/very/long/path/to/page?x=1")]
    assert len(pieces) == 2, "the URL is no longer split in two pieces: this test lost its purpose"

    words = timed_words(events)
    assert all(w for w in words), "an empty TimedString"
    assert "".join(words) == text
    caption = next(w for w in words if url in w)
    assert caption.start_time == pytest.approx(pieces[0].start_s)
    after = words[words.index(caption) + 1]
    # The caption spans the whole URL: open until the next word starts, where the URL's audio ends.
    assert not isinstance(caption.end_time, float) or caption.end_time == pytest.approx(pieces[1].end_s)
    assert after.start_time == pytest.approx(pieces[1].end_s)
    assert_captions_ride_on_their_first_frame(events)


def assert_captions_ride_on_their_first_frame(events: list[tts.SynthesizedAudio]) -> None:
    """Every TimedString rides on the frame its word's audio starts in, not on a later one."""
    played = 0.0
    for ev in events:
        for w in ev.frame.userdata.get("lk.timed_transcripts", []):
            assert played - 1e-6 <= w.start_time < played + FRAME_S, (
                f"{w!r} starts in frame {w.start_time / FRAME_S:.0f}, rides on frame {played / FRAME_S:.0f}"
            )
        played += ev.frame.duration


async def test_a_word_longer_than_the_text_to_audio_delay_has_its_caption_on_its_first_frame(tiny_engine):
    # Normalization leaves this word whole, and it lasts longer than the text-to-audio delay: the
    # next word starts (which is where this one ends) after this one's audio has begun.
    word = "www.example.com/some/long/path"
    text = f"Go to {word} now."
    ref = tiny_engine.synthesize(text, SessionOptions(temperature=0.0, n_q=4))
    timing = next(w for w in ref.words if w.word == word)
    delay_frames = tiny_engine.delay_steps + tiny_engine._max_delay
    assert round((timing.end_s - timing.start_s) / FRAME_S) > delay_frames, "the word got short: no test"

    tts_ = TTS(engine=tiny_engine, temperature=0.0, n_q=4)
    events = await run_stream(tts_, [text])
    words = timed_words(events)
    assert "".join(words) == text
    caption = next(w for w in words if word in w)
    assert (caption.start_time, caption.end_time) == pytest.approx((timing.start_s, timing.end_s))
    assert_captions_ride_on_their_first_frame(events)


# -- 10. aclose, download-files, metrics -----------------------------------------------------------


async def test_tts_aclose_closes_open_streams_and_frees_their_slots(tiny_engine):
    tts_ = TTS(engine=tiny_engine, temperature=0.0, n_q=4)
    stream = tts_.stream(conn_options=NO_RETRY)
    stream.push_text("This reply is long enough to still be speaking when the agent shuts down. " * 3)
    async for _ in stream:
        break  # audio flows: the session holds a slot
    assert tiny_engine.active_sessions == 1
    await tts_.aclose()
    assert tiny_engine.active_sessions == 0
    assert stream._task.done()


def _download_files(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run(
        [sys.executable, "-m", "livekit.agents", "download-files"],
        env=full,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        cwd=REPO,
    )


def test_download_files_finds_the_plugin_and_fetches_the_configured_model(tiny_checkpoint, tmp_path):
    ok = _download_files(
        {"KYUTAI_TTS_MODEL": str(tiny_checkpoint), "KYUTAI_TTS_VOICES": str(tiny_checkpoint / "voices")}
    )
    assert ok.returncode == 0, ok.stderr
    assert "livekit.plugins.kyutai_tts" in ok.stderr and str(tiny_checkpoint) in ok.stderr
    missing = tmp_path / "not-downloaded"
    missing.mkdir()
    bad = _download_files({"KYUTAI_TTS_MODEL": str(missing)})
    assert bad.returncode == 1 and str(missing) in bad.stderr


# Run in a fresh interpreter without site processing: the wheel's directory is added as a site
# directory (its .pth files run, as in site-packages), then the environment's own packages, without
# their .pth files (this environment's editable install of another checkout must not answer).
_INSTALLED_DOWNLOAD_FILES = """
import runpy, site, sys, sysconfig
site.addsitedir(sys.argv[1])
for key in ("purelib", "platlib"):
    if sysconfig.get_paths()[key] not in sys.path:
        sys.path.append(sysconfig.get_paths()[key])
sys.argv = ["livekit.agents", "download-files"]
runpy.run_module("livekit.agents", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("build", ["build_editable", "build_wheel"])
def test_download_files_finds_the_plugin_of_an_installed_checkout(build, tiny_checkpoint, tmp_path):
    # `pip install -e .` (what .ci/run does) and a regular install, with no checkout on the path:
    # livekit-agents lists plugins with pkgutil.iter_modules(livekit.plugins.__path__), which sees
    # directories, not the import hooks of setuptools' editable finder.
    wheels, site_dir, checkout = tmp_path / "wheels", tmp_path / "site", tmp_path / "checkout"
    # A copy of what the build reads, so that its by-products (egg-info, build/) stay out of the checkout.
    for name in ("kyutai_tts_plugin", "livekit"):
        shutil.copytree(REPO / name, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, checkout / name)
    built = subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; build_meta.{build}({str(wheels)!r})"],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert built.returncode == 0, built.stderr
    with zipfile.ZipFile(next(wheels.glob("*.whl"))) as wheel:
        wheel.extractall(site_dir)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        HF_HUB_OFFLINE="1",
        KYUTAI_TTS_MODEL=str(tiny_checkpoint),
        KYUTAI_TTS_VOICES=str(tiny_checkpoint / "voices"),
    )
    ran = subprocess.run(
        [sys.executable, "-S", "-c", _INSTALLED_DOWNLOAD_FILES, str(site_dir)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert "discovered 1 plugin package(s): livekit.plugins.kyutai_tts" in ran.stderr, ran.stderr
    assert ran.returncode == 0 and str(tiny_checkpoint) in ran.stderr, ran.stderr


async def test_metrics_name_the_model_by_its_name_not_its_path(tiny_engine, tiny_checkpoint, tmp_path):
    tts_ = TTS(engine=tiny_engine, model=tiny_checkpoint, temperature=0.0, n_q=4)
    metrics: list = []
    tts_.on("metrics_collected", metrics.append)
    await run_stream(tts_, ["Hello there."])
    await wait_for(lambda: metrics, "TTS metrics")
    assert metrics[0].metadata.model_name == tiny_checkpoint.name
    assert metrics[0].metadata.model_provider == "kyutai"
    snapshot = tmp_path / "hub" / "models--kyutai--tts-1.6b-en_fr" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    assert model_label(snapshot) == "kyutai/tts-1.6b-en_fr"
    assert model_label("kyutai/tts-1.6b-en_fr") == "kyutai/tts-1.6b-en_fr"
