"""Peak memory of ``tfm-jax import-hf`` against the size of the parameters it imports.

Writes two random Llama-shaped Hugging Face folders (``config.json`` + ``model.safetensors``,
float32, through :func:`tfm_jax.hf.mapping.tensor_table`: the names and shapes transformers
uses): the measured model (default d_model 512, 4 layers, 32k vocabulary, untied: 174 MiB) and
a tiny one. Each import runs in a fresh Python process (jax, orbax and tfm-jax imported first)
that reports its peak resident set (Linux ``/proc/self/status``: ``VmRSS`` before the command, the peak ``VmHWM`` -- reset
through ``clear_refs`` -- after it); the tiny
model's rise is the fixed cost (compiles, buffers), so ``(rise - tiny rise) / parameter
bytes`` is what the import costs per byte of parameters. ``read_hf`` alone (the streaming
reader, no run written) is measured the same way.

    python benchmarks/hf_import_memory.py
    python benchmarks/hf_import_memory.py --out benchmarks/results/hf_import_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Optional

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

MIB = 1 << 20

_CHILD = r"""
import json, re, sys
import jax, orbax.checkpoint                      # the fixed cost, before the measurement
from tfm_jax import cli, train
from tfm_jax.hf.checkpoint import read_hf

def status(key):
    text = open("/proc/self/status").read()
    return int(re.search(key + r":\s+(\d+) kB", text).group(1))

what, src, out = sys.argv[1:4]
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")     # reset the peak (VmHWM) to the current RSS
if what == "import":
    rc = cli.main(["import-hf", src, "--out", out])
else:
    m = read_hf(src)
    rc = 0
print(json.dumps({"rc": rc, "before_kib": before, "peak_kib": status("VmHWM")}))
"""


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="peak RSS of tfm-jax import-hf vs parameter bytes")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--out", help="write the figures as JSON here")
    return p.parse_args(argv)


def write_folder(dst: pathlib.Path, d_model: int, layers: int, vocab: int, seed: int = 0) -> dict:
    """A random float32 Llama folder; returns its parameter count, bytes and largest tensor."""
    import numpy as np
    from safetensors.numpy import save_file

    from tfm_jax.config import load_config
    from tfm_jax.hf import mapping

    cfg = load_config(None, [f"model.d_model={d_model}", f"model.n_layers={layers}",
                             f"model.vocab_size={vocab}", "model.n_heads=8",
                             "model.n_kv_heads=8", "model.tie_embeddings=false"])
    rng = np.random.default_rng(seed)
    tensors = {name: rng.standard_normal(shape, np.float32) * 0.02
               for _, name, _, _, shape in mapping.tensor_table(cfg.model)}
    dst.mkdir(parents=True)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    hf = mapping.hf_config(cfg.model, seq_len=256, dtype="float32")
    (dst / "config.json").write_text(json.dumps(hf, indent=2))
    sizes = [t.nbytes for t in tensors.values()]
    return {"params": int(sum(t.size for t in tensors.values())), "bytes": int(sum(sizes)),
            "largest_tensor_bytes": int(max(sizes))}


def peak_mib(what: str, src: pathlib.Path, out: pathlib.Path) -> tuple[float, float]:
    """(RSS before, peak RSS during) ``what`` in a fresh process, MiB."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, what, str(src), str(out)],
                          capture_output=True, text=True, cwd=_ROOT)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0 or not last.startswith("{"):
        raise SystemExit(f"{what} of {src} failed (exit {proc.returncode}):\n{proc.stderr}")
    row = json.loads(last)
    if row["rc"] != 0:
        raise SystemExit(f"{what} of {src} returned {row['rc']}:\n{proc.stderr}")
    return row["before_kib"] / 1024.0, row["peak_kib"] / 1024.0


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hf-import-mem-") as tmp:
        tmp = pathlib.Path(tmp)
        tiny = write_folder(tmp / "tiny", 64, 2, 512)
        big = write_folder(tmp / "big", args.d_model, args.layers, args.vocab)
        rows = {}
        for what in ("read", "import"):
            t0, t1 = peak_mib(what, tmp / "tiny", tmp / f"tiny-{what}")
            b0, b1 = peak_mib(what, tmp / "big", tmp / f"big-{what}")
            cost = (b1 - b0) - (t1 - t0)      # the tiny model's rise: compiles, buffers
            rows[what] = {"before_mib": round(b0, 1), "peak_mib": round(b1, 1),
                          "tiny_rise_mib": round(t1 - t0, 1), "rise_mib": round(b1 - b0, 1),
                          "per_param_byte": round(cost * MIB / big["bytes"], 2)}
    res = {"model": {"d_model": args.d_model, "layers": args.layers, "vocab": args.vocab,
                     "params": big["params"], "param_mib": round(big["bytes"] / MIB, 1),
                     "largest_tensor_mib": round(big["largest_tensor_bytes"] / MIB, 1)},
           "tiny_param_mib": round(tiny["bytes"] / MIB, 2), **rows}
    m = res["model"]
    print(f"model: d_model {m['d_model']}, {m['layers']} layers, vocab {m['vocab']}: "
          f"{m['params']:,} float32 parameters = {m['param_mib']} MiB (largest tensor "
          f"{m['largest_tensor_mib']} MiB)")
    for what, label in (("read", "read_hf (reader only)"), ("import", "tfm-jax import-hf")):
        r = rows[what]
        print(f"{label:22s} peak {r['peak_mib']:6.1f} MiB = before {r['before_mib']:.1f} + "
              f"{r['rise_mib']:.1f} (tiny model: +{r['tiny_rise_mib']:.1f}): "
              f"{r['per_param_byte']:.2f}x the parameter bytes")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
