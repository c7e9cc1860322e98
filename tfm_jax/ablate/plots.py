"""PNG plots of an ablation (matplotlib, Agg backend): loss curves and the plots an experiment
declares (``plots: [{x: kv_bytes, y: perplexity}, {x: context, y: decode_tokens_per_s}]``)."""

from __future__ import annotations

import pathlib
import re
from typing import Any, Optional


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _mean_band(curves: list[list[list[float]]]) -> tuple[list, list, list]:
    """Mean and std over seeds at the steps every seed logged."""
    import numpy as np

    common = set.intersection(*(set(s for s, _ in c) for c in curves)) if curves else set()
    steps = sorted(common)
    vals = np.array([[dict(map(tuple, c))[s] for s in steps] for c in curves], dtype=float)
    mean = vals.mean(0) if len(steps) else np.zeros(0)
    std = vals.std(0, ddof=1) if len(curves) > 1 else np.zeros_like(mean)
    return steps, mean, std


def loss_curves(runs: list[dict[str, Any]], variants: list[str], path: pathlib.Path) -> None:
    """Train loss (left) and validation loss (right) vs step: per variant the mean over its
    finished seeds, with a ±1 std band. Runs started from another run (``init_from``) continue
    its step axis (``step_offset``), their first validation point the one before training."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, kind, label in ((axes[0], "train", "train loss"), (axes[1], "val", "val loss")):
        for i, v in enumerate(variants):
            curves = [r["curves"][kind] for r in runs if r["variant"] == v
                      and r["status"] == "ok" and r.get("curves", {}).get(kind)]
            if not curves:
                continue
            steps, mean, std = _mean_band(curves)
            color = f"C{i % 10}"
            offs = {r.get("step_offset") for r in runs if r["variant"] == v} - {None}
            start = f", from step {min(offs)}" if offs else ""
            ax.plot(steps, mean, color=color, label=f"{v} (n={len(curves)}{start})",
                    marker="o" if kind == "val" else None, ms=3)
            ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, lw=0)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{label} (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("loss curves: mean over seeds, band = ±1 std")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_file(spec: dict[str, Any]) -> str:
    name = spec.get("file") or f"{spec['y']}-vs-{spec['x']}.png"
    return re.sub(r"[^\w.=+-]+", "_", name)


INTEGER_AXES = ("layer", "step", "seed", "n_layers", "batch")


def integer_ticks(ax: Any, x: str) -> None:
    """Whole-number ticks on an axis of counts (no "layer 1.5")."""
    if x in INTEGER_AXES:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot(spec: dict[str, Any], agg: dict[str, Any], variants: list[str],
         path: pathlib.Path) -> Optional[str]:
    """Draw one declared plot; returns None, or a message saying why it could not be drawn."""
    x, y = spec["x"], spec["y"]
    scal = agg["scalars"]
    has = lambda m: any(m in scal.get(v, {}) for v in variants)  # noqa: E731
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        if has(x) and has(y):
            for i, v in enumerate(variants):
                sx, sy = scal.get(v, {}).get(x), scal.get(v, {}).get(y)
                if not (sx and sy):
                    continue
                ax.errorbar(sx["mean"], sy["mean"], xerr=sx["std"] or 0, yerr=sy["std"] or 0,
                            fmt="o", color=f"C{i % 10}", capsize=3, label=v)
                ax.annotate(v, (sx["mean"], sy["mean"]), textcoords="offset points",
                            xytext=(5, 5), fontsize=8)
            ax.set_title(spec.get("title") or f"{y} vs {x} (mean ± std over seeds)")
        else:
            entry = next((s for s in agg["series"].values() if x in s["by"]
                          and any(y in r for r in s["rows"])), None)
            if entry is None:
                where = "a scalar metric" if has(y) else "not measured"
                return (f"plot {y} vs {x}: no measurement series has key {x!r} with value "
                        f"{y!r} ({y!r} is {where}; scalar metrics: "
                        f"{', '.join(sorted({m for v in variants for m in scal.get(v, {})}))})")
            keys = [k for k in spec.get("series_keys", ["variant"]) if k != x]
            rows = [r for r in entry["rows"] if y in r and r["variant"] in variants
                    and all(r.get(k) == val for k, val in spec.get("where", {}).items())]
            groups: dict[tuple, list] = {}
            for r in rows:
                groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
            # a variant keeps its colour across plots (its index); other keys get line styles
            vi = keys.index("variant") if "variant" in keys else None
            rest = sorted({tuple(v for j, v in enumerate(g) if j != vi) for g in groups},
                          key=str)
            order = sorted(groups, key=lambda g: (variants.index(g[vi]) if vi is not None
                                                  else 0, str(g)))
            for i, g in enumerate(order):
                rs = sorted(groups[g], key=lambda r: r[x])
                xs = [r[x] for r in rs]
                mean = [r[y]["mean"] for r in rs]
                std = [r[y]["std"] or 0.0 for r in rs]
                label = ", ".join(f"{k}={val}" if k != "variant" else str(val)
                                  for k, val in zip(keys, g))
                color = f"C{(variants.index(g[vi]) if vi is not None else i) % 10}"
                style = ("-", "--", ":", "-.")[
                    rest.index(tuple(v for j, v in enumerate(g) if j != vi)) % 4]
                ax.plot(xs, mean, marker="o", color=color, ls=style, label=label)
                ax.fill_between(xs, [m - s for m, s in zip(mean, std)],
                                [m + s for m, s in zip(mean, std)], color=color,
                                alpha=0.2, lw=0)
            filt = ", ".join(f"{k}={v}" for k, v in spec.get("where", {}).items())
            ax.set_title(spec.get("title") or f"{y} vs {x}" + (f" ({filt})" if filt else ""))
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        integer_ticks(ax, x)
        if spec.get("logx"):
            ax.set_xscale("log")
        if spec.get("logy"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        return None
    finally:
        plt.close(fig)
