"""The published hyper-parameters of `kyutai/tts-1.6b-en_fr` (its config.json model keys).

Used to build the real-size network on the `meta` device (inventory checks) or with random weights
(speed benchmarks) when the real files are not at hand.
"""

from __future__ import annotations

from typing import Any

REAL_FUSER: dict[str, Any] = {
    "cross_attention_pos_emb": True,
    "cross_attention_pos_emb_scale": 1,
    "sum": ["control", "cfg"],
    "prepend": [],
    "cross": ["speaker_wavs"],
}

REAL_LM_CONFIG: dict[str, Any] = {
    "card": 2048,
    "n_q": 32,
    "dep_q": 32,
    "delays": [0, 0] + [2] * 31,
    "dim": 2048,
    "text_card": 8000,
    "text_card_out": None,
    "existing_text_padding_id": 3,
    "num_heads": 16,
    "num_layers": 16,
    "hidden_scale": 4.125,
    "causal": True,
    "layer_scale": None,
    "context": 500,
    "max_period": 10000,
    "gating": "silu",
    "norm": "rms_norm_f32",
    "positional_embedding": "rope",
    "depformer_dim": 1024,
    "depformer_num_heads": 16,
    "depformer_num_layers": 4,
    "depformer_dim_feedforward": 3072,
    "depformer_multi_linear": True,
    "depformer_pos_emb": "none",
    "depformer_weights_per_step": True,
    "depformer_low_rank_embeddings": 128,
    "depformer_weights_per_step_schedule": list(range(8)) + [8] * 8 + [9] * 8 + [10] * 8,
    "cross_attention": True,
    "demux_second_stream": True,
    "conditioners": {
        "speaker_wavs": {"type": "tensor", "tensor": {"dim": 512}},
        "cfg": {
            "type": "lut",
            "lut": {
                "n_bins": 7,
                "dim": 16,
                "tokenizer": "noop",
                "possible_values": ["1.0", "1.5", "2.0", "2.5", "3.0", "3.5", "4.0"],
            },
        },
        "control": {
            "type": "lut",
            "lut": {"n_bins": 1, "dim": 2048, "tokenizer": "noop", "possible_values": ["ok"]},
        },
    },
    "fuser": REAL_FUSER,
}

# The whole config.json: the model keys plus the TTS, identity and file-name keys.
REAL_CONFIG_JSON: dict[str, Any] = REAL_LM_CONFIG | {
    "tts_config": {"audio_delay": 1.28, "second_stream_ahead": 2},
    "model_id": {"sig": "1e68beda", "epoch": 240},
    "model_type": "tts",
    "lm_gen_config": {"temp": 0.6, "text_temp": 0.6},
    "moshi_name": "dsm_tts_1e68beda@240.safetensors",
    "mimi_name": "tokenizer-e351c8d8-checkpoint125.safetensors",
    "tokenizer_name": "tokenizer_spm_8k_en_fr_audio.model",
}
