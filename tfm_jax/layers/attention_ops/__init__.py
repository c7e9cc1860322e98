"""Attention cores: functions of (q, k, v) with one contract, chosen by the ops seam
(:mod:`tfm_jax.layers.ops`). :mod:`~.dense` (one masked softmax; the KV-cache decode core),
:mod:`~.block` (block-causal, skips the masked half; the XLA:CPU choice), :mod:`~.flash`
(key-tiled online softmax, ``jax.nn.dot_product_attention`` / cuDNN)."""
