"""Logical and mesh axis names, declared once (the bottom of the import graph).

Layers annotate parameters and activations with these names only; one rule table
(``mesh.rules`` in the config, default :data:`tfm_jax.config.DEFAULT_RULES`) maps them to mesh axes.
"""

BATCH = "batch"          # sequences
LENGTH = "length"        # positions in a sequence
EMBED = "embed"          # model width d_model
HEADS = "heads"          # query heads
KV_HEADS = "kv_heads"    # key/value heads (GQA/MQA)
HEAD_DIM = "head_dim"    # per-head width
MLP = "mlp"              # FFN hidden width
VOCAB = "vocab"          # token ids
EXPERT = "expert"        # MoE experts
LAYERS = "layers"        # stacked layer axis under nn.scan
NORM = "norm"            # norm scale/bias vectors (kept replicated)
CACHE_BATCH = "cache_batch"    # KV-cache rows (decode batch)
CACHE_LENGTH = "cache_length"  # KV-cache positions (max_len)

ALL = (BATCH, LENGTH, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB, EXPERT, LAYERS, NORM,
       CACHE_BATCH, CACHE_LENGTH)

# Activation layouts at block boundaries.
ACT_BTD = (BATCH, LENGTH, EMBED)
ACT_BTV = (BATCH, LENGTH, VOCAB)

# Mesh axes, in the order the device mesh is laid out (outermost first).
DATA = "data"            # data parallel (replicated parameters)
FSDP = "fsdp"            # data parallel with sharded parameters and optimizer state
TENSOR = "tensor"        # tensor (model) parallel: heads, mlp, vocab
EXPERT_PARALLEL = "expert"   # expert parallel (MoE); the mesh axis shares the logical name
MESH_AXES = (DATA, FSDP, TENSOR, EXPERT_PARALLEL)
