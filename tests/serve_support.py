"""Shared by the serving tests: a tiny TransformerLM with random weights (std 0.1, so logits vary
and greedy choices are not ties), built from the abstract init (tests/ is on sys.path through its
conftest.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from tfm_jax.config import ModelConfig
from tfm_jax.model import TransformerLM

V = 64
BASE = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, attn_block_q=8)
HEADS = {"mha": 4, "gqa": 2, "mqa": 1}


def cfg_of(kv_heads=2, **kw):
    return ModelConfig(**{**BASE, "n_kv_heads": kv_heads, **kw})


@functools.lru_cache(maxsize=None)
def model_and_vars(cfg, seed=0):
    model = TransformerLM(cfg)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                          jnp.zeros((1, 8), jnp.int32)))
    r = np.random.default_rng(seed)

    def leaf(path, a):
        name = jax.tree_util.keystr(path)
        v = (1.0 + 0.1 * r.normal(size=a.shape) if name.endswith("['scale']")
             else 0.1 * r.normal(size=a.shape))
        return jnp.asarray(v, a.dtype)

    return model, jax.tree_util.tree_map_with_path(leaf, shapes)
