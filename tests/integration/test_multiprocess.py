"""A real 2-process `jax.distributed` run on localhost (4 fake CPU devices each, one global
8-device mesh) trains exactly like one process with 8 devices: same losses, same parameters."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np

from tfm_jax.train.checkpoint import Checkpointer
from tfm_jax.config import load_config
from tfm_jax.train.metrics import read_metrics
from tfm_jax.train import build, train

ARGS = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.multiple_of=16", "data.seq_len=32", "train.batch_size=16", "train.steps=4",
        "train.warmup_steps=1", "train.log_every=1", "train.eval_every=4",
        "train.checkpoint_every=4", "train.eval_batches=1", "train.sample_tokens=0",
        "run.progress=false", "run.tensorboard=false", "mesh.data=2", "mesh.fsdp=2",
        "mesh.tensor=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path, devices):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"class C{i}:\n    value = {i * 7 % 13}\n\n" for i in range(3000)))
    cache = tmp_path / "cache"
    mp_dir = tmp_path / "mp"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    worker = pathlib.Path(__file__).with_name("mp_worker.py")
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(worker), port, str(i), str(mp_dir),
                               str(corpus), str(cache), *ARGS], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]

    single = train(load_config(None, ARGS + [f"run.dir={tmp_path / 'one'}", f"data.path={corpus}",
                                             f"data.cache_dir={cache}"]), devices=devices)
    a = [(r["step"], r["loss"]) for r in read_metrics(mp_dir) if "loss" in r]
    b = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "one") if "loss" in r]
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    np.testing.assert_allclose([l for _, l in a], [l for _, l in b], rtol=1e-6)

    # the 2-process checkpoint restores on one process and equals the single-process result
    setup = build(single.setup.cfg, devices=devices)
    ck = Checkpointer(mp_dir / "checkpoints")
    restored = ck.restore(setup.abstract_state())
    ck.close()
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                         rtol=1e-5, atol=1e-7),
                 jax.device_get(single.state.params), jax.device_get(restored.params))
