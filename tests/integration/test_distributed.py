"""Multi-process settings (tfm_jax.parallel.distributed): flags > TFM_JAX_* variables > jax's cluster
detection, the errors of each bad setting, a missing peer ending with exit 3 and a clear message
instead of hanging, and (slow) checkpoints moving between 2-process and 1-process runs with the
uninterrupted run's loss trajectory."""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tfm_jax.parallel import distributed
from tfm_jax.train.checkpoint import Checkpointer
from tfm_jax.config import ConfigError, load_config
from tfm_jax.train.metrics import read_metrics
from tfm_jax.train import build, train

ROOT = pathlib.Path(__file__).resolve().parents[2]
_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- settings


def test_nothing_set_is_single_process():
    assert distributed.resolve(environ={}) is None
    distributed.initialize(None)          # no-op


def test_flags_win_over_variables_and_sources_are_named():
    env = {distributed.ENV_COORDINATOR: "10.0.0.9:999", distributed.ENV_NUM_PROCESSES: "4",
           distributed.ENV_PROCESS_ID: "3", distributed.ENV_TIMEOUT: "17"}
    s = distributed.resolve(coordinator="node1:1234", process_id=1, environ=env)
    assert (s.coordinator, s.num_processes, s.process_id, s.timeout_s) == ("node1:1234", 4, 1, 17)
    assert s.source("coordinator") == "--coordinator"
    assert s.source("num_processes") == "$TFM_JAX_NUM_PROCESSES"
    assert s.source("timeout_s") == "$TFM_JAX_DIST_TIMEOUT"
    s = distributed.resolve(environ=env)
    assert (s.coordinator, s.num_processes, s.process_id) == ("10.0.0.9:999", 4, 3)
    assert distributed.resolve(coordinator="h:1", num_processes=2, process_id=0,
                               environ={}).timeout_s == distributed.DEFAULT_TIMEOUT_S


def test_jax_coordinator_variable_is_used_when_others_are_given():
    env = {"JAX_COORDINATOR_ADDRESS": "head:4321"}
    assert distributed.resolve(environ=env) is None          # alone: not a multi-process run
    s = distributed.resolve(num_processes=2, process_id=1, environ=env)
    assert s.coordinator == "head:4321" and s.source("coordinator") == "$JAX_COORDINATOR_ADDRESS"


def test_cli_flags_reach_the_settings():
    from tfm_jax import cli

    args = cli._parser().parse_args(["train", "--coordinator", "h:5", "--num-processes", "2",
                                     "--process-id", "1", "--dist-timeout", "9", "train.steps=3"])
    s = distributed.from_args(args, environ={})
    assert (s.coordinator, s.num_processes, s.process_id, s.timeout_s) == ("h:5", 2, 1, 9)
    assert args.overrides == ["train.steps=3"]
    args = cli._parser().parse_args(["eval", "--cluster", "auto", "--process-id", "0"])
    assert (args.cluster, args.process_id) == ("auto", 0)


@pytest.mark.parametrize("kwargs, env, expect", [
    (dict(num_processes=2), {}, ["coordinator is not set", "--coordinator or "
                                 "$TFM_JAX_COORDINATOR", "process_id is not set"]),
    (dict(coordinator="h:1", num_processes=2, process_id=2), {}, ["--process-id=2",
                                                                  "0..1"]),
    (dict(coordinator="h:1", num_processes=0, process_id=0), {}, ["--num-processes=0", ">= 1"]),
    (dict(coordinator="hostonly", num_processes=2, process_id=0), {}, ["HOST:PORT"]),
    (dict(coordinator="h:99999", num_processes=2, process_id=0), {}, ["HOST:PORT"]),
    (dict(coordinator="h:1", num_processes=2, process_id=0, timeout_s=0), {},
     ["--dist-timeout=0", "positive"]),
    ({}, {"TFM_JAX_NUM_PROCESSES": "two"}, ["$TFM_JAX_NUM_PROCESSES='two'", "integer"]),
    ({}, {"TFM_JAX_DIST_TIMEOUT": "30"}, ["no multi-process setting", "--coordinator"]),
    (dict(cluster="nosuch"), {}, ["--cluster nosuch: unknown", "slurm"]),
])
def test_bad_settings(kwargs, env, expect):
    with pytest.raises(ConfigError) as err:
        distributed.resolve(environ=env, **kwargs)
    for text in expect:
        assert text in str(err.value), str(err.value)


