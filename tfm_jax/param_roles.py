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
``quant``      quantization state (amax histories, FP8 scales,     no
               anything under a ``*overwrite_with_gradient*``
               collection)
``other``      anything else                                       no
=============  ==================================================  ==========

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

ROLES = ("weight", "embedding", "norm", "bias", "quant", "other")
DECAY_ROLES = frozenset({"weight", "embedding"})

# FP8 delayed scaling / INT8 recipes keep their state next to (or instead of) the kernels.
_QUANT_NAMES = frozenset({"amax_history", "input_amax_history", "kernel_amax_history",
                          "output_grad_amax_history", "input_scale", "kernel_scale",
                          "output_grad_scale", "scale_inv", "zero_point"})


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
    if leaf in _QUANT_NAMES or any("overwrite_with_gradient" in n for n in names):
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
