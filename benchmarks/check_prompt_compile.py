"""The 0.75B layout (audio-prompt voices, real CFG) with compile=True: same tokens as eager.

A tiny random checkpoint in that layout (tests/moshi_oracle.py); three sessions (CFG greedy, CFG
seeded and sampled, no CFG), eager then compiled; then one bfloat16 session. Run from the repository
root: ``PYTHONPATH=. python benchmarks/check_prompt_compile.py`` (CPU compilation takes minutes).
"""

import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

from kyutai_tts_plugin.engine import TTSEngine  # noqa: E402
from kyutai_tts_plugin.testing import StepRecorder  # noqa: E402
from kyutai_tts_plugin.types import SessionOptions  # noqa: E402
from tests.moshi_oracle import VOICES, build_moshi_prefix_checkpoint  # noqa: E402

ck = build_moshi_prefix_checkpoint(Path(tempfile.mkdtemp()) / "ckpt")
out = {}
for comp in (False, True):
    eng = TTSEngine.from_pretrained(
        ck.root, voice_repo=ck.voices_dir, default_voice=VOICES[0], max_sessions=2, compile=comp
    )
    with StepRecorder(eng) as rec:
        t = time.time()
        toks = []
        for opts in (
            dict(cfg_coef=2.0, temperature=0.0),
            dict(cfg_coef=3.0, temperature=0.6, seed=5),
            dict(cfg_coef=1.0, temperature=0.0),
        ):
            s = eng.open_session(SessionOptions(**opts))
            s.push_text("a compiled cloned voice")
            s.flush()
            list(s)
            toks.append(rec.tokens(s))
        print("compile", comp, f"{time.time() - t:.1f} s")
    out[comp] = toks
    eng.close()
print("tokens equal, compiled vs eager:", [a == b for a, b in zip(out[False], out[True], strict=True)])
eng = TTSEngine.from_pretrained(
    ck.root, voice_repo=ck.voices_dir, default_voice=VOICES[0], max_sessions=2, dtype="bfloat16"
)
r = eng.synthesize("bfloat16 works too", SessionOptions(cfg_coef=2.0, temperature=0.6, seed=1))
print("bfloat16:", r.pcm.shape, [w.word for w in r.words])
eng.close()
