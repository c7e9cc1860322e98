"""Typed, frozen, validated run configuration.

A run is fully described by a YAML file plus dotted ``key=value`` overrides::

    tfm-jax train --config configs/small.yaml model.n_kv_heads=1 train.steps=500

Loading goes: YAML (optionally ``base:`` another YAML it extends) -> overrides applied to the
raw mapping -> one pydantic validation pass. Every failure is raised as :class:`ConfigError` with
one line per problem naming the dotted key, the offending value and what is allowed; the CLI turns
it into exit code 2 before anything is compiled. Checks that need the runtime (device count vs
mesh size) live in :func:`check_runtime`.

This module imports neither jax nor flax: it sits at the bottom of the dependency graph.
"""

from __future__ import annotations

import difflib
import math
import pathlib
import re
from typing import Any, Literal, Optional, Union

import pydantic
import yaml
from typing import Annotated

from pydantic import (AllowInfNan, BaseModel, BeforeValidator, ConfigDict, Field, Strict,
                      model_validator)

from tfm_jax.config import profiles
from tfm_jax.parallel import axes



def _yaml_float(v: Any) -> Any:
    # YAML 1.1 reads `3e-4` (no dot) as a string; accept any string float() accepts.
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


# Strict numbers: YAML `true` is not a layer count; ints are still accepted where floats are.
Int = Annotated[int, Strict()]
Float = Annotated[float, BeforeValidator(_yaml_float), Strict(), AllowInfNan(False)]

# The shipped configs: the repository's top-level configs/, package data of an installed wheel
# (tfm_jax/configs links to it in a checkout).
CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = "tiny.yaml"

# Byte-level tokenizer: 256 byte ids + PAD, BOS, EOS (see tfm_jax.data.ByteTokenizer).
BYTE_VOCAB_SIZE = 259

MESH_AXES = axes.MESH_AXES

# Logical -> mesh axis rules (ordered; flax takes the first rule whose mesh axes are still free
# for a given array, so activations' `embed` falls back to replicated once `batch` took `fsdp`).
DEFAULT_RULES: list[tuple[str, Union[str, list[str], None]]] = [
    (axes.BATCH, [axes.DATA, axes.FSDP, axes.EXPERT_PARALLEL]),  # tokens over data x expert
    (axes.LENGTH, None),
    (axes.EMBED, axes.FSDP),
    (axes.HEADS, axes.TENSOR),
    (axes.KV_HEADS, axes.TENSOR),
    (axes.HEAD_DIM, None),
    (axes.MLP, axes.TENSOR),
    (axes.VOCAB, axes.TENSOR),
    (axes.EXPERT, axes.EXPERT_PARALLEL),
    (axes.LAYERS, None),
    (axes.NORM, None),
    (axes.CACHE_BATCH, [axes.DATA, axes.FSDP]),   # KV cache (tfm_jax.layers.kv_cache): rows
    (axes.CACHE_LENGTH, None),
]