def test_incomplete_settings_from_the_cli_exit_2(capsys):
    from tfm_jax import cli

    assert cli.main(["train", "--num-processes", "2", "--coordinator", "h:1"]) == 2
    assert "process_id is not set" in capsys.readouterr().err


def test_cluster_detection_is_jax_own(monkeypatch):
    """--cluster slurm inside a (faked) srun step: jax's SlurmCluster supplies coordinator,
    count, id and the local device; flags still win."""
    for k in _SLURM:
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ConfigError, match="srun step"):
        distributed.resolve(cluster="slurm", environ={})
    monkeypatch.setenv("SLURM_JOB_ID", "4100")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[017-020],other")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    s = distributed.resolve(cluster="slurm", environ={})
    port = 4100 % 2 ** 12 + 65535 - 2 ** 12 + 1          # jax's SLURM port rule
    assert (s.coordinator, s.num_processes, s.process_id) == (f"gpu017:{port}", 8, 5)
    assert s.local_device_ids == (1,) and s.source("process_id") == "cluster slurm"
    s = distributed.resolve(cluster="auto", coordinator="head:7", environ={})
    assert s.coordinator == "head:7" and s.process_id == 5
    s = distributed.resolve(environ={distributed.ENV_CLUSTER: "slurm"})
    assert s.num_processes == 8 and s.source("cluster") == "$TFM_JAX_CLUSTER"


# ----------------------------------------------------------------------------- missing peer


@pytest.mark.parametrize("pid", [0, 1])
def test_missing_peer_times_out_with_a_clear_error(tmp_path, pid):
    """Only one of 2 processes starts: after --dist-timeout 2 it ends with exit 3 and a message
    naming the coordinator, the expected processes and the timeout setting (jax alone would
    wait 300 s, then abort from C++)."""
    coord = f"127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "tfm_jax", "train", "--coordinator", coord,
                        "--num-processes", "2", "--process-id", str(pid), "--dist-timeout", "2",
                        f"run.dir={tmp_path / 'run'}", "train.steps=2",
                        "train.warmup_steps=0"], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert p.returncode == distributed.EXIT_MISSING_PEER, p.stdout[-2000:] + p.stderr[-2000:]
    for text in ("timed out after 2 s", f"process {pid} of 2", f"coordinator {coord}",
                 "not all 2 processes connected", "--dist-timeout SECONDS",
                 "$TFM_JAX_DIST_TIMEOUT"):
        assert text in p.stderr, p.stderr[-2000:]
    assert "DEADLINE_EXCEEDED" not in p.stderr        # ours came first, not jax's abort
    assert elapsed < 60, elapsed
    assert not (tmp_path / "run").exists()            # nothing was started


# ----------------------------------------------------------------------------- checkpoints

# min_lr_ratio=1: after the 1-step warm-up the learning rate is constant, so a run cut at step 2
# and resumed with train.steps=4 follows the same schedule as an uninterrupted 4-step run.
ARGS = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.multiple_of=16", "data.seq_len=32", "train.batch_size=16", "train.warmup_steps=1",
        "train.min_lr_ratio=1.0", "train.log_every=1", "train.eval_every=2",
        "train.checkpoint_every=2", "train.eval_batches=1", "train.sample_tokens=0",
        "run.progress=false", "run.tensorboard=false", "mesh.data=2", "mesh.fsdp=2",
        "mesh.tensor=2"]


