"""`RemoteTTS` against moshi-server's TTS protocol as its source defines it (tests/moshi_server_fake.py):
directly, in a real Pipecat pipeline and through the LiveKit TTS. No model: the fake speaks sines.

moshi-server ends every session with a close frame carrying no status code and no end message; a
client must take that as the end of a complete stream once it has sent Eos, and as an error before.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgpack
import numpy as np
import pytest
from livekit.agents import APIConnectionError, APIError
from pipecat.frames.frames import (
    ErrorCategory,
    ErrorFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
)

from kyutai_tts_plugin.errors import EngineFullError
from kyutai_tts_plugin.livekit import TTS as LiveKitTTS
from kyutai_tts_plugin.remote import RemoteError, RemoteErrorKind, RemoteTTS
from kyutai_tts_plugin.types import AudioChunk, SessionEvent, SessionOptions, WordTiming

from .moshi_server_fake import DEFAULT_VOICE, FakeMoshiServer, preprocess
from .test_livekit import NO_RETRY, run_stream, timed_words
from .test_pipecat import Bot, audio_of, pcm16, run_bot, tokens_of

KEY = "public_token"  # Unmute's configs/tts.toml authorized_ids
TEXT = "Hello there, friend! It costs 42 dollars, or 3.5 euros. Shall we go now? Yes, we shall go."
HANG_GUARD_S = 60.0  # only a failure detector: every wait below ends on an event


@pytest.fixture
async def moshi() -> AsyncIterator[FakeMoshiServer]:
    async with FakeMoshiServer() as server:
        yield server


async def collect(session: Any) -> list[SessionEvent]:
    async def run() -> list[SessionEvent]:
        return [event async for event in session]

    return await asyncio.wait_for(run(), HANG_GUARD_S)


def speak(remote: RemoteTTS, fragments: list[str], options: SessionOptions | None = None) -> Any:
    session = remote.open_session(options)
    for fragment in fragments:
        session.push_text(fragment)
    session.flush()
    return session


def audio(events: list[SessionEvent]) -> np.ndarray:
    chunks = [e.pcm for e in events if isinstance(e, AudioChunk)]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def words(events: list[SessionEvent]) -> list[WordTiming]:
    return [e for e in events if isinstance(e, WordTiming)]


async def only_session(server: FakeMoshiServer) -> Any:
    assert len(server.sessions) == 1
    session = server.sessions[0]
    await asyncio.wait_for(session.done.wait(), HANG_GUARD_S)
    return session


# -- what the client library sees ------------------------------------------------------------------


async def test_aiohttp_sees_an_empty_close_frame_as_code_0(moshi: FakeMoshiServer) -> None:
    """The fact `RemoteTTS` relies on: aiohttp reports moshi-server's close frame (no status code) as a
    CLOSE message with data 0; its own close handshake then ends with 1006 (the server drops the TCP
    connection after the client's reply, as tokio-tungstenite does)."""
    async with aiohttp.ClientSession() as http:
        url = f"{moshi.url}/api/tts_streaming?format=PcmMessagePack"
        async with http.ws_connect(url, headers={"kyutai-api-key": KEY}, autoclose=True) as ws:
            await ws.send_bytes(msgpack.packb({"type": "Eos"}))  # no text: moshi-server closes at once
            first = await asyncio.wait_for(ws.receive(), HANG_GUARD_S)
            assert msgpack.unpackb(first.data) == {"type": "Ready"}
            end = await asyncio.wait_for(ws.receive(), HANG_GUARD_S)
            assert end.type == aiohttp.WSMsgType.CLOSE and end.data == 0
            assert ws.close_code == 1006
    fake = await only_session(moshi)
    assert fake.sent == [{"type": "Ready"}] and fake.ended == "close"


# -- RemoteTTS directly ---------------------------------------------------------------------------


async def test_a_whole_utterance_ends_without_error_on_moshi_servers_empty_close(
    moshi: FakeMoshiServer,
) -> None:
    session = speak(RemoteTTS(moshi.url, api_key=KEY), tokens_of(TEXT))
    events = await collect(session)  # raised RemoteError (code 1006) before the fix

    fake = await only_session(moshi)
    assert fake.ended == "close"  # the empty close frame, after the last word's timing
    assert fake.eos and fake.words == preprocess(TEXT)
    # Every sample, in order, exactly (float32 in msgpack), on a contiguous timeline.
    assert np.array_equal(audio(events), fake.audio)
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert [c.start_s for c in chunks] == [i * 1920 / 24000 for i in range(len(chunks))]
    # Every word timing the server sent, with the pushed text each one accounts for.
    got = words(events)
    assert [(w.word, w.start_s, w.end_s) for w in got] == fake.timings
    assert "".join(w.text for w in got) == TEXT
    assert [w.text.strip() for w in got] == TEXT.split()
    # The last message before the close is the last word's timing: it was delivered.
    assert fake.sent[-1]["type"] == "Text" and got[-1].word == fake.sent[-1]["text"]


async def test_the_query_and_key_are_what_moshi_server_reads(moshi: FakeMoshiServer) -> None:
    voice = "expresso/ex03-ex01_happy_001_channel1_334s.wav"
    await collect(speak(RemoteTTS(moshi.url, api_key=KEY), ["one two"], SessionOptions(voice=voice)))
    fake = await only_session(moshi)
    assert fake.query["format"] == "PcmMessagePack" and fake.query["voice"] == voice
    assert "auth_id" not in fake.query  # the key travels in the kyutai-api-key header
    assert fake.voice == voice


async def test_an_unknown_voice_falls_back_to_the_default_without_a_word(moshi: FakeMoshiServer) -> None:
    events = await collect(
        speak(RemoteTTS(moshi.url, api_key=KEY), ["one two"], SessionOptions(voice="nobody"))
    )
    fake = await only_session(moshi)
    assert fake.voice == DEFAULT_VOICE and fake.ended == "close"
    assert np.array_equal(audio(events), fake.audio) and len(words(events)) == 2


async def test_eos_without_text_is_a_normal_empty_end(moshi: FakeMoshiServer) -> None:
    events = await collect(speak(RemoteTTS(moshi.url, api_key=KEY), ["  ", "\n"]))
    fake = await only_session(moshi)
    assert events == [] and fake.eos and fake.ended == "close" and not fake.pcm


async def test_a_wrong_key_is_refused_before_the_websocket(moshi: FakeMoshiServer) -> None:
    with pytest.raises(RemoteError, match="unauthorized") as refused:
        await collect(speak(RemoteTTS(moshi.url, api_key="wrong"), ["hello"]))
    assert refused.value.code == "unauthorized" and moshi.sessions == []
    assert refused.value.kind is RemoteErrorKind.BAD_REQUEST  # the same key fails the same way


async def test_no_free_channels_is_engine_full() -> None:
    async with FakeMoshiServer(batch_size=1) as server:
        remote = RemoteTTS(server.url, api_key=KEY)
        hog = remote.open_session()
        hog.push_text("still talking ")
        while not server.sessions:  # the hog holds the only channel once the server has it
            await asyncio.sleep(0.005)
        with pytest.raises(EngineFullError, match="no free channels"):
            await collect(speak(remote, ["hello"]))
        assert server.refused == 1
        hog.cancel()
        await collect(hog)


@pytest.mark.parametrize(
    ("end_how", "flush", "match", "kind"),
    [
        # moshi-server's own close (no status) while the client has not sent Eos: text left unspoken
        ("close", False, r"no status code\) before the end of the text", RemoteErrorKind.REFUSED),
        # after Eos, a close with an error code, or a connection lost without a close frame
        ("close 1011", True, r"code 1011", RemoteErrorKind.REFUSED),
        ("drop", True, "connection to the server was lost", RemoteErrorKind.CONNECTION_LOST),
    ],
)
async def test_a_close_in_the_middle_of_a_stream_is_an_error(
    end_how: str, flush: bool, match: str, kind: RemoteErrorKind
) -> None:
    async with FakeMoshiServer(end_after_frames=4, end_how=end_how) as server:
        session = RemoteTTS(server.url, api_key=KEY).open_session()
        session.push_text(TEXT)  # whole words are sent; the last one waits for the flush
        if flush:
            session.flush()
        got: list[SessionEvent] = []
        with pytest.raises(RemoteError, match=match) as failed:
            async for event in session:
                got.append(event)
        assert failed.value.kind is kind
        fake = await only_session(server)
        assert fake.ended == end_how
        assert np.array_equal(audio(got), fake.audio)  # what came before the close was delivered


async def test_malformed_server_message_is_an_error_not_a_normal_end() -> None:
    # A close after Eos is normal only if nothing went wrong before it.
    class Garbling(FakeMoshiServer):
        async def _handle(self, request: Any) -> Any:
            from aiohttp import web

            ws = web.WebSocketResponse(autoclose=False)
            await ws.prepare(request)
            await ws.send_bytes(msgpack.packb({"type": "Ready"}))
            await ws.send_bytes(b"\xc1")  # never valid msgpack
            await self._close(request, ws, "close", None)
            return ws

    async with Garbling() as server:
        with pytest.raises(RemoteError, match="malformed") as failed:
            await collect(speak(RemoteTTS(server.url, api_key=KEY), ["hello"]))
        assert failed.value.kind is RemoteErrorKind.REFUSED


# -- Pipecat: KyutaiTTSService(engine=RemoteTTS(url)) in a real pipeline ----------------------------


async def test_pipecat_pipeline_over_moshi_server_speaks_all_audio_and_words(moshi: FakeMoshiServer) -> None:
    tokens = tokens_of(TEXT)

    async def script(bot: Bot) -> None:
        await bot.say()
        await bot.recorder.wait_for(lambda: bool(bot.recorder.down(TTSStoppedFrame)), "the stop frame")

    bot = await run_bot(RemoteTTS(moshi.url, api_key=KEY), [tokens], script)
    fake = await only_session(moshi)
    rec = bot.recorder
    assert not rec.up(ErrorFrame) and not rec.down(ErrorFrame)
    assert len(rec.down(TTSStartedFrame)) == 1 and len(rec.down(TTSStoppedFrame)) == 1
    assert audio_of(rec.down(TTSAudioRawFrame)) == pcm16(fake.audio)
    assert [f.text for f in rec.down(TTSTextFrame)] == TEXT.split()
    assert bot.assistant_messages() == [TEXT]


async def test_pipecat_close_mid_stream_is_an_error_frame() -> None:
    async with FakeMoshiServer(end_after_frames=4, end_how="drop") as server:

        async def script(bot: Bot) -> None:
            await bot.say()
            await bot.recorder.wait_for(lambda: bool(bot.recorder.up(ErrorFrame)), "the error frame")

        bot = await run_bot(RemoteTTS(server.url, api_key=KEY), [tokens_of(TEXT)], script)
        errors = bot.recorder.up(ErrorFrame)
        assert len(errors) == 1 and "connection to the server was lost" in errors[0].error
        assert errors[0].category is ErrorCategory.CONNECTIVITY  # from the error's kind


# -- LiveKit: kyutai_tts_plugin.livekit.TTS(engine=RemoteTTS(url)) --------------------------------


async def test_livekit_stream_over_moshi_server_has_all_audio_and_words(moshi: FakeMoshiServer) -> None:
    tts = LiveKitTTS(engine=RemoteTTS(moshi.url, api_key=KEY))
    events = await asyncio.wait_for(run_stream(tts, tokens_of(TEXT)), HANG_GUARD_S)
    fake = await only_session(moshi)
    assert events and events[-1].is_final and [ev.is_final for ev in events].count(True) == 1
    pcm = np.concatenate([np.frombuffer(ev.frame.data, dtype=np.int16) for ev in events])
    expected = np.frombuffer(pcm16(fake.audio), dtype=np.int16)
    assert np.array_equal(pcm[: len(expected)], expected)
    assert not pcm[len(expected) :].any()  # at most the emitter's final marker of silence
    got = timed_words(events)
    assert "".join(got) == TEXT
    assert [(w.start_time, w.end_time) for w in got] == [(t[1], t[2]) for t in fake.timings]


async def test_livekit_close_mid_stream_is_an_api_error() -> None:
    async with FakeMoshiServer(end_after_frames=4, end_how="close 1011") as server:
        tts = LiveKitTTS(engine=RemoteTTS(server.url, api_key=KEY))
        with pytest.raises(APIError, match="code 1011") as failed:
            await asyncio.wait_for(run_stream(tts, tokens_of(TEXT), conn_options=NO_RETRY), HANG_GUARD_S)
        assert not isinstance(failed.value, APIConnectionError)
