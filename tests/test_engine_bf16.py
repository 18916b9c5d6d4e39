"""bfloat16 parity tier: our engine in bfloat16 against moshi 0.2.13 in bfloat16, greedy, 300 steps.

The float32 tier (test_engine_parity.py) is token-exact. In bfloat16 two correct implementations
cannot be: bfloat16 keeps 8 bits of mantissa, so the rounding of every matmul, softmax and residual
add depends on the order of the sums (blocked GEMM vs. fused kernels, which intermediate stays in
float32). Greedy decoding turns a relative logit difference of ~1e-2 into another argmax wherever two
logits are that close, and from there each run feeds back its own history.

So the yardstick is moshi's own bfloat16: both bfloat16 runs are compared with the exact (float32)
trajectory, which our float32 engine gives token for token (the float32 tier proves it), and ours
must stray from it no more than moshi's does, within a factor. Measured 2026-12-02, torch 2.13 CPU,
tiny checkpoints of seeds 0 and 1, n_q 8, 300 steps (what this test prints with `-s`): both
bfloat16 runs leave the float32 trajectory at step 16, the first audio token (the 16 text-only steps
are equal: the backbone and text head alone do not flip), moshi bfloat16 then agrees with it on
11.6 % / 16.9 % of tokens, ours on 18.3 % / 16.9 %, ours with moshi bfloat16 on 11.9 % / 17.3 %;
PCM SNR against the float32 audio 20.4 dB for both (seed 0).
The floors: the text-only steps equal (a wrong cast or a float32-only op in the bfloat16 backbone
breaks them at step 0); ours at least half as close to float32 as moshi's bfloat16 is (the free
runs are noisy after the first flip, but a bfloat16 path that loses the state machine or the
conditioning falls to chance, ~0.05 % on 2048-entry codebooks); ours with moshi bfloat16 above 5 %.
"""

from __future__ import annotations

import numpy as np
import torch
from moshi.models.tts import TTSModel

from kyutai_tts_plugin.engine import TTSEngine
from kyutai_tts_plugin.testing import StepRecorder
from kyutai_tts_plugin.types import SessionOptions

from .moshi_oracle import VOICES, MoshiCheckpoint, build_moshi_checkpoint
from .test_engine_parity import collect, long_text, our_frames

STEPS = 300  # compared steps (frames in moshi's layout): 24 s of audio
N_Q = 8
TEXT_ONLY_STEPS = 16  # steps before the first audio token (the checkpoint's delay)
RELATIVE_FLOOR = 0.5
AGREEMENT_FLOOR = 0.05


def moshi_bf16_frames(ckpt: MoshiCheckpoint, text: str) -> tuple[np.ndarray, TTSModel, list]:
    tts = ckpt.load_moshi(N_Q, 0.0, torch.bfloat16)
    tts.max_gen_length = STEPS + 4
    entries = tts.prepare_script([text], padding_between=1)
    attrs = tts.make_condition_attributes([ckpt.voice_path(VOICES[0])], cfg_coef=2.0)
    result = tts.generate([entries], [attrs])
    frames = np.array([f[0, :, 0].tolist() for f in result.frames[:STEPS]])
    assert len(frames) == STEPS, "the text must give at least 300 steps"
    return frames, tts, result.frames


def our_run(ckpt: MoshiCheckpoint, text: str, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    engine = TTSEngine.from_pretrained(
        ckpt.root, voice_repo=ckpt.voices_dir, dtype=dtype, max_sessions=1, default_voice=VOICES[0]
    )
    try:
        with StepRecorder(engine) as rec:
            session = engine.open_session(SessionOptions(n_q=N_Q, temperature=0.0, cfg_coef=2.0))
            session.push_text(text)
            session.flush()
            chunks, _ = collect(session)
            return np.array(our_frames(rec.of(session), N_Q)[:STEPS]), np.concatenate(chunks)
    finally:
        engine.close()


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """(share of equal tokens over STEPS steps, first differing step or -1); a run that ended early
    counts its missing steps as different."""
    same = np.zeros((STEPS, a.shape[1]), dtype=bool)
    n = min(len(a), len(b))
    same[:n] = a[:n] == b[:n]
    differing = np.flatnonzero(~same.all(axis=1))
    return float(same.mean()), int(differing[0]) if len(differing) else -1


def snr_db(got: np.ndarray, ref: np.ndarray) -> float:
    n = min(len(got), len(ref))
    ref64 = ref[:n].astype(np.float64)
    noise = float(np.sum((got[:n] - ref64) ** 2))
    return float("inf") if noise == 0 else 10.0 * np.log10(float(np.sum(ref64**2)) / noise)


def test_bf16_greedy_strays_from_float32_no_more_than_moshi_bf16(tmp_path):
    ckpt = build_moshi_checkpoint(tmp_path / "ckpt", seed=0)
    text = long_text(40, seed=10)
    exact, exact_pcm = our_run(ckpt, text, "float32")  # = moshi float32, token for token
    ref, tts, ref_frames = moshi_bf16_frames(ckpt, text)
    ours, ours_pcm = our_run(ckpt, text, "bfloat16")

    ref_vs_exact, ref_first = agreement(ref, exact)
    ours_vs_exact, ours_first = agreement(ours, exact)
    ours_vs_ref, first = agreement(ours, ref)
    with tts.mimi.streaming(1), torch.no_grad():  # moshi's tokens through its float32 Mimi
        audio_frames = ref_frames[TEXT_ONLY_STEPS:STEPS]
        ref_pcm = np.concatenate([tts.mimi.decode(f[:, 1:]).clamp(-1, 1)[0, 0].numpy() for f in audio_frames])
    print(
        f"bfloat16, {STEPS} steps, n_q {N_Q}: token agreement with float32: moshi {ref_vs_exact:.1%} "
        f"(first difference at step {ref_first}), ours {ours_vs_exact:.1%} (step {ours_first}); ours "
        f"with moshi bfloat16 {ours_vs_ref:.1%} (step {first}); PCM SNR vs float32: moshi "
        f"{snr_db(ref_pcm, exact_pcm):.1f} dB, ours {snr_db(ours_pcm, exact_pcm):.1f} dB; ours vs moshi "
        f"bfloat16 {snr_db(ours_pcm, ref_pcm):.1f} dB"
    )
    assert first == -1 or first >= TEXT_ONLY_STEPS, first
    assert ours_first == -1 or ours_first >= TEXT_ONLY_STEPS, ours_first
    assert ours_vs_exact >= RELATIVE_FLOOR * ref_vs_exact, (ours_vs_exact, ref_vs_exact)
    assert ours_vs_ref >= AGREEMENT_FLOOR, ours_vs_ref
