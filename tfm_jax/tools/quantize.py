"""``tfm-jax quantize``: a trained run -> a weight-only INT8 / INT4 quantized run (PTQ).

:func:`quantize_run` restores a run's latest checkpoint, quantizes every projection kernel per
output channel (:mod:`tfm_jax.quant.ptq`; the embedding and the LM head stay high precision) and
writes a **new run directory**:

* ``config.yaml``: the source's config with ``quant.recipe`` set and ``run.dir`` pointing here;
* ``checkpoints/<step>``: an orbax checkpoint of ``{"step", "params", "model_state"}`` where
  each quantized kernel is ``{"q": int8 | uint8, "scale": float32[, "zero_point": uint8]}`` --
  real low-bit arrays on disk -- and no optimizer state (the run cannot be trained further);
* ``quantize.json``: provenance, bytes of the quantized weights vs the original, and (by
  default) validation loss / perplexity of both and the perplexity change.

``tfm-jax eval`` / ``tfm-jax generate --run-dir OUT`` load such a run through
:func:`restore_quantized`: the kernels are dequantized to the compute dtype (``model.dtype``)
once, then the ordinary model runs (what a weight-only dot does on CPU anyway). Training one is
refused: ``train --resume`` of a quantized run (or ``train`` with an integer ``quant.recipe``)
exits 2 -- quantization-aware training is not implemented, and the dequantized weights have no
optimizer state.

Which axes of a kernel are its inputs is read from the model itself: :func:`linear_info` traces
``model.init`` abstractly and records every ``Linear``'s path, ``in_axes`` and output rank
(``nn.intercept_methods``), so the per-channel rule follows the layers (q/k/v (d, H, Dh), the
output projection (H, Dh, d), scanned stacks) without a table of names.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Optional

from tfm_jax.config import Config, ConfigError
from tfm_jax.config.schema import safe_run_name
from tfm_jax.core import rundir
from tfm_jax.quant.ptq import RECIPES, dequantize_params, quantize_params, selects, tree_bytes


def is_quantized_run(cfg: Config) -> bool:
    """Whether ``cfg`` describes a weight-only PTQ run written by ``tfm-jax quantize``."""
    return cfg.quant.recipe in RECIPES


def linear_info(model: Any, seq_len: int = 8) -> dict[tuple[str, ...], tuple[int, int]]:
    """{module path: (in_axes, number of output axes)} of every ``Linear`` of ``model``
    (abstract trace of ``init``; nothing is computed)."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from tfm_jax.layers.linear import Linear

    info: dict[tuple[str, ...], tuple[int, int]] = {}

    def record(next_fun, args, kwargs, context):
        m = context.module
        if isinstance(m, Linear) and context.method_name == "__call__":
            feats = (m.features,) if isinstance(m.features, int) else tuple(m.features)
            info[tuple(m.path)] = (m.in_axes, len(feats))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32))
    return info


def _setup_and_sources(cfg: Config, devices: Optional[list]):
    from tfm_jax.platform import backends
    from tfm_jax.train import build

    backends.configure(cfg.backend)
    return build(cfg, devices)


