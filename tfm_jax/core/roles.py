"""What each parameter *is*, decided from its tree path -- one rule the optimizer (weight-decay
mask) and later code (MoE experts, quantization state) share.

Roles (by the last path component, the name the layer gave the variable):

=============  ==================================================  ==========
role           names                                               decayed
=============  ==================================================  ==========
``weight``     ``kernel`` (every ``Linear`` projection, LM head)   yes
``embedding``  ``embedding`` (token table; also the tied LM head)  yes
``norm``       ``scale``, and ``bias`` under a ``*norm`` module    no
``bias``       any other ``bias``                                  no
``quant``      quantization state: amax histories, FP8 scales      no
               (the names in ``_QUANT_NAMES``, any ``*_amax_history``),
               everything under an ``fp8`` sub-module (the FP8 dot's
               state, :mod:`tfm_jax.quant.fp8`) or a path component
               containing ``overwrite_with_gradient`` (Flax's fp8 ops)
``storage``    ``storage_scale``: the float32 scale of a kernel kept   no
               in FP8 (:mod:`tfm_jax.quant.storage`)
``balance``    ``balance_bias``: the sigmoid MoE router's balancing    no
               bias (:mod:`tfm_jax.layers.moe`)
``other``      anything else                                       no
=============  ==================================================  ==========

A kernel kept in FP8 (``quant.fp8_weight_storage``) is still a ``weight``: its storage is a
dtype of the leaf, not another role.

How the train step treats each role (:func:`tfm_jax.train.make_train_step`):

* ``quant`` leaves are **overwritten**, not optimized. Their "gradient" is their new value (the op
  that owns them returns it as the cotangent of its custom VJP, as Flax's fp8 ops do); the step
  writes it into the parameter bit for bit (never through ``p + (new - p)``), takes the **max**
  over gradient-accumulation micro-batches (not the sum), and leaves it out of the token-count
  division, the gradient norm, the clip, the non-finite check and AdamW (they sit in an
  ``optax.multi_transform`` partition of their own, :func:`optimizer_labels`, with no moments).
  An op must therefore use each of its state leaves, every step: a leaf that no computation uses
  gets a zero cotangent and would be overwritten with zeros.
* ``storage`` leaves are neither optimized nor overwritten by a cotangent: the step trains the
  dequantized kernel and then sets the scale by its EMA rule and re-quantizes the kernel
  (:func:`tfm_jax.quant.storage.requantize_tree`); in the optimizer they share the
  ``set_to_zero`` partition (no moments).
* ``balance`` leaves (aux-loss-free MoE balancing) are neither optimized nor overwritten with
  their cotangent: the cotangent is the layer's per-expert load (:func:`tfm_jax.layers.moe.
  load_tap`), **summed** over micro-batches like a gradient (not divided by the token count,
  not in the norm, the clip or the non-finite check); the step then sets ``b += rate *
  sign(mean(load) - load)`` (:func:`tfm_jax.layers.moe.balance_bias_update`) once per optimizer
  step. In the optimizer they share the ``set_to_zero`` partition (no moments, no decay).
* every other role is trained by AdamW; decay follows :data:`DECAY_ROLES`.

Embeddings are decayed, as in GPT-2/nanoGPT and in this framework from the start (the golden loss
curves and the PyTorch reference were recorded that way); set ``DECAY_ROLES`` to change it.

The decision never looks at the array's rank: ``nn.scan`` stacks a layer's (d,) norm scale into
(L, d), and a rank rule would then decay it. Scanned and unscanned models therefore decay exactly
the same parameters. Unknown names get ``other`` (never decayed); the tests check that every
parameter of the shipped model variants has a known role, so a new layer must register its names
here.
"""

from __future__ import annotations

from typing import Any, Sequence

ROLES = ("weight", "embedding", "norm", "bias", "quant", "storage", "balance", "other")
DECAY_ROLES = frozenset({"weight", "embedding"})

# FP8 delayed scaling / INT8 recipes keep their state next to (or instead of) the kernels.
_QUANT_NAMES = frozenset({"amax_history", "input_amax_history", "kernel_amax_history",
                          "output_grad_amax_history", "input_scale", "kernel_scale",
                          "output_grad_scale", "scale_inv", "zero_point"})
# The sub-module name under which a projection keeps its FP8 state (tfm_jax.quant.fp8).
QUANT_MODULES = frozenset({"fp8"})
OVERWRITE_ROLES = frozenset({"quant"})
# optax.multi_transform labels (see optimizer_labels)
TRAINED, OVERWRITTEN = "trained", "overwritten"


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
    """``jax.tree_util`` key path (DictKey/GetAttrKey/...) or plain strings -> names."""
    names = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                k = getattr(k, attr)
                break
        names.append(str(k))
    return tuple(names)


def param_role(path: Sequence[Any]) -> str:
    """The role (one of :data:`ROLES`) of the parameter at ``path``."""
    names = path_names(path)
    if not names:
        return "other"
    leaf = names[-1]
    if leaf == "storage_scale":
        return "storage"
    if leaf == "balance_bias":
        return "balance"
    if (leaf in _QUANT_NAMES or leaf.endswith("_amax_history")
            or any(n in QUANT_MODULES or "overwrite_with_gradient" in n for n in names[:-1])):
        return "quant"
    if leaf == "kernel":
        return "weight"
    if leaf == "embedding":
        return "embedding"
    if leaf == "scale":
        return "norm"
    if leaf == "bias":
        return "norm" if len(names) > 1 and names[-2].endswith("norm") else "bias"
    return "other"


def decays(path: Sequence[Any]) -> bool:
    """Whether AdamW's decoupled weight decay applies to the parameter at ``path``."""
    return param_role(path) in DECAY_ROLES


def decay_mask(params: Any) -> Any:
    """Tree of bools (same structure as ``params``): True where weight decay applies."""
    import jax

    return jax.tree_util.tree_map_with_path(lambda path, _: decays(path), params)


def overwritten(path: Sequence[Any]) -> bool:
    """Whether the train step overwrites the parameter at ``path`` with its "gradient" (the new
    value its op computed) instead of optimizing it (roles in :data:`OVERWRITE_ROLES`)."""
    return param_role(path) in OVERWRITE_ROLES


def overwrite_mask(params: Any) -> Any:
    """Tree of Python bools (same structure as ``params``): True where :func:`overwritten`.
    Static under jit (decided by paths only)."""
    import jax

    return jax.tree_util.tree_map_with_path(lambda path, _: overwritten(path), params)


def balance_mask(params: Any) -> Any:
    """Tree of Python bools: True where the role is ``balance`` (MoE balancing bias)."""
    import jax

    return jax.tree_util.tree_map_with_path(lambda path, _: param_role(path) == "balance",
                                            params)


def optimizer_labels(params: Any) -> Any:
    """``optax.multi_transform`` labels: :data:`OVERWRITTEN` (``set_to_zero``, no moments) for
    overwritten, ``storage`` and ``balance`` leaves, :data:`TRAINED` for the rest."""
    import jax

    return jax.tree_util.tree_map_with_path(
        lambda path, _: OVERWRITTEN if (overwritten(path)
                                        or param_role(path) in ("storage", "balance"))
        else TRAINED, params)
