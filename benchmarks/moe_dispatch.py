"""MoE-layer throughput (forward + backward) of the three dispatch strategies, side by side.

One MoE layer (:func:`tfm_jax.layers.moe.dispatch.moe_layer`, SwiGLU experts) on 8 fake CPU
devices (``--mesh DATA,EXPERT``, default 2,4): the same tokens, parameters and cotangent for
``dense`` (every expert on every token, the single-device reference laid over the mesh by
XLA), ``all_to_all`` (explicit ``shard_map`` + two ``jax.lax.all_to_all``) and ``implicit``
(sharding constraints only). The jitted value-and-gradient of each runs interleaved (dense,
all_to_all, implicit, dense, ... for ``--repeats`` rounds); the median step time gives
tokens/s and the ratio to ``dense`` (issue #12's target: all_to_all >= 0.8x dense). It also
counts the all-to-all bytes in the compiled HLO of ``all_to_all`` and checks them against the
capacity formula: 4 all-to-alls (2 forward, 2 backward) of an (E, C, d) buffer per device,
``C = ceil(cf * N * k / E)`` with N tokens per device.

The 8 "devices" share the machine's cores (2 on the development VM): the ratios compare
layouts and collectives on one host, not a cluster; on a loaded machine say so next to them.

    python -m benchmarks.moe_dispatch                           # 8 devices, data 2 x expert 4
    python -m benchmarks.moe_dispatch --tokens 4096 --d-model 256 --hidden 512 --experts 8
    python -m benchmarks.moe_dispatch --tokens 256 --d-model 32 --hidden 64 --repeats 1 --json o.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import sys
import time
from typing import Optional

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

STRATEGIES = ("dense", "all_to_all", "implicit")
# not a dispatch: a plain SwiGLU FFN of hidden top_k * F (the MoE layer's active expert FLOPs
# without capacity slack), data-parallel over all devices -- the cost floor of the layer
FFN_ROW = "ffn_k_x_F"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="MoE layer fwd+bwd: dense vs all_to_all vs implicit")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per step (all devices)")
    p.add_argument("--seq", type=int, default=128, help="tokens per row (batch = tokens/seq)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256, help="expert FFN width")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--mesh", default="2,4", help="DATA,EXPERT (product = device count)")
    p.add_argument("--steps", type=int, default=5, help="timed calls per round and strategy")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    p.add_argument("--json", type=pathlib.Path, help="also write the results here")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from tfm_jax.config import load_config
    from tfm_jax.tools.inspect import collectives
    from tfm_jax.layers import moe as moe_lib
    from tfm_jax.layers.functional import swiglu
    from tfm_jax.parallel import mesh as mesh_lib
    from tfm_jax.layers.moe import dispatch as md

    data, expert = (int(v) for v in args.mesh.split(","))
    if data * expert != len(jax.devices()):
        raise SystemExit(f"--mesh {args.mesh}: {data * expert} devices, but jax has "
                         f"{len(jax.devices())}; set XLA_FLAGS=--xla_force_host_platform_device_"
                         f"count={data * expert} or change --mesh")
    cfg = load_config(None, [f"moe.n_experts={args.experts}", f"mesh.data={data}",
                             f"mesh.expert={expert}"])
    mesh, rules = mesh_lib.make_mesh(cfg.mesh), mesh_lib.rules_tuple(cfg.mesh.rules)
    e, d, f, k = args.experts, args.d_model, args.hidden, args.top_k
    b = args.tokens // args.seq
    if b % (data * expert) or b * args.seq != args.tokens:
        raise SystemExit(f"--tokens {args.tokens} / --seq {args.seq} = {b} rows: must be a "
                         f"multiple of the {data * expert} token shards")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(b, args.seq, d)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(b, args.seq, d)), jnp.float32)
    wr = jnp.asarray(rng.normal(0, d ** -0.5, (d, e)), jnp.float32)
    ks = {n: jnp.asarray(rng.normal(0, s[1] ** -0.5, s), jnp.float32)
          for n, s in (("wi_0", (e, d, f)), ("wi_1", (e, d, f)), ("wo", (e, f, d)))}
    spec = md.MoESpec(e, k, args.capacity_factor)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        tok = md.token_axes()
        g = md.n_groups()
        shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(tok))
        by_expert = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert"))
        x, cot = jax.device_put(x, shard), jax.device_put(cot, shard)
        ks = {n: jax.device_put(v, by_expert) for n, v in ks.items()}
        fns, compiled = {}, {}
        fk = {"wi_0": jnp.concatenate(list(ks["wi_0"][:k]), axis=1),
              "wi_1": jnp.concatenate(list(ks["wi_1"][:k]), axis=1),
              "wo": jnp.concatenate(list(ks["wo"][:k]), axis=0)}      # (d, kF), (kF, d)

        def ffn_loss(x, wr, fk):
            h = swiglu(x @ fk["wi_0"], x @ fk["wi_1"])
            return jnp.sum((h @ fk["wo"]) * cot) + 0.0 * jnp.sum(wr)

        fn = jax.jit(jax.value_and_grad(ffn_loss, argnums=(0, 1, 2)))
        compiled[FFN_ROW] = fns[FFN_ROW] = fn.lower(x, wr, fk).compile()
        args_of = {s: (x, wr, ks) for s in STRATEGIES}
        args_of[FFN_ROW] = (x, wr, fk)
        for s in STRATEGIES:
            def loss(x, wr, ks, s=s):
                y, st = md.moe_layer(x, wr, ks, spec, strategy=s)
                return jnp.sum(y * cot) + 0.01 * st["aux_loss"] + 1e-3 * st["z_loss"]
            fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
            compiled[s] = fn.lower(x, wr, ks).compile()
            fns[s] = compiled[s]
        names = STRATEGIES + (FFN_ROW,)
        outs = {s: jax.device_get(fns[s](*args_of[s])) for s in names}
        times: dict[str, list[float]] = {s: [] for s in names}
        for _ in range(args.repeats):
            for s in names:
                jax.block_until_ready(fns[s](*args_of[s]))
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    out = fns[s](*args_of[s])
                jax.block_until_ready(out)
                times[s].append((time.perf_counter() - t0) / args.steps)
    n = args.tokens // g
    cap = moe_lib.expert_capacity(n, e, k, args.capacity_factor)
    a2a = {s: collectives(compiled[s].as_text()).get("all-to-all", {"count": 0, "bytes": 0})
           for s in names}
    predicted = 4 * e * cap * d * 4
    med = {s: statistics.median(v) for s, v in times.items()}
    ref_loss = float(outs["dense"][0])
    rows = {s: {"step_s": med[s], "tokens_per_s": args.tokens / med[s],
                "vs_dense": med["dense"] / med[s], "times_s": times[s],
                "loss": float(outs[s][0]),
                "loss_rel_diff": (abs(float(outs[s][0]) - ref_loss) / max(abs(ref_loss), 1e-30)
                                  if s != FFN_ROW else None),
                "all_to_all_count": a2a[s].get("count", 0),
                "all_to_all_bytes": a2a[s].get("bytes", 0)} for s in names}
    return {"config": {**vars(args), "json": str(args.json) if args.json else None,
                       "groups": g, "tokens_per_group": n, "capacity": cap},
            "capacity_formula_bytes": predicted,
            "all_to_all_bytes_ok": rows["all_to_all"]["all_to_all_bytes"] <= predicted,
            "rows": rows}


def report(res: dict) -> str:
    c = res["config"]
    lines = [f"MoE layer fwd+bwd, {c['tokens']} tokens x d {c['d_model']}, {c['experts']} experts "
             f"(hidden {c['hidden']}), top-{c['top_k']}, cf {c['capacity_factor']}, mesh "
             f"data,expert = {c['mesh']} ({c['groups']} groups of {c['tokens_per_group']} "
             f"tokens, C = {c['capacity']})",
             f"{'strategy':<11} {'step ms':>9} {'tokens/s':>10} {'vs dense':>9} "
             f"{'a2a count':>9} {'a2a bytes':>10} {'loss rel diff':>14}"]
    for s, r in res["rows"].items():
        lines.append(f"{s:<11} {r['step_s'] * 1e3:9.2f} {r['tokens_per_s']:10,.0f} "
                     f"{r['vs_dense']:8.2f}x {r['all_to_all_count']:9d} "
                     f"{r['all_to_all_bytes']:10,d} "
                     + (f"{r['loss_rel_diff']:14.1e}" if r["loss_rel_diff"] is not None
                        else f"{'(other model)':>14}"))
    a = res["rows"]["all_to_all"]
    lines.append(f"all_to_all bytes in the HLO: {a['all_to_all_bytes']:,} vs capacity formula "
                 f"4 x E x C x d x 4 B = {res['capacity_formula_bytes']:,} -> "
                 f"{'OK' if res['all_to_all_bytes_ok'] else 'MORE THAN PREDICTED'}")
    lines.append(f"{FFN_ROW}: a dense SwiGLU FFN of hidden top_k x F (the active expert FLOPs), "
                 "data-parallel: not a dispatch, the layer's cost floor")
    lines.append(f"target all_to_all >= 0.8x dense: {a['vs_dense']:.2f}x -> "
                 f"{'met' if a['vs_dense'] >= 0.8 else 'NOT met'}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    res = run(args)
    print(report(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