class ConfigError(ValueError):
    """An invalid configuration. ``str(err)`` is the full, user-facing message."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True,
                              coerce_numbers_to_str=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, raw: Any) -> Any:
        # A YAML section holding only comments parses as None: treat it as empty.
        if isinstance(raw, dict):
            return {k: ({} if v is None and _is_section(cls, k) else v) for k, v in raw.items()}
        return raw


def _is_section(cls: type[BaseModel], key: str) -> bool:
    field = cls.model_fields.get(key)
    ann = getattr(field, "annotation", None)
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _check_rule(rule: Any) -> tuple[str, Union[str, tuple[str, ...], None]]:
    """A logical-axis rule ``[logical, mesh]`` with mesh ``null``, an axis or a list of axes."""
    if isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str):
        mesh = rule[1]
        if mesh is None or isinstance(mesh, str):
            return (rule[0], mesh)
        if isinstance(mesh, (list, tuple)) and all(isinstance(m, str) for m in mesh):
            return (rule[0], list(mesh))
    raise ValueError(f"rule {rule!r} must be [logical_name, mesh_axis | [mesh_axes] | null]")


Rule = Annotated[tuple, BeforeValidator(_check_rule)]


class RopeScaling(_Section):
    """``model.rope_scaling``: a frequency rule for RoPE beyond the pretraining context."""

    type: Literal["llama3"] = Field(
        "llama3", description="llama3: wavelengths longer than original_max_position_embeddings"
        " / low_freq_factor are divided by factor, those shorter than ... / high_freq_factor kept,"
        " and the band between interpolated smoothly (Llama 3.1)")
    factor: Float = Field(8.0, gt=0, description="divisor of the low frequencies")
    low_freq_factor: Float = Field(1.0, gt=0, description="wavelength threshold of the scaled "
                                   "band: original_max_position_embeddings / low_freq_factor")
    high_freq_factor: Float = Field(4.0, gt=0, description="wavelength threshold of the kept "
                                    "band: original_max_position_embeddings / high_freq_factor")
    original_max_position_embeddings: Int = Field(8192, gt=0, description="the pretraining "
                                                  "context length")

    @model_validator(mode="after")
    def _bands(self) -> "RopeScaling":
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"model.rope_scaling.high_freq_factor={self.high_freq_factor} must "
                             f"exceed low_freq_factor={self.low_freq_factor}")
        return self


class ModelConfig(_Section):
    """Decoder-only Transformer LM shape and component choices."""

    vocab_size: Int = Field(264, gt=0, description="embedding rows; at least the tokenizer's "
                            "vocabulary (259 for the byte tokenizer); auto: the tokenizer's size "
                            "rounded up to a multiple of 128")
    d_model: Int = Field(128, gt=0, description="model width (residual stream)")
    n_layers: Int = Field(4, gt=0, description="decoder blocks")
    n_heads: Int = Field(4, gt=0, description="query heads")
    n_kv_heads: Int = Field(2, gt=0, description="n_heads: MHA; 1: MQA; in between: GQA")
    head_dim: Optional[Int] = Field(None, gt=0, description="default d_model // n_heads")
    # FFN hidden size rule (Llama): h = ffn_mult*d; swiglu: h = int(2h/3);
    # h = int(ffn_dim_multiplier*h) if set; round h up to a multiple of `multiple_of`.
    ffn_type: Literal["relu", "gelu", "swiglu"] = Field(
        "swiglu", description="FFN: relu / gelu (two matrices) or swiglu (three, gated)")
    ffn_mult: Float = Field(4.0, gt=0, description="hidden = ffn_mult * d_model (swiglu: then "
                            "2/3 of it)")
    ffn_dim_multiplier: Optional[Float] = Field(None, gt=0, description="Llama's extra factor "
                                                "on the hidden size (1.3 for Llama-3-8B)")
    multiple_of: Int = Field(1, gt=0, description="round the hidden size up to a multiple of "
                             "this (Llama: 1024)")
    ffn_hidden: Optional[Int] = Field(None, gt=0, description="explicit size; bypasses the rule")
    norm: Literal["layernorm", "rmsnorm", "batchnorm", "none"] = Field(
        "rmsnorm", description="normalization of every block and the final norm")
    norm_position: Literal["pre", "post"] = Field(
        "pre", description="pre: x + f(norm(x)) (GPT-2/Llama); post: norm(x + f(x)) (original "
        "Transformer)")
    norm_eps: Float = Field(1e-6, gt=0, description="epsilon added to the variance")
    bn_masked: bool = Field(True, description="BatchNorm statistics over non-padding tokens only")
    bn_momentum: Float = Field(0.99, gt=0, lt=1, description="BatchNorm running-statistics "
                               "momentum")
    rope_theta: Float = Field(10000.0, gt=0, description="RoPE base (Llama-3: 500000)")
    rope_scaling: Optional[RopeScaling] = Field(
        None, description="RoPE frequency rule, e.g. {type: llama3, factor: 8, low_freq_factor: "
        "1, high_freq_factor: 4, original_max_position_embeddings: 8192} (Llama 3.1); null: "
        "the plain theta^(-2i/D) frequencies")
    qkv_bias: bool = Field(False, description="learned biases on the query, key and value "
                           "projections (Qwen2)")
    attn_block_q: Int = Field(
        64, ge=0, description="query block of the block-causal attention path; 0: always the "
        "general masked path (materialises the full T x T scores)")
    tie_embeddings: bool = Field(False, description="LM head = the embedding table transposed")
    init_std: Float = Field(0.02, gt=0, description="normal init std of weights (residual "
                            "output projections: / sqrt(2 n_layers))")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="compute dtype of activations and matmuls")
    param_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype the parameters are stored in (and gathered in under "
        "FSDP); the compute dtype is model.dtype")
    master_weights: Literal["auto", "float32", "none"] = Field(
        "auto", description="low-precision parameters (param_dtype bfloat16): float32 = the "
        "optimizer keeps a float32 master copy, updates it and casts it to the parameters; none "
        "= the float32 update is rounded into the stored parameters (model.param_rounding); "
        "auto = float32 when param_dtype is below float32. Float32 parameters are their own "
        "master copy")
    param_rounding: Literal["nearest", "stochastic"] = Field(
        "stochastic", description="master_weights=none: how the float32 update is rounded into "
        "bfloat16 parameters -- stochastic (unbiased: small updates survive on average) or "
        "nearest-even (updates below half a bfloat16 ulp are lost)")
    loss_chunk: Int = Field(
        0, ge=0, description="cross-entropy over blocks of this many tokens, each block's "
        "logits recomputed in the backward pass (never the whole (tokens, vocab) logits at "
        "once; for large vocabularies); 0: one block")
    scan_layers: bool = Field(False, description="stack the blocks under nn.scan (one compiled "
                              "block; parameters gain a leading layers axis)")
    remat: Literal["none", "full", "dots"] = Field(
        "none", description="rematerialization of each block in the backward pass: none, full, "
        "or dots (save matmul outputs only)")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def resolved_ffn_hidden(self) -> int:
        return ffn_hidden_size(
            self.d_model, self.ffn_type, self.ffn_mult, self.ffn_dim_multiplier,
            self.multiple_of, self.ffn_hidden)

    @model_validator(mode="after")
    def _cross(self) -> "ModelConfig":
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                "choose n_heads dividing d_model or set model.head_dim explicitly")
        if self.n_kv_heads > self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads="
                f"{self.n_kv_heads} (MHA: equal, GQA: divisor, MQA: 1)")
        if self.param_dtype == "float32" and self.master_weights == "none":
            raise ValueError("model.master_weights=none needs low-precision parameters "
                             "(model.param_dtype=bfloat16); float32 parameters are their own "
                             "master copy: use master_weights=auto")
        if self.resolved_head_dim % 2:
            raise ValueError(f"model.head_dim={self.resolved_head_dim} must be even for RoPE "
                             "(default: model.d_model // model.n_heads)")
        return self


def param_counts(m: ModelConfig, moe: Optional["MoEConfig"] = None) -> dict[str, int]:
    """Parameter counts from the shape alone, without building the model (so ``tfm-jax config
    show`` needs no jax); ``tfm_jax.model.count_params`` returns these. A test checks them
    against the real parameter tree. With MoE layers (``moe``): ``total`` counts every expert,
    ``active`` / ``active_matmul`` what one token uses (top_k experts)."""
    d, h, hkv, dh, f, v, n = (m.d_model, m.n_heads, m.n_kv_heads, m.resolved_head_dim,
                              m.resolved_ffn_hidden, m.vocab_size, m.n_layers)
    attn = d * (h + 2 * hkv) * dh + h * dh * d
    if m.qkv_bias:
        attn += (h + 2 * hkv) * dh
    ffn = (3 if m.ffn_type == "swiglu" else 2) * d * f
    norm_vec = {"layernorm": 2 * d, "rmsnorm": d, "batchnorm": 2 * d, "none": 0}[m.norm]
    final = norm_vec if m.norm_position == "pre" else 0
    head = 0 if m.tie_embeddings else d * v
    embedding = v * d
    total = embedding + n * (attn + ffn + 2 * norm_vec) + final + head
    matmul = n * (attn + ffn) + (d * v)
    extra = (moe_param_counts(m, moe) if moe is not None
             else {"total": 0, "active": 0, "matmul": 0, "active_matmul": 0})
    out = {"total": total + extra["total"], "embedding": embedding,
           "matmul": matmul + extra["matmul"]}
    if moe is not None and moe.n_experts:
        out.update(active=total + extra["active"], active_matmul=matmul + extra["active_matmul"])
    return out


def ffn_hidden_size(d_model: int, ffn_type: str, ffn_mult: float = 4.0,
                    ffn_dim_multiplier: Optional[float] = None, multiple_of: int = 1,
                    explicit: Optional[int] = None) -> int:
    """FFN hidden width by the Llama rule.

    ``h = ffn_mult * d``; for SwiGLU (three matrices instead of two) ``h = int(2h / 3)`` keeps the
    parameter count of a 2-matrix FFN; then ``h = int(ffn_dim_multiplier * h)`` if given; finally
    ``h`` is rounded *up* to a multiple of ``multiple_of``. Llama-3-8B: d=4096 -> 16384 -> 10922
    -> x1.3 = 14198 -> round up to 1024 -> 14336. (``(2/3)*4d`` alone gives 10922, not 14336.)
    """
    if explicit is not None:
        return explicit
    hidden = int(ffn_mult * d_model)
    if ffn_type == "swiglu":
        hidden = int(2 * hidden / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


class MixtureSource(_Section):
    """One source of ``data.mixture``."""
    path: str = Field(description="text file/folder/glob, .jsonl/.parquet file or glob, or a "
                      "datasets save_to_disk folder")
    weight: Float = Field(1.0, gt=0, description="share of training rows drawn from this "
                          "source (weights are normalized)")
    text_field: Optional[str] = Field(None, description="default: data.text_field")


class DataConfig(_Section):
    """Training text, tokenization and batching."""
    path: Optional[str] = Field(None, description="text file, folder or glob; .jsonl or .parquet "
                                "file or glob; a datasets save_to_disk folder; None: built-in "
                                "corpus")
    include: Optional[list[str]] = Field(
        None, description="folder/glob data.path only: keep files whose name or relative path "
        "matches one of these globs, e.g. ['*.py', '*.md']; None: all files (non-text files -- "
        "a NUL byte in the first 8 KiB, or not UTF-8 -- are always skipped and counted)")
    tokenizer: str = Field(
        "byte", description="byte (UTF-8 bytes + 3 specials), a Hugging Face tokenizer.json or a "
        "folder holding one, or a sentencepiece .model; none: the caller feeds token ids itself "
        "(benchmarks, synthetic)")
    text_field: str = Field("text", description="jsonl/parquet/datasets sources: the field "
                            "(column) holding each document's text")
    mixture: Optional[list[MixtureSource]] = Field(
        None, description="several sources, each row drawn from one with probability "
        "proportional to its weight, e.g. [{path: a.jsonl, weight: 3}, {path: docs/}]; "
        "replaces data.path (validation: all sources' held-out parts)")
    seq_len: Int = Field(128, gt=1, description="tokens per training row")
    val_fraction: Float = Field(0.05, gt=0, le=0.5, description="share of the corpus held "
                                "out for validation (the tail)")
    packing: Union[Literal["concat", "segments", "pad"], bool] = Field(
        True, description="concat (true): rows are windows of the document stream; segments: "
        "documents packed first-fit into rows with segment ids and per-document positions, "
        "attention and loss stay inside each document; pad (false): one document per row, "
        "padded (masked)")
    random_truncate: Float = Field(
        0.0, ge=0, lt=1, description="packed rows only: cut each row at a uniform random length "
        "in [(1-f)*seq_len, seq_len] and pad the rest (masked): variable-length batches")
    cache_dir: Optional[str] = Field(None, description="where tokenized corpora are cached; "
                                     "None: the default cache folder")

    @model_validator(mode="after")
    def _truncate_needs_packing(self) -> "DataConfig":
        if self.mixture is not None and self.path is not None:
            raise ValueError("data.mixture replaces data.path: set one of the two")
        if self.mixture is not None and not self.mixture:
            raise ValueError("data.mixture is an empty list: give at least one source, or null")
        if self.random_truncate and self.packing not in (True, "concat"):
            raise ValueError(f"data.random_truncate={self.random_truncate} applies to packed rows; "
                             "with data.packing=false rows are already padded documents: set "
                             "data.random_truncate=0 or data.packing=true")
        return self


class TrainConfig(_Section):
    """Optimizer, schedule, logging, evaluation and checkpoints."""
    batch_size: Int = Field(16, gt=0, description="global batch (sequences per optimizer step)")
    grad_accum: Int = Field(1, gt=0, description="micro-batches per step (batch_size divisible)")
    steps: Int = Field(1200, gt=0, description="optimizer steps")
    seed: Int = Field(0, description="seed of the initialization and the batch order")
    lr: Float = Field(3e-3, gt=0, description="peak learning rate (warmup, then cosine decay)")
    min_lr_ratio: Float = Field(0.1, ge=0, le=1, description="final lr = lr * min_lr_ratio")
    warmup_steps: Int = Field(50, ge=0, description="linear warmup from 0 to lr (clamped to "
                              "train.steps, with one line in the log, when it exceeds them)")
    weight_decay: Float = Field(0.1, ge=0, description="AdamW decoupled decay (kernels and "
                                "embeddings only; by parameter role)")
    b1: Float = Field(0.9, ge=0, lt=1, description="AdamW first-moment decay")
    b2: Float = Field(0.95, ge=0, lt=1, description="AdamW second-moment decay")
    eps: Float = Field(1e-8, gt=0, description="AdamW epsilon")
    grad_clip: Float = Field(1.0, ge=0, description="global-norm clip; 0 disables")
    on_nonfinite: Literal["stop", "skip", "reload"] = Field(
        "stop", description="a step with NaN/inf loss or gradients (never applied): stop = "
        "raise naming the layer and tensor; skip = drop the update and go on; reload = (fp8 "
        "recipes) restore the last checkpoint, raise quant.margin by 1 and go on (logged)")
    max_reloads: Int = Field(3, ge=0, description="on_nonfinite=reload: reloads allowed in a "
                             "run before it stops")
    opt_moments: Literal["fp32", "bf16", "int8"] = Field(
        "fp32", description="AdamW moment storage: fp32 (optax.adamw), bf16, or int8 = "
        "blockwise 8-bit with a float32 scale per block (tfm_jax.quant.optim)")
    opt_block: Int = Field(128, gt=0, description="opt_moments=int8: block length along each "
                           "tensor's last axis (a divisor of it; else the whole row)")
    log_every: Int = Field(10, gt=0, description="steps between metrics.jsonl / TensorBoard rows")
    eval_every: Int = Field(400, gt=0, description="steps between validation evaluations")
    eval_batches: Int = Field(32, gt=0, description="validation batches per evaluation")
    checkpoint_every: Int = Field(400, gt=0, description="steps between orbax checkpoints")
    keep_checkpoints: Int = Field(2, gt=0, description="newest checkpoints kept")
    memory_check: bool = Field(
        True, description="before training, compare the compiled step's peak memory estimate "
        "with the memory available (host or device) and stop with exit 2 when it will not fit "
        "(tfm_jax.train.memory.check_fits); false = start anyway")
    async_checkpoint: bool = Field(True, description="save checkpoints in the background "
                                   "(never half-written: orbax commits atomically)")
    sample_tokens: Int = Field(200, ge=0, description="tokens generated at the end of a run")
    sample_prompt: str = Field("def ", description="prompt of the end-of-run sample")
    peak_flops: Optional[Float] = Field(
        None, gt=0, description="per-device FLOP/s for MFU (on CPU: the whole machine's); "
        "None: measured matmul peak on CPU, vendor figure on known GPUs")

    @model_validator(mode="after")
    def _cross(self) -> "TrainConfig":
        if self.batch_size % self.grad_accum:
            raise ValueError(f"train.batch_size={self.batch_size} is not divisible by "
                             f"train.grad_accum={self.grad_accum}")
        return self


class MeshConfig(_Section):
    """Device mesh sizes (product = device count; one axis may be -1 = fill) and logical rules."""

    data: Int = Field(-1, description="data-parallel size (replicated parameters)")
    fsdp: Int = Field(1, description="fully sharded data-parallel size (parameters and "
                      "optimizer state sharded)")
    tensor: Int = Field(1, description="tensor-parallel size (heads, mlp, vocab)")
    expert: Int = Field(1, description="expert-parallel size (MoE experts; tokens too)")
    rules: list[Rule] = Field(
        default_factory=lambda: [tuple(r) for r in DEFAULT_RULES],
        description="logical axis -> mesh axes, in order (the first rule whose mesh axes are "
        "still free wins)")

    @model_validator(mode="after")
    def _cross(self) -> "MeshConfig":
        sizes = self.sizes
        if sum(s == -1 for s in sizes.values()) > 1:
            raise ValueError("at most one mesh axis may be -1 (fill with the remaining devices)")
        for name, s in sizes.items():
            if s == 0 or s < -1:
                raise ValueError(f"mesh.{name}={s}: must be a positive size or -1")
        # Several rules for one logical name are allowed: flax takes the first whose mesh axes
        # are still free for the array at hand (a fallback list, as in MaxText).
        for logical, mesh in self.rules:
            targets = [] if mesh is None else [mesh] if isinstance(mesh, str) else list(mesh)
            bad = [t for t in targets if t not in MESH_AXES]
            if bad:
                raise ValueError(f"mesh.rules: rule for '{logical}' names unknown mesh axis "
                                 f"{bad[0]!r}; mesh axes are {list(MESH_AXES)}")
        return self

    @property
    def sizes(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in MESH_AXES}

    def resolved_sizes(self, n_devices: int) -> dict[str, int]:
        sizes = self.sizes
        fixed = math.prod(s for s in sizes.values() if s != -1)
        if -1 in sizes.values():
            if n_devices % fixed:
                raise ConfigError(
                    f"mesh: the fixed axes multiply to {fixed}, which does not divide the "
                    f"{n_devices} available devices; change the mesh.* sizes")
            sizes = {a: (n_devices // fixed if s == -1 else s) for a, s in sizes.items()}
        elif fixed != n_devices:
            hint = (f"; on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count={fixed} "
                    f"(set before the command) gives {fixed} simulated devices"
                    if fixed > n_devices else "")
            raise ConfigError(
                f"mesh: data*fsdp*tensor*expert = {fixed} but {n_devices} devices are available; "
                f"make the product equal the device count, or set one axis to -1{hint}")
        return sizes


FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
FP8_RECIPES = ("fp8_dynamic", "fp8_delayed", "fp8_static")
# Post-training weight-only integer recipes (`tfm-jax quantize`, tfm_jax.quant.ptq).
WEIGHT_ONLY_RECIPES = ("int8_weight", "int8_weight_asym", "int4_weight")


class QuantConfig(_Section):
    """Low precision. Training recipes (the projections' dot, :mod:`tfm_jax.quant.fp8`; the
    embedding and the LM head stay in the model dtype):

    * ``none``: the model dtype everywhere.
    * ``fp8_dynamic``: each step scales by the current amax of each tensor (no state).
    * ``fp8_delayed``: scales from an amax history kept in the params tree (``<proj>/fp8/...``),
      ``amax_history`` steps long, reduced by ``amax_compute``, with ``margin``.
    * ``fp8_static``: fixed input/kernel scales from ``calibration`` (a file, see
      :func:`tfm_jax.quant.fp8.load_calibration`); output gradients scaled dynamically.
    * ``int8_weight``, ``int8_weight_asym``, ``int4_weight``: post-training weight-only integer
      quantization (``tfm-jax quantize``, :mod:`tfm_jax.quant.ptq`); not training recipes.
    """

    recipe: Literal[("none",) + FP8_RECIPES + WEIGHT_ONLY_RECIPES] = Field(
        "none", description="low-precision recipe (the list above); int*_weight runs are "
        "written by tfm-jax quantize")
    amax_history: Int = Field(1024, gt=0, description="fp8_delayed: amax history length (Flax "
                              "and Transformer Engine default 1024)")
    amax_compute: Literal["max", "most_recent"] = Field(
        "max", description="fp8_delayed: the amax a scale assumes: the history's max or its "
        "newest entry")
    margin: Int = Field(0, ge=0, description="scale = fmt_max / amax / 2**margin (headroom)")
    fwd_format: Literal[FP8_FORMATS] = Field(  # type: ignore[valid-type]
        "float8_e4m3fn", description="format of the forward operands (inputs, kernels)")
    bwd_format: Literal[FP8_FORMATS] = Field(  # type: ignore[valid-type]
        "float8_e5m2", description="format of the output gradients")
    kernel_granularity: Literal["per_tensor", "per_channel"] = Field(
        "per_tensor", description="kernel scales: one per tensor, or one per output channel")
    fp8_operands: list[Literal["input", "kernel", "output_grad"]] = Field(
        ["input", "kernel", "output_grad"], description="the FP8 dot's tensors "
        "that are quantized; the others stay in the compute dtype. All three is FP8 training; a "
        "subset attributes the recipe's loss to one tensor (experiments/fp8_error_sources.yaml), "
        "[] is the control (trains exactly as recipe none); native FP8 GEMMs need both forward "
        "operands")
    calibration: Optional[str] = Field(
        None, description="fp8_static: calibration file of scales (tfm_jax.quant.fp8)")
    scale_set: Literal["any", "pow2", "gaudi2"] = Field(
        "any", description="FP8 dot scales rounded down to what the hardware applies: any = "
        "no rounding; pow2 = a power of two (Gaudi3); gaudi2 = {2^-4, 1, 2^4, 2^8}, Gaudi2's "
        "exponent-bias set (tfm_jax.quant.scaling.GAUDI2_E4M3_SCALES); set by backend.profile")
    telemetry: bool = Field(False, description="fp8 recipes: per-projection amax, scale, "
                            "saturated / flushed-to-zero fractions, staleness in metrics.jsonl "
                            "(a study tool: extra passes over every projection's operands, "
                            "+15-20 % of the emulated step on CPU; off by default)")
    fp8_weight_storage: bool = Field(
        False, description="keep the attention/FFN kernels as FP8 bytes + a float32 scale "
        "(EMA-updated, tfm_jax.quant.storage); optimizer updates apply to the dequantized "
        "weight, which is re-quantized")
    weight_storage_format: Literal[FP8_FORMATS] = Field(  # type: ignore[valid-type]
        "float8_e4m3fn", description="fp8_weight_storage: the kernels' format")
    weight_storage_granularity: Literal["per_tensor", "per_channel"] = Field(
        "per_tensor", description="fp8_weight_storage: one scale per kernel, or per output "
        "channel")
    weight_scale_beta: Float = Field(0.999, ge=0, le=1, description="fp8_weight_storage: EMA "
                                     "of the scale, beta*scale + (1-beta)*fmt_max/amax (seed)")
    weight_storage_margin: Int = Field(1, ge=0, description="fp8_weight_storage: headroom, "
                                       "scale target fmt_max / amax / 2**margin")
    stochastic_rounding: bool = Field(False, description="fp8_weight_storage: re-quantize "
                                      "with stochastic rounding (unbiased) instead of "
                                      "nearest-even; default: on with fp8_weight_storage (with "
                                      "nearest-even the small late-training updates are lost: "
                                      "+8 % val loss vs +0.5 % in benchmarks/"
                                      "fp8_training_long)")
    kv_cache: Literal["none", "int8", "fp8"] = Field(
        "none", description="KV-cache storage for generation (tfm_jax.layers.kv_cache): none = "
        "the compute dtype; int8 / fp8 (e4m3) = symmetric, saturating, with float32 scales")
    kv_scale: Literal["per_token_head", "per_token"] = Field(
        "per_token_head", description="granularity of the quantized KV cache's scales: one per "
        "(token, kv head), or one per token across heads")

    @model_validator(mode="before")
    @classmethod
    def _rounding_default(cls, raw: Any) -> Any:
        # Stochastic rounding defaults to on exactly when the weights are stored in FP8; a
        # saved config.yaml holds the resolved value, so existing runs keep theirs.
        if isinstance(raw, dict) and raw.get("stochastic_rounding") is None:
            raw = {**raw, "stochastic_rounding": raw.get("fp8_weight_storage", False)}
        return raw

    @model_validator(mode="after")
    def _cross(self) -> "QuantConfig":
        if self.recipe == "fp8_static" and not self.calibration:
            raise ValueError("quant.recipe=fp8_static needs quant.calibration=FILE (the scales "
                             "`tfm-jax calibrate` writes; format: tfm_jax.quant.fp8); or use "
                             "quant.recipe=fp8_delayed, which needs no calibration")
        if self.calibration and self.recipe != "fp8_static":
            raise ValueError(f"quant.calibration is only read by quant.recipe=fp8_static (got "
                             f"quant.recipe={self.recipe}); drop quant.calibration or set "
                             "quant.recipe=fp8_static")
        if len(set(self.fp8_operands)) != len(self.fp8_operands):
            raise ValueError(f"quant.fp8_operands={self.fp8_operands} names a tensor twice")
        if self.recipe == "fp8_static" and not {"input", "kernel"} <= set(self.fp8_operands):
            raise ValueError("quant.recipe=fp8_static calibrates the input and the kernel; "
                             "quant.fp8_operands must name both (the output gradient is "
                             "optional)")
        if self.fp8_weight_storage and self.recipe not in ("none",) + FP8_RECIPES:
            raise ValueError(f"quant.fp8_weight_storage=true is a training option; "
                             f"quant.recipe={self.recipe} is post-training quantization. Use "
                             "recipe none or an fp8_* recipe with it")
        if self.stochastic_rounding and not self.fp8_weight_storage:
            raise ValueError("quant.stochastic_rounding=true rounds the FP8-stored weights; it "
                             "needs quant.fp8_weight_storage=true")
        return self

    @property
    def fp8(self) -> bool:
        """Whether the projections run the FP8 dot."""
        return self.recipe in FP8_RECIPES

    @property
    def has_param_state(self) -> bool:
        """Whether the recipe keeps state (scales, amax histories) in the params tree."""
        return self.recipe in ("fp8_delayed", "fp8_static")


MOE_DISPATCH = ("dense", "all_to_all", "implicit", "ragged")


class MoEConfig(_Section):
    """Mixture-of-Experts FFN (:mod:`tfm_jax.layers.moe`, dispatch in
    :mod:`tfm_jax.layers.moe.dispatch`); ``n_experts: 0`` keeps every FFN dense."""

    n_experts: Int = Field(0, ge=0, description="0: dense FFN")
    top_k: Int = Field(2, gt=0, description="experts each token is routed to")
    capacity_factor: Optional[Float] = Field(
        1.25, gt=0, description="slots per expert and routing group = ceil(cf * N * top_k / E); "
        "null: dropless (N slots)")
    router: Literal["softmax", "sigmoid"] = Field(
        "softmax", description="softmax top-k (fp32; weights renormalised when top_k > 1); "
        "sigmoid = DeepSeek-V3: top-k of sigmoid scores + a balancing bias (not trained, "
        "updated from the load), weights = the chosen scores renormalised")
    bias_update_rate: Float = Field(
        1e-3, ge=0, description="sigmoid router: after each optimizer step the balancing bias "
        "moves by this much per expert, b_e += rate * sign(mean load - load_e)")
    aux_loss_coef: Float = Field(0.01, ge=0, description="load-balancing loss (Switch) weight")
    z_loss_coef: Float = Field(1e-3, ge=0, description="router z-loss (ST-MoE) weight")
    shared_expert: bool = Field(False, description="a dense FFN every token also goes through")
    expert_hidden: Optional[Int] = Field(None, gt=0, description="default: the model's FFN width")
    every: Int = Field(1, gt=0, description="MoE in blocks i with (i + 1) % every == 0")
    dispatch: Literal[MOE_DISPATCH] = Field(
        "all_to_all", description="dense = single-device reference (every expert on every "
        "token); all_to_all = shard_map + jax.lax.all_to_all over mesh.expert; implicit = "
        "sharding constraints only (XLA inserts the collectives); ragged = dropless "
        "(capacity_factor ignored): grouped GEMMs (jax.lax.ragged_dot) over the tokens sorted by "
        "expert, exchanged over mesh.expert in padded all_to_all buffers")

    @model_validator(mode="after")
    def _cross(self) -> "MoEConfig":
        if self.n_experts and self.top_k > self.n_experts:
            raise ValueError(f"moe.top_k={self.top_k} exceeds moe.n_experts={self.n_experts}")
        return self

    def is_moe_layer(self, i: int) -> bool:
        """Whether block ``i`` (0-based) has the MoE FFN."""
        return self.n_experts > 0 and (i + 1) % self.every == 0


def moe_param_counts(m: ModelConfig, moe: MoEConfig) -> dict[str, int]:
    """Extra parameters of the MoE layers over the dense model: ``total`` and ``active`` (those
    one token uses: top_k experts + shared + router) -- what :func:`param_counts` adds."""
    n_moe = sum(moe.is_moe_layer(i) for i in range(m.n_layers))
    if not n_moe:
        return {"total": 0, "active": 0, "matmul": 0, "active_matmul": 0}
    d, f_dense = m.d_model, m.resolved_ffn_hidden
    f = moe.expert_hidden or f_dense
    per = (3 if m.ffn_type == "swiglu" else 2) * d
    router, expert, dense_ffn = d * moe.n_experts, per * f, per * f_dense
    bias = moe.n_experts if moe.router == "sigmoid" else 0     # balance_bias: not a matmul
    shared = expert if moe.shared_expert else 0
    total = n_moe * (router + moe.n_experts * expert + shared - dense_ffn)
    active = n_moe * (router + moe.top_k * expert + shared - dense_ffn)
    return {"total": total + n_moe * bias, "active": active + n_moe * bias, "matmul": total,
            "active_matmul": active}


def _removed_cpu_blas(value: Any) -> Any:
    """backend.cpu_blas=builtin (the hand-written sgemm, removed): an error that names the fix."""
    if value == "builtin":
        raise ValueError("backend.cpu_blas=builtin: the project's hand-written sgemm was removed; "
                         "use backend.cpu_blas=auto or openblas (scipy-openblas32, installed by "
                         "default), or mkl (pip install 'tfm-jax[mkl]')")
    return value


PLUGIN_ENV = "TFM_JAX_PJRT_PLUGIN"     # --pjrt-plugin sets it (tfm_jax.platform.backends)
PLUGIN_FIX = ("pass the library on the command line (--pjrt-plugin PATH) or in the "
              "environment ($TFM_JAX_PJRT_PLUGIN=PATH)")


def _refuse_plugin_path(value: Any) -> Any:
    """backend.pjrt_plugin with a path: refused. A config, a run's saved config.yaml or an
    experiment file is data that others hand around; loading a library runs its code."""
    if value is not None:
        raise ConfigError(f"backend.pjrt_plugin={value}: a library path is never read from a "
                         f"config (shared configs and run directories are data, and loading a "
                         f"library runs its code); {PLUGIN_FIX}")
    return value


CpuBlas = Annotated[Literal["auto", "openblas", "mkl"], BeforeValidator(_removed_cpu_blas)]


class BackendConfig(_Section):
    """Platform, kernels and numeric profile of a run."""
    platform: Literal["auto", "cpu", "gpu", "tpu", "hpu"] = Field(
        "auto", description="auto = jax's default; cpu/gpu/tpu/hpu pin it (tfm_jax.platform.backends."
        "configure); hpu needs a PJRT plugin (pjrt_plugin)")
    pjrt_plugin: Annotated[Optional[str], BeforeValidator(_refuse_plugin_path)] = Field(
        None, description="never read from a config (must stay null): a library path in a shared "
        "config or run directory would run its code when loaded. Give the PJRT plugin library "
        "(.so) for backend.platform gpu/tpu/hpu with --pjrt-plugin PATH or $TFM_JAX_PJRT_PLUGIN")
    profile: Literal["none", "nvidia-hopper", "gaudi2", "gaudi3"] = Field(
        "none", description="hardware numeric profile: fills quant formats, quant.scale_set and "
        "moe.dispatch where they are not set (tfm_jax.config.profiles); needs its hardware's platform")
    emulate: Literal["none", "nvidia-hopper", "gaudi2", "gaudi3"] = Field(
        "none", description="run a profile's numerics on CPU (FP8 emulated): as profile, on "
        "backend.platform cpu or auto")
    cpu_kernels: Literal["auto", "native", "xla"] = Field(
        "auto", description="fp32 GEMMs, causal attention, SwiGLU, RMSNorm as native custom calls "
        "(tfm_jax.platform.kernels.cpu) on a single CPU device: auto = when they build, native = "
        "required, xla = never")
    cpu_blas: CpuBlas = Field(
        "auto", description="BLAS whose sgemm the native CPU kernels' GEMMs call (one thread per "
        "call): openblas = the scipy-openblas32 wheel (default dependency), mkl = libmkl_rt from "
        "the optional 'mkl' extra (pip install 'tfm-jax[mkl]'), auto = the first available of "
        "tfm_jax.platform.kernels.cpu.AUTO_ORDER (MKL first on Intel CPUs, last elsewhere); one "
        "that is asked for by name but not available is reported by "
        "tfm_jax.platform.kernels.cpu.available(cpu_blas)")
    # Under backend, not model: every choice computes the same function of the same parameters
    # (checkpoints are interchangeable, only rounding and speed differ), and whether one is
    # allowed depends on the platform, as for cpu_kernels.
    attention: Literal["auto", "block", "dense", "flash", "xla_sdpa", "cudnn"] = Field(
        "auto", description="causal attention core of training/prefill (positions 0..T-1): "
        "auto = the ops set's own (native kernel or block-causal on CPU, dense on TPU; on a GPU "
        "cuDNN fused attention where supported, else dense with the reason logged); "
        "block = block-causal XLA; dense = one masked softmax over T x T scores; flash = "
        "key-tiled online softmax, O(T) memory (tfm_jax.layers.attention_ops.flash); xla_sdpa / cudnn = "
        "jax.nn.dot_product_attention with implementation xla / cudnn (cudnn: GPU only, "
        "bfloat16/float16, head_dim a multiple of 8, right-padded rows)")
    paged_attention: Literal["auto", "gather", "pallas"] = Field(
        "auto", description="decode attention over a paged KV cache (tfm-jax serve): gather = "
        "copy each row's pages, then the ops set's cached attention (any platform); pallas = "
        "tfm-jax's Pallas paged-attention kernel reading the pages in place (Triton on a GPU; on "
        "other platforms Pallas' interpreter, for testing only); auto = pallas on a GPU, else "
        "gather. Quantized pages and prefill chunks always gather")


def _check_backend(b: BackendConfig) -> None:
    """Platform, plugin, profile and emulation fit together (tfm_jax.config.profiles)."""
    if b.emulate != "none":
        if b.platform not in ("auto", "cpu"):
            raise ValueError(f"backend.emulate={b.emulate} runs that profile's numerics on CPU, "
                             f"but backend.platform={b.platform}; set backend.platform=cpu (or "
                             f"auto), or use backend.profile={b.emulate} on the hardware")
        if b.profile not in ("none", b.emulate):
            raise ValueError(f"backend.profile={b.profile} and backend.emulate={b.emulate} "
                             "disagree; set one of them")
    elif b.profile != "none":
        want = profiles.PROFILES[b.profile].platform
        if b.platform not in (want, "auto") or (want == "hpu" and b.platform != "hpu"):
            raise ValueError(f"backend.profile={b.profile} describes {want} hardware, but "
                             f"backend.platform={b.platform}; set backend.platform={want}, or "
                             f"backend.emulate={b.profile} to run its numerics on CPU")


def _check_run_name(value: Any) -> Any:
    """run.name is one folder name under runs/: never a path (``../x``, ``/abs``) out of it."""
    if value is None:
        return value
    if (not isinstance(value, str) or not re.fullmatch(r"[\w.=+-]{1,200}", value)
            or value in (".", "..")):
        raise ValueError(f"run.name={value!r}: one folder name under runs/ (letters, digits, "
                         f". _ = + -, at most 200 characters; not . or ..); to write elsewhere "
                         f"set run.dir")
    return value


class RunConfig(_Section):
    """Where a run writes, and what it shows."""
    name: Annotated[Optional[str], BeforeValidator(_check_run_name)] = Field(
        None, description="default: config file stem + overrides; one folder name under runs/ "
        "(letters, digits, . _ = + -; not . or ..)")
    dir: Optional[str] = Field(None, description="run directory; default runs/<name>")
    tensorboard: bool = Field(True, description="write TensorBoard event files under "
                              "<run dir>/events")
    progress: bool = Field(True, description="a progress bar on an interactive terminal")
    wandb: Literal[False, "online", "offline"] = Field(
        False, description="also log the metrics (the TensorBoard scalars) to Weights & Biases: "
        "online, or offline (files under <run dir>/wandb, or $WANDB_DIR; upload later with "
        "'wandb sync'); false: off. Needs the track extra")
    wandb_project: str = Field("tfm-jax", description="Weights & Biases project of run.wandb")


class Config(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    quant: QuantConfig = QuantConfig()
    moe: MoEConfig = MoEConfig()
    backend: BackendConfig = BackendConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="before")
    @classmethod
    def _profile_defaults(cls, raw: Any) -> Any:
        # backend.profile / backend.emulate fill the keys the config leaves unset
        return _auto_vocab(profiles.apply_defaults(raw))

    @model_validator(mode="after")
    def _cross(self) -> "Config":
        moe = self.moe
        if self.mesh.expert != 1 and not moe.n_experts:
            # Nothing shards over `expert` without MoE layers: a larger axis would only
            # replicate the whole model over its devices while looking like expert parallelism.
            raise ValueError(
                f"mesh.expert={self.mesh.expert}: the expert axis is only used by MoE layers "
                "(moe.n_experts > 0), so here it would only replicate the model; keep "
                "mesh.expert=1 and put the devices on mesh.data, mesh.fsdp or mesh.tensor")
        if moe.n_experts:
            if self.mesh.expert > 1 and moe.n_experts % self.mesh.expert:
                raise ValueError(f"moe.n_experts={moe.n_experts} is not divisible by "
                                 f"mesh.expert={self.mesh.expert}; choose a divisor")
            if moe.every > self.model.n_layers:
                raise ValueError(f"moe.every={moe.every} exceeds model.n_layers="
                                 f"{self.model.n_layers}: no block would be MoE")
            if self.model.scan_layers and self.model.n_layers % moe.every:
                raise ValueError(f"model.scan_layers=true scans groups of moe.every={moe.every} "
                                 f"layers ({moe.every - 1} dense + 1 MoE), so model.n_layers="
                                 f"{self.model.n_layers} must be a multiple of it; change "
                                 "model.n_layers or moe.every, or set model.scan_layers=false")
            if moe.n_experts and self.quant.recipe != "none":
                raise ValueError(f"quant.recipe={self.quant.recipe} does not cover the MoE "
                                 "experts yet; use quant.recipe=none with moe.n_experts > 0")
        if self.quant.fp8_weight_storage and self.model.param_dtype != "float32":
            raise ValueError("quant.fp8_weight_storage stores the kernels in FP8 with their own "
                             "float32 view for the optimizer; the other parameters need "
                             "model.param_dtype=float32 (got "
                             f"{self.model.param_dtype})")
        _check_backend(self.backend)
        attn = self.backend.attention
        if attn != "auto" and self.model.attn_block_q == 0:
            raise ValueError(f"backend.attention={attn} never runs with model.attn_block_q=0 "
                             "(which forces the general masked path); set model.attn_block_q "
                             "> 0 (e.g. 64) or backend.attention=auto")
        if attn == "cudnn" and self.data.packing == "segments":
            raise ValueError("data.packing=segments needs an attention core that masks across "
                             "documents; backend.attention=cudnn takes no segment ids here: use "
                             "backend.attention=flash, xla_sdpa or auto")
        if attn == "cudnn":
            if self.backend.platform in ("cpu", "tpu"):
                raise ValueError(f"backend.attention=cudnn needs a GPU, but backend.platform="
                                 f"{self.backend.platform}; use backend.attention=flash or "
                                 "auto there")
            if self.model.dtype == "float32":
                raise ValueError("backend.attention=cudnn needs model.dtype bfloat16 or float16 "
                                 "(cuDNN's fused attention has no float32 kernel); set "
                                 "model.dtype=bfloat16 or use backend.attention=flash")
            hd = self.model.resolved_head_dim
            if hd % 8 or hd > 256:
                raise ValueError(f"backend.attention=cudnn needs a head_dim that is a multiple "
                                 f"of 8 and <= 256 (128 before Hopper), got {hd}; change "
                                 "model.head_dim or use backend.attention=flash")
        if self.data.tokenizer == "byte" and self.model.vocab_size < BYTE_VOCAB_SIZE:
            raise ValueError(f"model.vocab_size={self.model.vocab_size} is smaller than the byte "
                             f"tokenizer's {BYTE_VOCAB_SIZE} ids; use >= {BYTE_VOCAB_SIZE}")
        tok_size = _tokenizer_size(self.data.tokenizer)
        if tok_size is not None and self.model.vocab_size < tok_size:
            raise ValueError(f"model.vocab_size={self.model.vocab_size} is smaller than the "
                             f"{tok_size} ids of the tokenizer {self.data.tokenizer}; set "
                             f"model.vocab_size=auto or >= {tok_size}")
        if self.train.on_nonfinite == "reload" and not self.quant.fp8:
            raise ValueError(f"train.on_nonfinite=reload raises quant.margin after a reload, "
                             f"which only an fp8 recipe uses (quant.recipe={self.quant.recipe}): "
                             "a reload would replay the same steps into the same NaN. Use "
                             "train.on_nonfinite=stop or skip, or an fp8_* recipe")
        return self

    @property
    def run_dir(self) -> pathlib.Path:
        return pathlib.Path(self.run.dir or pathlib.Path("runs") / (self.run.name or "run"))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **overrides: Any) -> "Config":
        """Dotted-key replacement with full re-validation: ``cfg.replace(**{"model.n_layers": 2})``."""
        raw = self.to_dict()
        q = self.quant
        if ("quant.fp8_weight_storage" in overrides and "quant.stochastic_rounding" not in
                overrides and q.stochastic_rounding == q.fp8_weight_storage):
            # the rounding was at its default: it follows the new storage setting, as in a
            # config written with that setting (QuantConfig._rounding_default)
            del raw["quant"]["stochastic_rounding"]
        for key, value in overrides.items():
            _set_dotted(raw, key, value)
        return validate(raw)


# --------------------------------------------------------------------------------------------
# Loading, overrides, error formatting.


def _section_fields(model_cls: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at ``loc`` (the parent of an offending key)."""
    cls = model_cls
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        cls = ann
    return list(cls.model_fields)


