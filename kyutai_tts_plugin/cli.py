"""`kyutai-tts`: synthesize a WAV file, list voices, or write a tiny test checkpoint."""

from __future__ import annotations

import argparse
import json
import os
import sys
import wave
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

# Only light imports here: torch and the Hub client load inside main(), where Ctrl-C is handled.
from .errors import InvalidInputError, KyutaiTTSError

if TYPE_CHECKING:
    import numpy as np

PROG = "kyutai-tts"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = _parser()
        args, unknown = parser.parse_known_args(argv)
        if unknown and args.run is not _serve_missing:  # without the extra, serve's options are unknown
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        return int(args.run(args))
    except KyutaiTTSError as e:
        # Our errors already say what went wrong and what to do: one line, no traceback.
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # unreadable --text-file, unwritable --out, ...
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, even while torch is still importing
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _parser() -> argparse.ArgumentParser:
    from .checkpoint import DEFAULT_VOICE_REPO

    parser = argparse.ArgumentParser(
        prog=PROG, description="Kyutai streaming TTS (kyutai/tts-1.6b-en_fr, kyutai/tts-0.75b-en-public)."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    syn = sub.add_parser("synthesize", help="speak a text into a WAV file (24 kHz, mono, 16-bit)")
    _model_args(syn)
    syn.add_argument(
        "--voice",
        help="voice name (default: the engine's default voice); for a model that takes audio prompts "
        "(kyutai/tts-0.75b-en-public) also a WAV, FLAC or MP3 file of the speaker to clone (1 to 20 s; "
        "only with the speaker's consent)",
    )
    text = syn.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="the text to speak")
    text.add_argument("--text-file", type=Path, help="read the text from this UTF-8 file")
    syn.add_argument("--out", type=Path, required=True, help="output WAV file")
    syn.add_argument("--timings", type=Path, help="write word timings as JSON [{word, start, end}]")
    syn.add_argument("--n-q", type=int, help="audio codebooks to generate (default: all, 32 or 16)")
    syn.add_argument("--temperature", type=float, help="sampling temperature, 0 = greedy (default 0.6)")
    syn.add_argument(
        "--cfg", type=float, help="CFG coefficient, 1.0..4.0 by 0.5 for the 1.6B model (default 2.0)"
    )
    syn.add_argument("--seed", type=int, help="random seed for reproducible output")
    syn.add_argument("--padding-bonus", type=float, help="> 0 speaks slower, < 0 faster (default 0)")
    add_engine_arguments(syn)
    syn.set_defaults(run=_synthesize)

    voices = sub.add_parser("voices", help="list the available voices, one per line")
    voices.add_argument(
        "--model",
        help="list only the voices made for this checkpoint (Hugging Face repo or local directory); "
        "default: the voices of every model in the voice repo",
    )
    voices.add_argument(
        "--voice-repo",
        default=DEFAULT_VOICE_REPO,
        help=f"Hugging Face repo or local directory of voices ({DEFAULT_VOICE_REPO})",
    )
    voices.set_defaults(run=_voices)

    make = sub.add_parser(
        "make-test-checkpoint",
        help="write a tiny random-weight checkpoint (produces noise) for testing pipelines offline",
    )
    make.add_argument("directory", type=Path)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--force", action="store_true", help="write into a directory that is not empty")
    make.set_defaults(run=_make_test_checkpoint)

    serve = sub.add_parser(
        "serve", help="serve one engine to many agent workers (Kyutai moshi-server protocol)"
    )
    try:
        from .server import add_serve_arguments, run_serve
    except ImportError:  # aiohttp / msgpack come with the `server` extra
        serve.set_defaults(run=_serve_missing)
    else:
        add_serve_arguments(serve)
        serve.set_defaults(run=run_serve)
    return parser


def _serve_missing(args: argparse.Namespace) -> int:
    print(
        f"{PROG}: error: serve needs aiohttp and msgpack (the package's `server` extra): "
        "pip install aiohttp msgpack, or in a clone of this repository: pip install -e '.[server]'",
        file=sys.stderr,
    )
    return 2


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kyutai-tts-plugin")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "(not installed)"


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """Where and how the model runs: the engine options shared by `synthesize` and `serve`."""
    from .hardware import DTYPE_NAMES

    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPE_NAMES,
        metavar="DTYPE",
        help="weights and activations: float32 (default), bfloat16 (use it on a GPU), float16",
    )
    p.add_argument(
        "--quantize",
        choices=["int8"],
        help="int8 weights for the large projections: CPU speed mode, not bit-exact (best with bfloat16)",
    )
    p.add_argument("--num-threads", type=int, help="torch CPU threads (default: torch's choice)")