def _two_processes(tmp_path, run_dir, overrides, *, via_env: bool, resume: bool,
                   command: str = "train") -> list[str]:
    """`tfm-jax train` (or `eval`) as 2 processes x 4 fake CPU devices on localhost (settings
    as flags, or as TFM_JAX_* variables); their outputs."""
    coord = f"127.0.0.1:{_free_port()}"
    base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    base.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
                XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = []
    for i in range(2):
        cmd = [sys.executable, "-m", "tfm_jax", command, *(["--resume"] if resume else [])]
        env = dict(base)
        if via_env:
            env.update(TFM_JAX_COORDINATOR=coord, TFM_JAX_NUM_PROCESSES="2",
                       TFM_JAX_PROCESS_ID=str(i), TFM_JAX_DIST_TIMEOUT="120")
        else:
            cmd += ["--coordinator", coord, "--num-processes", "2", "--process-id", str(i),
                    "--dist-timeout", "120"]
        target = [f"run.dir={run_dir}"] if command == "train" else ["--run-dir", str(run_dir)]
        procs.append(subprocess.Popen(cmd + overrides + target, env=env,
                                      cwd=tmp_path, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def _last_json(text: str) -> dict:
    """The last top-level JSON object printed (``json.dumps(indent=2)``) in ``text``."""
    return json.loads(re.findall(r"^\{$.*?^\}$", text, re.M | re.S)[-1])


def _losses(run_dir) -> list[tuple[int, float]]:
    rows = {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
    return sorted(rows.items())


@pytest.mark.slow
def test_checkpoints_move_between_2_and_1_processes(tmp_path, devices, capsys):
    """2 processes train 2 steps -> 1 process resumes to 4; 1 process trains 2 -> 2 processes
    resume to 4. Both follow the uninterrupted 1-process losses and end at its parameters; then
    `tfm-jax eval` on 2 processes gives the 1-process validation loss."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"class C{i}:\n    value = {i * 7 % 13}\n\n" for i in range(3000)))
    common = ARGS + [f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}"]

    def cfg(run_dir, steps):
        return load_config(None, common + [f"train.steps={steps}", f"run.dir={run_dir}"])

    ref = train(cfg(tmp_path / "ref", 4), devices=devices)
    ref_losses = _losses(tmp_path / "ref")
    assert [s for s, _ in ref_losses] == [1, 2, 3, 4]
    ref_params = jax.device_get(ref.state.params)

    def same_params(params):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                             rtol=1e-5, atol=1e-7),
                     ref_params, jax.device_get(params))

    # 2 processes (flags) save at step 2; 1 process resumes and finishes
    a = tmp_path / "two_then_one"
    _two_processes(tmp_path, a, common + ["train.steps=2"], via_env=False, resume=False)
    assert Checkpointer(a / "checkpoints").latest_step() == 2
    res = train(cfg(a, 4), resume=True, devices=devices)
    got = _losses(a)
    assert [s for s, _ in got] == [1, 2, 3, 4]
    np.testing.assert_allclose([l for _, l in got], [l for _, l in ref_losses], rtol=1e-6)
    same_params(res.state.params)

    # 1 process saves at step 2; 2 processes (TFM_JAX_* variables) resume and finish
    b = tmp_path / "one_then_two"
    train(cfg(b, 2), devices=devices)
    _two_processes(tmp_path, b, common + ["train.steps=4"], via_env=True, resume=True)
    got = _losses(b)
    assert [s for s, _ in got] == [1, 2, 3, 4]
    np.testing.assert_allclose([l for _, l in got], [l for _, l in ref_losses], rtol=1e-6)
    setup = build(cfg(b, 4), devices=devices)
    ck = Checkpointer(b / "checkpoints")
    assert ck.latest_step() == 4
    same_params(ck.restore(setup.abstract_state()).params)
    ck.close()

    # `tfm-jax eval` of that run on 2 processes = on 1 process (8 devices, in-process)
    from tfm_jax import cli

    outs = _two_processes(tmp_path, b, [], via_env=False, resume=False, command="eval")
    two = [_last_json(o) for o in outs]
    capsys.readouterr()
    assert cli.main(["eval", "--run-dir", str(b)]) == 0
    one = _last_json(capsys.readouterr().out)
    for r in two:
        assert r["step"] == 4
        np.testing.assert_allclose(r["val_loss"], one["val_loss"], rtol=1e-6)