def _abstract_quantized(setup, recipe: str, info) -> dict:
    """The checkpoint tree's shapes/dtypes (replicated on the run's mesh) for orbax restore."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    abstract = setup.abstract_state()
    tree = {"step": abstract.step,
            "params": jax.eval_shape(lambda p: quantize_params(p, recipe, info), abstract.params),
            "model_state": abstract.model_state}
    rep = NamedSharding(setup.mesh, P())
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), tree,
                        is_leaf=lambda x: isinstance(x, (jax.ShapeDtypeStruct, jnp.ndarray)))


def _refuse_training(*_args, **_kw):
    raise RuntimeError("a weight-only quantized run cannot be trained: quantization-aware "
                       "training is not implemented; train the source run instead")


def restore_quantized(cfg: Config, devices: Optional[list] = None):
    """(setup, state) of a quantized run: the checkpoint's int8 / packed-int4 kernels
    dequantized to ``model.dtype`` and placed with the params' shardings. ``state.opt_state`` is
    None and ``setup.train_step`` refuses; ``setup.eval_step`` and generation work as usual."""
    import jax
    import jax.numpy as jnp

    from tfm_jax.train.checkpoint import restore_latest
    from tfm_jax.train import TrainState, make_eval_step

    setup = _setup_and_sources(cfg, devices)
    recipe = cfg.quant.recipe
    info = linear_info(setup.model, cfg.data.seq_len)
    tree = restore_latest(cfg.run_dir / "checkpoints", _abstract_quantized(setup, recipe, info),
                          what="quantized run",
                          fix="is it a run written by 'tfm-jax quantize'?")
    sh = setup.state_shardings
    dtype = jnp.dtype(cfg.model.dtype)
    with setup.context():
        params = jax.jit(lambda q: dequantize_params(q, recipe, dtype),
                         out_shardings=sh.params)(tree["params"])
        model_state = jax.device_put(tree["model_state"], sh.model_state)
        step = jax.device_put(tree["step"], sh.step)
    state = TrainState(step, params, model_state, None)
    shardings = TrainState(sh.step, sh.params, sh.model_state, None)
    batch = {k: setup.batch_sharding for k in ("inputs", "targets", "mask")}
    eval_step = jax.jit(make_eval_step(setup.model), in_shardings=(shardings, batch))
    setup = dataclasses.replace(setup, state_shardings=shardings, eval_step=eval_step,
                                train_step=_refuse_training, init_fn=_refuse_training)
    return setup, state


@dataclasses.dataclass
class QuantizeResult:
    out_dir: pathlib.Path
    config: Config
    recipe: str
    source_step: int
    weight_bytes: int           # the quantized kernels in the source run (param dtype)
    quantized_weight_bytes: int  # the same kernels quantized (codes + scales + zero points)
    params_bytes: int           # the whole params tree, before
    quantized_params_bytes: int  # and after
    eval: Optional[dict]        # {"source": {...}, "quantized": {...}, "ppl_delta_pct": x}


def default_out_dir(run_dir: pathlib.Path, recipe: str) -> pathlib.Path:
    return run_dir.parent / f"{run_dir.name}-{recipe}"


def quantize_run(run_dir: pathlib.Path | str, recipe: str,
                 out_dir: Optional[pathlib.Path | str] = None, *, evaluate: bool = True,
                 corpus: Any = None, devices: Optional[list] = None) -> QuantizeResult:
    """Quantize the latest checkpoint of ``run_dir`` with ``recipe`` into a new run directory
    (default ``<run_dir>-<recipe>``); see the module docstring for what it holds."""
    import jax

    from tfm_jax import data as data_lib
    from tfm_jax.train.checkpoint import Checkpointer, restore_latest
    from tfm_jax.tools.convert import load_run_config
    from tfm_jax.train import evaluate as eval_fn

    if recipe not in RECIPES:
        raise ConfigError(f"quantize: --recipe {recipe!r}; valid: {', '.join(RECIPES)}")
    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"quantize: --run-dir {run_dir} does not exist; give the directory "
                          "of a run trained with 'tfm-jax train'")
    src_cfg = load_run_config(run_dir)
    if src_cfg.quant.recipe != "none":
        raise ConfigError(f"quantize: {run_dir} is already quantized (quant.recipe="
                          f"{src_cfg.quant.recipe}); quantize the full-precision run it came "
                          "from instead")
    out_dir = pathlib.Path(out_dir) if out_dir is not None else default_out_dir(run_dir, recipe)
    if out_dir.resolve() == run_dir.resolve():
        raise FileExistsError(f"quantize: --out {out_dir} is the source run; choose a new "
                              "directory")
    if (out_dir / "checkpoints").exists() and any((out_dir / "checkpoints").iterdir()):
        raise FileExistsError(f"quantize: {out_dir} already holds checkpoints; choose another "
                              "--out or remove it")
    rundir.claim_output_dir(out_dir, "quantize: --out")   # never into another folder's files
    rundir.check_run_dir(run_dir)
    new_cfg = src_cfg.replace(**{"quant.recipe": recipe, "run.dir": str(out_dir),
                                 "run.name": safe_run_name(out_dir.name)})

    setup = _setup_and_sources(src_cfg, devices)
    src_state = restore_latest(run_dir / "checkpoints", setup.abstract_state(),
                               what="quantize")
    source_step = int(src_state.step)
    info = linear_info(setup.model, src_cfg.data.seq_len)
    params = jax.device_get(src_state.params)
    qparams = jax.device_get(jax.jit(lambda p: quantize_params(p, recipe, info))(params))
    tree = {"step": jax.device_get(src_state.step), "params": qparams,
            "model_state": jax.device_get(src_state.model_state)}

    out_dir.mkdir(parents=True, exist_ok=True)
    rundir.atomic_write(out_dir / "config.yaml", new_cfg.to_yaml())
    tok = data_lib.run_tokenizer(run_dir, src_cfg.data.tokenizer)
    data_lib.tokenizer.copy_into(tok, out_dir)
    data_lib.inherit_run_corpus(run_dir, out_dir)
    ckpt = Checkpointer(out_dir / "checkpoints", keep=1, async_save=False)
    try:
        ckpt.save(source_step, tree)
        ckpt.wait()
    finally:
        ckpt.close()

    wb = tree_bytes(params, selects)
    qwb = tree_bytes(qparams, lambda names: selects(names[:-1]))
    ev = None
    if evaluate:
        corpus = corpus or data_lib.corpus_for(src_cfg.data, tok)
        src_ev = eval_fn(setup, src_state, corpus.val)
        del src_state
        q_setup, q_state = restore_quantized(new_cfg, devices)
        q_ev = eval_fn(q_setup, q_state, corpus.val)
        ev = {"source": src_ev, "quantized": q_ev,
              "ppl_delta_pct": 100.0 * (q_ev["val_ppl"] / src_ev["val_ppl"] - 1.0)}
    res = QuantizeResult(out_dir, new_cfg, recipe, source_step, wb, qwb, tree_bytes(params),
                         tree_bytes(qparams), ev)
    info_json = {"source_run": str(run_dir), "source_step": source_step, "recipe": recipe,
                 "granularity": "per output channel", "kept_high_precision":
                 "token embedding, LM head, norms, biases",
                 "weight_bytes": wb, "quantized_weight_bytes": qwb,
                 "params_bytes": res.params_bytes,
                 "quantized_params_bytes": res.quantized_params_bytes, "eval": ev}
    rundir.atomic_write(out_dir / "quantize.json", json.dumps(info_json, indent=2))
    return res


def summary(res: QuantizeResult) -> str:
    """The lines ``tfm-jax quantize`` prints."""
    def kib(b):
        return f"{b / 2**10:,.1f} KiB"

    ratio = res.weight_bytes / max(res.quantized_weight_bytes, 1)
    lines = [f"quantized step {res.source_step} with {res.recipe} (per output channel; "
             f"embedding and LM head kept) -> {res.out_dir}",
             f"  projection weights {kib(res.weight_bytes)} -> {kib(res.quantized_weight_bytes)}"
             f" ({ratio:.2f}x smaller, scales included); all params "
             f"{kib(res.params_bytes)} -> {kib(res.quantized_params_bytes)}"]
    if res.eval:
        s, q = res.eval["source"], res.eval["quantized"]
        lines.append(f"  val loss {s['val_loss']:.4f} -> {q['val_loss']:.4f} nats/token, ppl "
                     f"{s['val_ppl']:.3f} -> {q['val_ppl']:.3f} "
                     f"({res.eval['ppl_delta_pct']:+.3f} %)")
    lines += [f"  config      {res.out_dir / 'config.yaml'}  (quant.recipe={res.recipe})",
              f"  checkpoints {res.out_dir / 'checkpoints'}",
              f"  provenance  {res.out_dir / 'quantize.json'}",
              f"evaluate: tfm-jax eval --run-dir {res.out_dir}",
              f"generate: tfm-jax generate --run-dir {res.out_dir}"]
    return "\n".join(lines)


__all__ = ["QuantizeResult", "default_out_dir", "is_quantized_run", "linear_info",
           "quantize_run", "restore_quantized", "summary"]
