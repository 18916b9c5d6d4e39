"""bfloat16 parity tier: our engine in bfloat16 against moshi 0.2.13 in bfloat16, greedy, 300 steps.

The float32 tier (test_engine_parity.py) is token-exact. In bfloat16 two correct implementations
cannot be exact: bfloat16 keeps 8 bits of mantissa, so the rounding of every matmul, softmax and
residual add depends on the order in which the sums are done (blocked GEMM vs. fused kernels, per-step
vs. batched projections, which intermediate is kept in float32). Greedy decoding turns a relative
logit difference of ~1e-2 into a different argmax wherever two logits are that close, and from the
first differing token the two runs are conditioned on different histories. So this tier reports how
far the two agree and asserts a floor (see `AGREEMENT_FLOOR`, `SNR_FLOOR_DB`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from moshi.models import loaders
from moshi.models.tts import TTSModel

from kyutai_tts_plugin.engine import TTSEngine
from kyutai_tts_plugin.testing import StepRecorder
from kyutai_tts_plugin.types import SessionOptions

from .moshi_oracle import VOICES, MoshiCheckpoint, build_moshi_checkpoint
from .test_engine_parity import collect, long_text, our_frames

STEPS = 300  # compared steps (frames in moshi's layout): 24 s of audio
N_Q = 32
# Measured 2026-12-02, torch 2.13 CPU, checkpoint seeds 0 and 1 (text seeds 10, 11): token agreement
# 7.8 % and 8.9 %, first differing step 16 both times, PCM SNR 14.5 and 28.9 dB. The 16 text-only steps
# (backbone and text head alone) are equal; the runs part at the first audio token, the depformer's
# first argmax over 2048 entries. Likely cause (not measured): this checkpoint's weights are
# N(0, 0.5), so its logits are large, bfloat16's step grows with magnitude, and near-ties between top
# entries are common; from the first differing token on, each run feeds back its own history.
# What remains equal after that is mostly the text stream (padding and word actions).
# The floors: the text-only steps must be exact (a wrong cast or a float32-only op in the bfloat16
# backbone breaks them at step 0), agreement above 5 % (a run that loses the text state machine falls
# to the ~0.05 % of chance over 2048-entry codebooks on 32 of 33 streams), and an SNR above 6 dB.
TEXT_ONLY_STEPS = 16
AGREEMENT_FLOOR = 0.05
SNR_FLOOR_DB = 6.0


def load_moshi_bf16(ckpt: MoshiCheckpoint, n_q: int) -> TTSModel:
    info = loaders.CheckpointInfo.from_hf_repo(
        "local/test",
        moshi_weights=ckpt.root / ckpt.config["moshi_name"],
        mimi_weights=ckpt.root / ckpt.config["mimi_name"],
        tokenizer=ckpt.root / ckpt.config["tokenizer_name"],
        config_path=ckpt.root / "config.json",
        mimi_config_path=ckpt.root / ckpt.config["mimi_config_name"],
    )
    return TTSModel.from_checkpoint_info(info, n_q=n_q, temp=0.0, device="cpu", dtype=torch.bfloat16)


def snr_db(ours: np.ndarray, ref: np.ndarray) -> float:
    noise = float(np.sum((ours.astype(np.float64) - ref) ** 2))
    signal = float(np.sum(ref.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10.0 * np.log10(signal / noise)


def bf16_agreement(root, seed: int) -> tuple[float, int, float]:
    """(token agreement, first differing step or -1, PCM SNR in dB) over the first `STEPS` steps."""
    ckpt = build_moshi_checkpoint(root, seed=seed)
    text = long_text(40, seed=10 + seed)
    tts = load_moshi_bf16(ckpt, N_Q)
    entries = tts.prepare_script([text], padding_between=1)
    attrs = tts.make_condition_attributes([ckpt.voice_path(VOICES[0])], cfg_coef=2.0)
    result = tts.generate([entries], [attrs])
    ref_frames = np.array([f[0, :, 0].tolist() for f in result.frames[:STEPS]])
    assert len(ref_frames) == STEPS, "the text must give at least 300 steps"

    engine = TTSEngine.from_pretrained(
        ckpt.root, voice_repo=ckpt.voices_dir, dtype="bfloat16", max_sessions=1, default_voice=VOICES[0]
    )
    try:
        with StepRecorder(engine) as rec:
            session = engine.open_session(SessionOptions(n_q=N_Q, temperature=0.0, cfg_coef=2.0))
            session.push_text(text)
            session.flush()
            chunks, _ = collect(session)
            ours = np.array(our_frames(rec.of(session), N_Q)[:STEPS])
    finally:
        engine.close()
    # A run that ends early (a divergence that ends speech sooner) counts its missing steps as wrong.
    same = np.zeros_like(ref_frames, dtype=bool)
    same[: len(ours)] = ours == ref_frames[: len(ours)]
    differing = np.flatnonzero(~same.all(axis=1))
    first_diff = int(differing[0]) if len(differing) else -1

    # PCM of the same frames: moshi's tokens through its own (float32) streaming Mimi decoder.
    delay = 16  # audio frames start after the 16 text-only steps (see test_engine_parity)
    with tts.mimi.streaming(1), torch.no_grad():
        ref_pcm = [
            tts.mimi.decode(f[:, 1:, :]).clamp(-1, 1)[0, 0].numpy() for f in result.frames[delay:STEPS]
        ]
    n = min(len(ref_pcm), len(chunks))
    ref = np.concatenate(ref_pcm)
    got = np.zeros_like(ref)
    got[: n * len(ref_pcm[0])] = np.concatenate(chunks[:n])
    return float(same.mean()), first_diff, snr_db(got, ref)


@pytest.mark.parametrize("seed", [0])
def test_bf16_greedy_agrees_with_moshi_bf16(tmp_path, seed):
    agreement, first_diff, snr = bf16_agreement(tmp_path / f"ckpt{seed}", seed)
    print(
        f"bfloat16 vs moshi bfloat16, seed {seed}, {STEPS} steps, n_q {N_Q}: token agreement "
        f"{agreement:.2%}, first differing step {first_diff}, PCM SNR {snr:.1f} dB"
    )
    assert first_diff == -1 or first_diff >= TEXT_ONLY_STEPS, first_diff
    assert agreement >= AGREEMENT_FLOOR, (agreement, first_diff)
    assert snr >= SNR_FLOOR_DB, snr
