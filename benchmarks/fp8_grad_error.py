"""How much does each FP8 tensor change one training gradient? A probe behind the
``fp8_error_sources`` study ("Where the loss goes" in docs/low-precision.md).

At the weights of a trained float32 run, the gradient of the training loss on a batch is taken
with the fp32 model and with the FP8 dot quantizing one tensor at a time
(``quant.fp8_operands``, fp8_dynamic scales: the same weights need no history), all three, the
e4m3 output gradient, and bf16 compute. Printed per variant:

* ``cos`` and ``rel err``: cosine and relative L2 distance to the fp32 gradient of the same batch
  (for scale, the same for the fp32 gradient of the *next* batch: the minibatch noise);
* ``systematic``: over ``--batches`` batches, ||mean error|| / mean ||error||. Errors that are
  independent from batch to batch give 1/sqrt(batches); errors with a fixed direction (a changed
  function, a rounding bias) give up to 1.

    python -m benchmarks.fp8_grad_error --run-dir runs/ablate/fp8_error_sources/fp32/seed0
    python -m benchmarks.fp8_grad_error --run-dir runs/tiny --batches 8 --json out.json

The run must be float32 without FP8 state (a ``quant.recipe=none`` run), so that its parameters
fit every variant's model. CPU, one device; about a minute for 8 batches on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

VARIANTS = {
    "fp32, next batch (minibatch noise)": None,
    "fp32, XLA's GEMMs (summation order)": ["backend.cpu_kernels=xla"],
    "input e4m3": ["quant.recipe=fp8_dynamic", "quant.fp8_operands=[input]"],
    "kernel e4m3": ["quant.recipe=fp8_dynamic", "quant.fp8_operands=[kernel]"],
    "output gradient e5m2": ["quant.recipe=fp8_dynamic", "quant.fp8_operands=[output_grad]"],
    "output gradient e4m3": ["quant.recipe=fp8_dynamic", "quant.fp8_operands=[output_grad]",
                             "quant.bwd_format=float8_e4m3fn"],
    "all three (e4m3, e4m3, e5m2)": ["quant.recipe=fp8_dynamic"],
    "bf16 compute": ["model.dtype=bfloat16"],
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", required=True, help="a finished float32 run (quant.recipe none)")
    ap.add_argument("--batches", type=int, default=8, help="batches for the systematic ratio")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from tfm_jax import data as data_lib
    from tfm_jax.ablate.provenance import load_average, provenance
    from tfm_jax.train.checkpoint import restore_latest
    from tfm_jax.tools.convert import load_run_config
    from tfm_jax.train import build, masked_ce_sum

    devices = jax.devices()[:1]
    prov = provenance("python -m benchmarks.fp8_grad_error " + " ".join(
        sys.argv[1:] if argv is None else argv), devices)
    run = pathlib.Path(args.run_dir)
    base = load_run_config(run)
    if base.quant.recipe != "none":
        print(f"--run-dir {run}: quant.recipe={base.quant.recipe}; give a float32 run "
              "(quant.recipe none), whose parameters fit every variant", file=sys.stderr)
        return 2
    setup = build(base, devices)
    state = restore_latest(run / "checkpoints", setup.abstract_state(), what="fp8_grad_error")
    corpus = data_lib.load_corpus(base.data.path, base.data.val_fraction, base.data.cache_dir)

    def batch(i: int) -> dict:
        b = data_lib.train_batch(corpus.train, corpus.train_doc_starts, step=10_000 + i, seed=0,
                                 batch_size=base.train.batch_size, seq_len=base.data.seq_len)
        return {k: jnp.asarray(v) for k, v in b.items()}

    grad_fns = {}

    def grad(overrides: list[str], b: dict) -> np.ndarray:
        key = tuple(overrides)
        if key not in grad_fns:
            s = build(load_run_config(run, overrides), devices)

            def loss(params, bb):
                logits = s.model.apply({"params": params, **state.model_state}, bb["inputs"])
                return (masked_ce_sum(logits.astype(jnp.float32), bb["targets"], bb["mask"])
                        / jnp.sum(bb["mask"]))

            with s.context():
                grad_fns[key] = (s, jax.jit(jax.grad(loss)))
        s, fn = grad_fns[key]
        with s.context():
            g = fn(state.params, b)
        return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(g)])

    batches = [batch(i) for i in range(args.batches + 1)]
    ref = [grad([], b) for b in batches]
    rows = {}
    for name, overrides in VARIANTS.items():
        if overrides is None:        # the next batch's fp32 gradient
            errs = [ref[i + 1] - ref[i] for i in range(args.batches)]
        else:
            errs = [grad(overrides, batches[i]) - ref[i] for i in range(args.batches)]
        g0 = ref[0]
        g1 = g0 + errs[0]
        norms = [np.linalg.norm(e) for e in errs]
        rows[name] = {
            "cos": float(g1 @ g0 / (np.linalg.norm(g1) * np.linalg.norm(g0))),
            "rel_err": float(np.mean([n / np.linalg.norm(ref[i]) for i, n in enumerate(norms)])),
            "systematic": float(np.linalg.norm(np.mean(errs, axis=0)) / max(np.mean(norms),
                                                                             1e-300)),
        }
    print(f"run {run} (step {int(state.step)}), {args.batches} batches of "
          f"{base.train.batch_size} x {base.data.seq_len}; independent errors give systematic "
          f"= 1/sqrt({args.batches}) = {args.batches ** -0.5:.3f}")
    print(f"{'variant':42s} {'cos (batch 0)':>13s} {'rel err':>8s} {'systematic':>10s}")
    for name, r in rows.items():
        print(f"{name:42s} {r['cos']:13.6f} {r['rel_err']:8.4f} {r['systematic']:10.3f}")
    if args.json:
        prov["load_end"] = load_average()
        pathlib.Path(args.json).write_text(json.dumps(
            {"run_dir": str(run), "step": int(state.step), "batches": args.batches,
             "variants": rows, "provenance": prov}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
