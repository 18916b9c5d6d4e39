"""A Kyutai TTS bot you hear in your browser, over Pipecat's SmallWebRTC transport.

    python examples/pipecat_webrtc_bot.py            # then open http://localhost:7860
    python examples/pipecat_webrtc_bot.py --model /path/to/checkpoint --voice-repo /path/to/voices

The page connects to the bot (peer to peer, no server in between), the bot greets you, and each
message you type is answered by the LLM (an OpenAI-compatible one when ``OPENAI_API_KEY`` is set, see
``pipecat_bot.py``; a scripted one otherwise) and spoken by Kyutai TTS as the tokens stream in. Add an
STT service after ``transport.input()`` (with ``audio_in_enabled=True``) to talk to it instead.

The web server is aiohttp: ``GET /`` serves ``pipecat_webrtc_client.html``, ``POST /api/offer``
answers the page's WebRTC offer and starts one bot per connection. ``/?autoconnect=1`` connects
without a click (for headless browsers).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from aiohttp import web
from loguru import logger
from pipecat.frames.frames import LLMMessagesAppendFrame, TTSSpeakFrame
from pipecat.observers.base_observer import BaseObserver
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pipecat.workers.runner import WorkerRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipecat_bot import SYSTEM_PROMPT, make_llm  # noqa: E402

from kyutai_tts_plugin import KyutaiTTSError  # noqa: E402
from kyutai_tts_plugin.hardware import resolve_device  # noqa: E402
from kyutai_tts_plugin.pipecat import KyutaiTTSService  # noqa: E402

PAGE = Path(__file__).resolve().parent / "pipecat_webrtc_client.html"
GREETING = "Hello! I am a Kyutai voice. Type a message and I will answer it."


async def run_bot(
    connection: SmallWebRTCConnection,
    tts: KyutaiTTSService,
    *,
    greeting: str = GREETING,
    observers: Sequence[BaseObserver] = (),
) -> None:
    """Run one bot for one browser connection, until the browser leaves.

    Args:
        connection: The answered WebRTC connection.
        tts: The TTS service for this bot (the engine behind it is shared).
        greeting: What the bot says once the browser is connected.
        observers: Pipeline observers (metrics, logs, tests).
    """
    transport = SmallWebRTCTransport(
        webrtc_connection=connection,
        params=TransportParams(audio_in_enabled=False, audio_out_enabled=True),
    )
    context = LLMContext([{"role": "system", "content": SYSTEM_PROMPT}])
    aggregators = LLMContextAggregatorPair(context)
    pipeline = Pipeline(
        [transport.input(), aggregators.user(), make_llm(), tts, transport.output(), aggregators.assistant()]
    )
    worker = PipelineWorker(
        pipeline,
        params=PipelineParams(enable_metrics=True, enable_usage_metrics=True),
        observers=list(observers),
    )

    @transport.event_handler("on_client_connected")
    async def on_client_connected(transport: SmallWebRTCTransport, client: object) -> None:
        await worker.queue_frame(TTSSpeakFrame(greeting))

    @transport.event_handler("on_app_message")
    async def on_app_message(transport: SmallWebRTCTransport, message: object, sender: object) -> None:
        # The page sends {"type": "user-text", "text": ...} for each message typed.
        if isinstance(message, dict) and message.get("type") == "user-text" and message.get("text"):
            user = [{"role": "user", "content": str(message["text"])}]
            await worker.queue_frame(LLMMessagesAppendFrame(user, run_llm=True))

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(transport: SmallWebRTCTransport, client: object) -> None:
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await runner.run()


def build_app(
    make_tts: Callable[[], KyutaiTTSService],
    *,
    greeting: str = GREETING,
    make_observers: Callable[[], Sequence[BaseObserver]] = tuple,
) -> web.Application:
    """The web app: the page, and one bot per WebRTC offer.

    Args:
        make_tts: Builds the TTS service of each new bot.
        greeting: What each bot says first.
        make_observers: Builds the pipeline observers of each new bot.

    Returns:
        The aiohttp application.
    """
    bots: set[asyncio.Task[None]] = set()

    async def page(request: web.Request) -> web.FileResponse:
        return web.FileResponse(PAGE)

    async def offer(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or body.get("type") != "offer" or not body.get("sdp"):
            raise web.HTTPBadRequest(text='expected a JSON WebRTC offer: {"type": "offer", "sdp": "..."}')
        connection = SmallWebRTCConnection()
        await connection.initialize(sdp=body["sdp"], type="offer")
        task = asyncio.create_task(
            run_bot(connection, make_tts(), greeting=greeting, observers=make_observers())
        )
        bots.add(task)
        task.add_done_callback(bots.discard)
        return web.json_response(connection.get_answer())

    async def stop_bots(app: web.Application) -> None:
        for task in list(bots):
            task.cancel()
        await asyncio.gather(*bots, return_exceptions=True)

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_post("/api/offer", offer)
    app.on_cleanup.append(stop_bots)
    return app


def main() -> None:
    """Serve the page and the bots."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--model", help="checkpoint: Hugging Face repo id or local directory")
    parser.add_argument("--voice-repo", help="voices: Hugging Face repo id or local directory")
    parser.add_argument("--voice", help="voice name, e.g. vctk/p225_023.wav")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help="torch CPU threads (default: all cores but one, which the pipeline needs)",
    )
    args = parser.parse_args()
    try:
        resolve_device(args.device)  # a device this machine lacks: say so now, in one line
    except KyutaiTTSError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")

    def make_tts() -> KyutaiTTSService:
        # Every bot gets its own service; they all share the one engine loaded for these arguments.
        return KyutaiTTSService(
            model=args.model,
            voice_repo=args.voice_repo,
            device=args.device,
            dtype="bfloat16" if args.device.startswith("cuda") else "float32",
            engine_kwargs={"num_threads": args.threads},
            settings=KyutaiTTSService.Settings(voice=args.voice),
        )

    # Start loading the model now, so the first visitor does not wait for it, and say how it went.
    first = make_tts()

    async def report_loading(app: web.Application) -> None:
        async def report() -> None:
            try:
                await first.wait_until_ready()
            except KyutaiTTSError as e:
                logger.error(f"the TTS model could not be loaded, the bots will not speak: {e}")
            else:
                logger.info("the TTS model is loaded")

        app["report_loading"] = asyncio.create_task(report())

    app = build_app(make_tts)
    app.on_startup.append(report_loading)
    logger.info(f"open http://{args.host}:{args.port} in a browser")
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
