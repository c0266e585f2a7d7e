"""Llama architectures the benchmark scripts build from config (random weights, nothing downloaded).

Values from the models' config.json files (meta-llama/Llama-3.2-1B, meta-llama/Meta-Llama-3-8B);
``110m`` is a small Llama of about 110M parameters (untied embeddings) for CPU timings.
"""

_LLAMA_3_COMMON = dict(
    vocab_size=128256,
    num_attention_heads=32,
    num_key_value_heads=8,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    hidden_act="silu",
    bos_token_id=128000,
    eos_token_id=128001,
)

LLAMA_3_2_1B = dict(
    _LLAMA_3_COMMON,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    head_dim=64,
    max_position_embeddings=131072,
    rope_scaling={
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    tie_word_embeddings=True,
)

LLAMA_3_8B = dict(
    _LLAMA_3_COMMON,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    head_dim=128,
    max_position_embeddings=8192,
    tie_word_embeddings=False,
)

LLAMA_110M = dict(
    vocab_size=16000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=12,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)

CONFIGS = {"110m": LLAMA_110M, "1b": LLAMA_3_2_1B, "8b": LLAMA_3_8B}
