"""What the Pipecat and LiveKit adapters share: option names and checks, background model loading,
the empty-reply frame, and the playback pacing setting.

Framework-free on purpose (no Pipecat or LiveKit import), so that both adapters, and their tests,
use the one definition.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
from typing import Any

from .errors import InvalidInputError
from .types import FRAME_SIZE, SessionOptions, TTSBackend, TTSSession

__all__ = [
    "DEFAULT_MAX_LEAD_S",
    "EMPTY_REPLY_PCM16",
    "OPTION_NAMES",
    "EngineLoader",
    "check_max_lead_s",
    "session_options",
    "slot_taken",
    "voice_from_kwargs",
]

# The per-utterance options both adapters expose, named as in `SessionOptions`.
OPTION_NAMES = ("voice", "cfg_coef", "temperature", "n_q", "padding_bonus")

# A reply with nothing speakable (only emoji, say) is voiced as one 80 ms frame of silence: both
# frameworks take an utterance that ends without audio for a failed synthesis.
EMPTY_REPLY_PCM16 = bytes(2 * FRAME_SIZE)

# How often `slot_taken` looks whether the engine gave a session its slot. The engine admits sessions on
# its own thread and offers no wake-up for it; a 10 ms look costs nothing next to an 80 ms step.
_SLOT_POLL_S = 0.01

# How far ahead of playback an utterance may be generated, by default. Enough to ride out a slow
# step or a busy batch; little enough that a barge-in throws away at most this much computed audio.
DEFAULT_MAX_LEAD_S = 3.0


def session_options(**values: Any) -> SessionOptions:
    """`SessionOptions` from adapter option values, checked by `SessionOptions.validate`.

    Args:
        **values: Any of `OPTION_NAMES`.

    Returns:
        The options (fields not given keep the engine defaults).

    Raises:
        InvalidInputError: An unknown option name, or a value of the wrong type or out of range
            (the message names the option and what is accepted).
    """
    unknown = sorted(set(values) - set(OPTION_NAMES))
    if unknown:
        raise InvalidInputError(
            f"unknown option(s) {', '.join(unknown)}; the options are {', '.join(OPTION_NAMES)}"
        )
    options = SessionOptions(**values)
    options.validate()  # the engine re-checks the model-dependent bounds (cfg values, n_q max)
    return options


def voice_from_kwargs(settings_voice: str | None, **aliases: Any) -> str | None:
    """The voice asked for through ``voice=`` / ``voice_id=`` keywords (the convention of the
    frameworks' other TTS services) and through the settings; they must agree.

    Args:
        settings_voice: The voice set in the adapter's own settings (None: not set).
        **aliases: The keywords as given, e.g. ``voice=..., voice_id=...`` (None: not given).

    Returns:
        The voice, or None when none was given.

    Raises:
        InvalidInputError: Two of them name different voices.
    """
    given = {name: value for name, value in aliases.items() if value is not None}
    if settings_voice is not None:
        given["settings.voice"] = settings_voice
    voices = set(given.values())
    if len(voices) > 1:
        shown = ", ".join(f"{name}={value!r}" for name, value in given.items())
        raise InvalidInputError(f"conflicting voices ({shown}); give the voice once")
    return voices.pop() if voices else None


def check_max_lead_s(value: Any) -> float | None:
    """``max_lead_s``: seconds of audio an utterance may be generated ahead of playback.

    Returns:
        The value as a float, or None (no limit).

    Raises:
        InvalidInputError: Not a positive number nor None.
    """
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise InvalidInputError(
            f"max_lead_s={value!r} is invalid; use a number of seconds > 0 (e.g. 3.0), or None for no limit"
        )
    return float(value)


class EngineLoader:
    """Loads the process-wide shared engine in a background thread, once at a time.

    Neither the event loop nor the framework's pipeline start waits for the load. A failed load is
    reported to whoever waits for it, and the next `get` tries again (the files may have appeared).
    """

    def __init__(self, engine_args: dict[str, Any], engine: TTSBackend | None = None) -> None:
        self._engine_args = engine_args
        self._engine = engine
        self._future: concurrent.futures.Future[TTSBackend] | None = None
        self._lock = threading.Lock()

    @property
    def engine(self) -> TTSBackend | None:
        """The backend, once loaded (None until then)."""
        return self._engine

    @property
    def loading(self) -> bool:
        """Whether a load is under way."""
        future = self._future
        return self._engine is None and future is not None and not future.done()

    def start(self) -> None:
        """Start loading (nothing if loaded or loading); returns at once."""
        with self._lock:
            if self._engine is not None:
                return
            if self._future is not None and not (
                self._future.done() and self._future.exception() is not None
            ):
                return
            future: concurrent.futures.Future[TTSBackend] = concurrent.futures.Future()
            future.set_running_or_notify_cancel()
            self._future = future
        threading.Thread(target=self._load, args=(future,), name="kyutai-tts-load", daemon=True).start()

    def _load(self, future: concurrent.futures.Future[TTSBackend]) -> None:
        try:
            # Looked up at call time, so that tests can hold the load.
            from . import engine as engine_module

            future.set_result(engine_module.shared_engine(**self._engine_args))
        except BaseException as exc:  # handed to whoever waits for the engine
            future.set_exception(exc)

    async def get(self) -> TTSBackend:
        """Wait (without blocking the event loop) until the engine is loaded; a failed load is retried.

        Raises:
            Exception: The load failed (the loader's own error, e.g. a missing file).
        """
        if self._engine is not None:
            return self._engine
        self.start()
        assert self._future is not None
        # shield: a cancelled waiter (an interruption) must not cancel the shared load.
        engine = await asyncio.shield(asyncio.wrap_future(self._future))
        self._engine = engine
        return engine


async def slot_taken(session: TTSSession) -> None:
    """Return once the backend serves `session`, or once it ended (its iteration says why).

    An in-process session waits in the engine's queue until the worker admits it (``run`` set); a
    `RemoteSession` until its server's ``Ready`` (sent once the server's engine holds a slot for it).
    Bound the wait to bound how long a request may queue (LiveKit's ``conn_options.timeout``).
    """
    wait_ready = getattr(session, "wait_ready", None)
    if wait_ready is not None:
        await wait_ready()
        return
    if not hasattr(session, "run"):
        return
    while getattr(session, "run", None) is None and not getattr(session, "is_finished", False):
        await asyncio.sleep(_SLOT_POLL_S)
