"""Run configuration: the pydantic schema (:mod:`~tfm_jax.config.schema`), loading with
``key=value`` overrides, numeric profiles (:mod:`~tfm_jax.config.profiles`) and sizing arithmetic
(:mod:`~tfm_jax.config.sizing`: parameters, FFN width, KV-cache bytes).

Everything a user imports is re-exported here: ``from tfm_jax.config import load_config``.
"""

from tfm_jax.config.schema import (WEIGHT_ONLY_RECIPES, Int, Float, CONFIG_DIR, DEFAULT_CONFIG, BYTE_VOCAB_SIZE,
    MESH_AXES, DEFAULT_RULES, ConfigError, Rule, ModelConfig, param_counts, ffn_hidden_size,
    DataConfig, TrainConfig, MeshConfig, FP8_FORMATS, FP8_RECIPES, QuantConfig, MOE_DISPATCH,
    MoEConfig, moe_param_counts, BackendConfig, RunConfig, Config, validate, parse_overrides,
    resolve_config_path, load_config, check_trainable, check_runtime, compose_config)