def _format_errors(err: pydantic.ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "<config>"
        if e["type"] == "extra_forbidden":
            valid = _section_fields(Config, loc[:-1])
            near = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{'.'.join(map(str, loc[:-1] + (near[0],)))}'?" if near else ""
            lines.append(f"{key}: unknown key{hint} (valid here: {', '.join(valid)})")
        elif e["type"] == "value_error":
            msg = str(e["msg"]).removeprefix("Value error, ")
            lines.append(msg if (not loc or f"{loc[0]}." in msg) else f"{key}: {msg}")
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def _tokenizer_size(spec: str) -> Optional[int]:
    """Vocabulary size of ``data.tokenizer`` (None: byte/none, or a path not here -- a run's
    config read elsewhere; loading its data then names the problem)."""
    if spec in ("byte", "none") or not pathlib.Path(spec).expanduser().exists():
        return None
    from tfm_jax.data import tokenizer as tokenizer_lib   # layer 1 (imports core only)

    try:
        return tokenizer_lib.cached_vocab_size(spec)
    except Exception as err:  # DataError: one line, shown as a config error
        raise ValueError(str(err)) from None


def _auto_vocab(raw: Any) -> Any:
    """``model.vocab_size: auto`` -> the tokenizer's size rounded up to a multiple of 128."""
    if not (isinstance(raw, dict) and isinstance(raw.get("model"), dict)
            and raw["model"].get("vocab_size") == "auto"):
        return raw
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    spec = str(data.get("tokenizer", "byte"))
    if spec == "none":
        raise ValueError("model.vocab_size=auto needs a tokenizer, but data.tokenizer=none; "
                         "give model.vocab_size as a number")
    size = BYTE_VOCAB_SIZE if spec == "byte" else _tokenizer_size(spec)
    if size is None:
        raise ValueError(f"model.vocab_size=auto: data.tokenizer={spec!r} is not 'byte' nor an "
                         "existing tokenizer file or folder")
    return {**raw, "model": {**raw["model"], "vocab_size": -(-size // 128) * 128}}


def validate(raw: dict[str, Any]) -> Config:
    backend = raw.get("backend") if isinstance(raw, dict) else None
    if isinstance(backend, dict) and backend.get("pjrt_plugin") is not None:
        _refuse_plugin_path(backend["pjrt_plugin"])      # one line, before anything else
    try:
        return Config.model_validate(raw)
    except pydantic.ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: '{'.'.join(parts[:i + 1])}' is a value, not a "
                              "section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["model.n_layers=2", "data.path=null"]`` -> ``{"model.n_layers": 2, "data.path": None}``.

    Values are parsed as YAML scalars/lists, so ``true``, ``3e-4``, ``[a, b]`` and ``null`` work.
    """
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+", key):
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. "
                              "model.n_layers=2")
        try:
            out[key] = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            out[key] = text
    return out


def _read_yaml(path: pathlib.Path, seen: tuple = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; shipped configs are in {CONFIG_DIR}: "
                          f"{', '.join(sorted(p.name for p in CONFIG_DIR.glob('*.yaml')))}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of sections")
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_path = (path.parent / base).resolve()
    if base_path in seen:
        raise ConfigError(f"config file {path}: 'base' chain loops back to {base_path}")
    merged = _read_yaml(base_path, seen + (path.resolve(),))
    _deep_merge(merged, raw)
    return merged


def _deep_merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = v


def resolve_config_path(path: Optional[str]) -> pathlib.Path:
    """A path as given, or a bare name looked up in the shipped ``configs/`` folder."""
    if path is None:
        return CONFIG_DIR / DEFAULT_CONFIG
    p = pathlib.Path(path)
    if not p.exists() and (CONFIG_DIR / p.name).exists() and len(p.parts) == 1:
        return CONFIG_DIR / p.name
    if not p.exists() and not p.suffix and (CONFIG_DIR / f"{p.name}.yaml").exists():
        return CONFIG_DIR / f"{p.name}.yaml"
    return p


def _yaml_spelling(v: Any) -> str:
    """A parsed override value as it is written in YAML: ``false``/``true``/``null``, not
    Python's ``False``/``True``/``None`` (lists/mappings in flow style)."""
    if isinstance(v, bool) or v is None or isinstance(v, (list, dict)):
        return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()
    return str(v)


def _run_name(stem: str, overrides: dict[str, Any]) -> str:
    parts = [stem] + [f"{k.split('.')[-1]}={_yaml_spelling(v)}" for k, v in overrides.items()
                      if not k.startswith("run.")]
    return safe_run_name("-".join(parts))


def safe_run_name(text: str) -> str:
    """``text`` as a valid ``run.name`` (other characters become ``_``; at most 120)."""
    name = re.sub(r"[^\w.=+-]+", "_", text)[:120]
    return "_" + name if name in ("", ".", "..") else name


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load ``path`` (default ``configs/tiny.yaml``), apply dotted overrides, validate once."""
    cfg_path = resolve_config_path(path)
    raw = _read_yaml(cfg_path)
    ov = parse_overrides(list(overrides or []))
    for key, value in ov.items():
        _set_dotted(raw, key, value)
    run = raw.setdefault("run", {}) if isinstance(raw.get("run", {}), dict) else raw["run"]
    if isinstance(run, dict) and not run.get("name"):
        run["name"] = _run_name(cfg_path.stem, ov)
    return validate(raw)


def check_trainable(cfg: Config) -> None:
    """Checks for ``tfm-jax train`` only (a config that evaluates may still not train)."""
    if cfg.quant.recipe in ("int8_weight", "int8_weight_asym", "int4_weight"):
        raise ConfigError(
            f"quant.recipe={cfg.quant.recipe} is post-training weight-only quantization: a run "
            "cannot be trained with it. Train with quant.recipe=none (or an fp8_* recipe), then "
            f"quantize the trained run: tfm-jax quantize --run-dir DIR --recipe "
            f"{cfg.quant.recipe}")


def check_runtime(cfg: Config, n_devices: int) -> dict[str, int]:
    """Checks that need the runtime: mesh size vs devices, batch divisibility. Returns mesh sizes."""
    sizes = cfg.mesh.resolved_sizes(n_devices)
    batch_rule = next((m for name, m in cfg.mesh.rules if name == "batch"), None)
    batch_axes = ([] if batch_rule is None else [batch_rule] if isinstance(batch_rule, str)
                  else list(batch_rule))
    shards = math.prod(sizes[a] for a in batch_axes)
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % shards:
        raise ConfigError(
            f"train.batch_size/train.grad_accum = {micro} sequences per micro-batch is not "
            f"divisible by the {shards} batch shards ("
            f"{'*'.join('mesh.' + a for a in batch_axes)}, the batch rule's axes); change the batch "
            "size or the mesh")
    return sizes


def compose_config(path: Optional[str], layers: list[dict[str, Any]]) -> Config:
    """Load ``path`` (a YAML file or a shipped config name; None: the default), apply each
    mapping of ``layers`` in order, validate once. A layer's keys are dotted
    (``{"model.n_heads": 1}``) or sections holding mappings (``{"model": {"n_heads": 1}}``,
    merged into the section); values are taken as they are (already parsed YAML). ``run.name``
    is left as the layers set it (no name is derived). Used by the ablation runner
    (:mod:`tfm_jax.ablate`), whose variants are override mappings."""
    import copy

    raw = _read_yaml(resolve_config_path(path))
    for layer in layers:
        for key, value in copy.deepcopy(layer or {}).items():   # never alias the caller's dicts
            if not isinstance(key, str):
                raise ConfigError(f"override key {key!r} must be a string such as model.n_heads")
            if "." in key:
                _set_dotted(raw, key, value)
            elif isinstance(value, dict) and isinstance(raw.get(key), dict):
                _deep_merge(raw[key], value)
            else:
                raw[key] = value
    return validate(raw)