def engine_options(args: argparse.Namespace) -> dict[str, object]:
    """`TTSEngine.from_pretrained` keywords from the arguments of `add_engine_arguments`."""
    return {
        "device": args.device,
        "dtype": args.dtype,
        "quantize": args.quantize,
        "num_threads": args.num_threads,
    }


def _model_args(p: argparse.ArgumentParser) -> None:
    from .checkpoint import DEFAULT_MODEL_REPO, DEFAULT_VOICE_REPO

    p.add_argument(
        "--model",
        default=DEFAULT_MODEL_REPO,
        help=f"Hugging Face repo or local directory ({DEFAULT_MODEL_REPO})",
    )
    p.add_argument(
        "--voice-repo",
        default=DEFAULT_VOICE_REPO,
        help=f"Hugging Face repo or local directory of voices ({DEFAULT_VOICE_REPO})",
    )


def _synthesize(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .engine import TTSEngine
    from .types import SessionOptions

    text = args.text if args.text is not None else args.text_file.read_text(encoding="utf-8")
    if not text.strip():
        raise InvalidInputError("the text is empty: give the words to speak with --text or --text-file")
    for path in (args.out, args.timings):
        if path is not None:
            check_writable(path)
    given = {
        "voice": args.voice,
        "n_q": args.n_q,
        "temperature": args.temperature,
        "cfg_coef": args.cfg,
        "seed": args.seed,
        "padding_bonus": args.padding_bonus,
    }
    options = SessionOptions(**{k: v for k, v in given.items() if v is not None})
    options.validate()  # the model-independent checks, before loading the model; the engine does the rest
    engine = TTSEngine.from_pretrained(
        args.model, voice_repo=args.voice_repo, max_sessions=1, **engine_options(args)
    )
    bars: list[tqdm] = []  # created at the first frame, so that an early error prints no empty bar

    def on_chunk(chunk: object) -> None:
        if not bars:
            bars.append(tqdm(unit=" frames", desc="synthesizing", file=sys.stderr))
        bars[0].update(1)

    try:
        result = engine.synthesize(text, options, on_chunk=on_chunk)
    finally:
        for bar in bars:
            bar.close()
        engine.close()
    write_wav(args.out, result.pcm, result.sample_rate)
    if args.timings is not None:
        timings = [
            {"word": w.word, "start": round(w.start_s, 3), "end": round(w.end_s, 3)} for w in result.words
        ]
        args.timings.write_text(json.dumps(timings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    seconds = len(result.pcm) / result.sample_rate
    print(f"wrote {args.out} ({seconds:.2f} s, {len(result.words)} words)", file=sys.stderr)
    return 0


def check_writable(path: Path) -> None:
    """Fail before the model loads, not after a long synthesis, when an output cannot be written."""
    if path.is_dir():
        raise InvalidInputError(f"{path}: is a directory; give a file name, e.g. {path / 'out.wav'}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InvalidInputError(f"{path}: the directory {parent} does not exist; create it first")
    if not os.access(path if path.exists() else parent, os.W_OK):
        raise InvalidInputError(f"{path}: not writable (permission denied); choose another path")


def write_wav(path: Path, pcm: np.ndarray, sample_rate: int) -> None:
    """16-bit mono WAV with the standard library."""
    import numpy as np

    samples = (np.clip(np.asarray(pcm, dtype=np.float32), -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(samples.tobytes())


def _voices(args: argparse.Namespace) -> int:
    from .checkpoint import VoiceLibrary, load_config

    # A voice file is made for one model (its name ends with the model's signature): with --model,
    # list that model's voices; without, every voice file of the repo.
    suffix = load_config(args.model).voice_suffix if args.model is not None else None
    for name in VoiceLibrary(args.voice_repo, suffix=suffix).list():
        print(name)
    return 0


def _make_test_checkpoint(args: argparse.Namespace) -> int:
    from .testing import make_test_checkpoint

    if args.directory.is_file():
        raise InvalidInputError(f"{args.directory}: is a file; give a directory for the checkpoint")
    if args.directory.is_dir() and any(args.directory.iterdir()) and not args.force:
        raise InvalidInputError(
            f"{args.directory}: is not empty; choose a new directory, or pass --force to write into it"
        )
    root = make_test_checkpoint(args.directory, seed=args.seed)
    print(
        f"Wrote a tiny test checkpoint to {root}\n"
        "It has random weights: produces noise, for testing pipelines offline.\n"
        "Use it with:\n"
        f"  {PROG} synthesize --model {root} --voice-repo {root / 'voices'} \\\n"
        '      --text "Hello world." --out out.wav\n'
        f'  TTSEngine.from_pretrained("{root}", voice_repo="{root / "voices"}")'
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
