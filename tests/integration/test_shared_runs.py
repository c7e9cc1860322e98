"""A run directory, config or experiment file received from someone else is data, never code:
the harmless proofs of the safety audit, run through the command line (``python -m tfm_jax``
in a subprocess). A library whose constructor writes a marker file stands for a planted plugin
(tests/rundir_support.py)."""

import os
import pathlib
import subprocess
import sys

import pytest

from tests.rundir_support import marker_library
from train_support import cli_env

TIMEOUT = 180
ROOT = str(pathlib.Path(__file__).resolve().parents[2])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return cli_env(tmp_path_factory.mktemp("tfm_jax_cache"))


def run(env, cwd, *args):
    return subprocess.run([sys.executable, "-m", "tfm_jax", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, errors="replace", timeout=TIMEOUT)


def one_line_error(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.startswith("tfm-jax:") and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


# ------------------------------------------------------------------------------ PJRT plugins


@pytest.fixture
def planted(tmp_path):
    """(a library that writes ``marker`` when loaded, the marker path)."""
    marker = tmp_path / "LOADED"
    return marker_library(tmp_path / "lib", marker), marker


def _received_run(folder: pathlib.Path, lib) -> pathlib.Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(
        f"backend:\n  platform: hpu\n  pjrt_plugin: {lib}\n")
    return folder


@pytest.mark.parametrize("command", ["eval", "generate", "calibrate", "quantize", "convert"])
def test_received_run_naming_a_plugin_loads_nothing(command, env, planted, tmp_path):
    lib, marker = planted
    run_dir = _received_run(tmp_path / "received", lib)
    extra = {"quantize": ["--recipe", "int8_weight"], "convert": ["--kv-heads", "1"]}
    err = one_line_error(run(env, tmp_path, command, "--run-dir", run_dir,
                             *extra.get(command, [])))
    assert "backend.pjrt_plugin" in err and "--pjrt-plugin" in err, err
    assert err.count("\n") == 1, err                                   # one line
    assert not marker.exists(), f"{command} loaded the library named by the run it read"


def test_config_and_experiment_naming_a_plugin_load_nothing(env, planted, tmp_path):
    lib, marker = planted
    cfg = tmp_path / "shared.yaml"
    cfg.write_text(f"backend:\n  platform: hpu\n  pjrt_plugin: {lib}\n")
    for args in (["train", "--config", cfg], ["inspect", "--config", cfg],
                 ["env", "--config", cfg]):
        err = one_line_error(run(env, tmp_path, *args))
        assert "--pjrt-plugin" in err, err
    exp = tmp_path / "exp.yaml"
    exp.write_text("name: planted\nbase: tiny\noverrides:\n  backend: {platform: hpu, "
                   f"pjrt_plugin: {lib}}}\nvariants:\n  a: {{}}\nseeds: [0]\n")
    proc = run(env, tmp_path, "ablate", exp, "--dry-run")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "--pjrt-plugin" in proc.stderr + proc.stdout
    assert not marker.exists()


def test_plugin_from_the_flag_is_loaded(env, planted, tmp_path):
    """The proof is live: the same library given on the command line is loaded (it is not a
    PJRT plugin, so the run then stops with the loader's message), by absolute path although
    it was given relative to the working directory."""
    lib, marker = planted
    proc = run(env, lib.parent, "env", "--no-measure", "--pjrt-plugin", lib.name,
               "backend.platform=hpu")          # env reports the plugin error in its report
    assert proc.returncode == 2 and marker.exists(), (proc.stdout, proc.stderr)
    assert str(lib) in proc.stdout and "did not load as a PJRT plugin" in proc.stdout


# ------------------------------------------------------------------------------ kernel cache


@pytest.mark.skipif(sys.platform != "linux", reason="the native kernels build on Linux only")
def test_planted_kernel_library_in_a_shared_cache_never_runs(env, tmp_path):
    """The audit: a library planted at the kernel cache's computed path of a shared
    $TFM_JAX_CACHE ran under 'tfm-jax env'. Now the cache is refused (group/world-writable),
    the kernels fall back to XLA with the reason, and the marker is never written."""
    from tfm_jax.platform.kernels import cpu

    shared = tmp_path / "shared-cache"
    _, _, out_dir = cpu._build_plan(shared)
    marker = tmp_path / "LOADED"
    lib = marker_library(tmp_path / "lib", marker)
    out_dir.mkdir(parents=True)
    (out_dir / "libtfm_cpu_kernels.so").write_bytes(lib.read_bytes())
    for d in (shared, shared / "kernels", out_dir):
        os.chmod(d, 0o777)
    proc = run({**env, "TFM_JAX_CACHE": str(shared)}, tmp_path, "env", "--no-measure")
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
    assert "writable by group or others" in proc.stdout, proc.stdout


# ------------------------------------------------------------------------------ resources


def test_step_that_does_not_fit_stops_with_one_line(env, tmp_path):
    """The audit: seq_len=16384, batch 32 under an 8 GB address-space limit printed the state
    size, then died allocating ~19 GB with a traceback (exit 1). Now: one line, exit 2, before
    any state is allocated."""
    proc = subprocess.run(["sh", "-c", 'ulimit -v 8388608 && exec "$0" "$@"', sys.executable,
                           "-m", "tfm_jax", "train", "data.seq_len=16384", "train.batch_size=32",
                           f"run.dir={tmp_path / 'big'}", "run.progress=false"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    err = one_line_error(proc)
    assert "compiled train step needs about" in err and "train.memory_check=false" in err, err
    assert "ulimit -v" in err
    assert not (tmp_path / "big" / "config.yaml").exists()


def test_memory_check_can_be_forced(tmp_path, monkeypatch, devices):
    """train.memory_check=false: not checked, the run opens (stopped before its first step)."""
    from train_support import small_cfg
    from tfm_jax import train as train_lib
    from tfm_jax.train import loop, memory

    run = tmp_path / "run"
    monkeypatch.setattr(memory, "check_fits", lambda *a: pytest.fail("checked although forced"))
    monkeypatch.setattr(loop.Trainer, "run", lambda self: "opened")
    assert train_lib.train(small_cfg(run, "mesh.data=1", "train.steps=2",
                                     "train.memory_check=false"), devices=devices[:1]) == "opened"
    assert (run / "config.yaml").exists()


# ------------------------------------------------------------------------------ coordinator


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} write them) listening on ``port``."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.rsplit(":", 1)
            if int(p, 16) == port and state == "0A":
                out.append(addr)
    return out


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads /proc/net/tcp")
def test_coordinator_listens_on_the_given_address_only(env, tmp_path):
    """The audit: --coordinator 127.0.0.1:P listened on *:P (jax's default bind)."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import sys; from tfm_jax.parallel import distributed as d; "
            f"d.initialize(d.resolve(coordinator='127.0.0.1:{port}', num_processes=2, "
            "process_id=0, timeout_s=60))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not _listening(port) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        addrs = _listening(port)
    finally:
        proc.kill()
        proc.wait()
    assert addrs, "the coordinator never listened"
    # 127.0.0.1 is 0100007F in /proc/net/tcp (::ffff:127.0.0.1 in tcp6 ends the same);
    # every interface would be all zeros
    assert all(a.endswith("0100007F") for a in addrs), addrs


# ------------------------------------------------------------------------------ run directories

TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
        "data.seq_len=32", "train.batch_size=4", "train.warmup_steps=1", "train.eval_every=2",
        "train.checkpoint_every=2", "train.eval_batches=1", "train.log_every=1",
        "train.sample_tokens=4", "run.progress=false", "run.tensorboard=false"]


@pytest.fixture(scope="module")
def trained(env, tmp_path_factory):
    """A finished 2-step run (the 'received' run is a copy of it per test)."""
    root = tmp_path_factory.mktemp("trained")
    proc = run(env, root, "train", *TINY, "train.steps=2", f"run.dir={root / 'run'}")
    assert proc.returncode == 0, proc.stderr
    return root / "run"


def _copy(run_dir, dest):
    import shutil

    shutil.copytree(run_dir, dest)
    (dest / ".tfm-jax.lock").unlink(missing_ok=True)
    return dest


@pytest.mark.parametrize("planted", ["samples.txt", "metrics.jsonl.tmp", "metrics.jsonl"])
def test_resume_of_a_received_run_never_writes_outside_it(planted, env, trained, tmp_path):
    """The audit: 'train --resume' on a received run overwrote two files outside it through
    planted links, and a linked metrics.jsonl took later rows."""
    received = _copy(trained, tmp_path / "received")
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    (received / planted).unlink(missing_ok=True)
    (received / planted).symlink_to(victim)
    err = one_line_error(run(env, tmp_path, "train", *TINY, "train.steps=4",
                             f"run.dir={received}", "--resume"))
    assert f"{planted} is a symbolic link inside the run directory" in err, err
    assert victim.read_text() == "keep me\n"
    err = one_line_error(run(env, tmp_path, "eval", "--run-dir", received))
    assert "symbolic link" in err


def test_fresh_train_never_writes_into_a_folder_that_is_not_a_run(env, tmp_path):
    """The audit: a fresh train into a folder without checkpoints unlinked its metrics.jsonl."""
    other = tmp_path / "analysis"
    other.mkdir()
    (other / "metrics.jsonl").write_text("my own numbers\n")
    err = one_line_error(run(env, tmp_path, "train", *TINY, "train.steps=2", f"run.dir={other}"))
    assert "not a tfm-jax run" in err, err
    assert (other / "metrics.jsonl").read_text() == "my own numbers\n"
    assert sorted(p.name for p in other.iterdir()) == ["metrics.jsonl"]


def test_second_process_on_the_same_run_stops_with_one_line(env, trained, tmp_path):
    """The audit: two identical commands shared a run; one died with StepAlreadyExistsError and
    metrics.jsonl kept one process's rows."""
    import time

    received = _copy(trained, tmp_path / "shared")
    args = [sys.executable, "-m", "tfm_jax", "train", *TINY, "train.steps=400",
            "train.eval_every=400", "train.checkpoint_every=400", f"run.dir={received}",
            "--resume"]
    first = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        lock = received / ".tfm-jax.lock"
        while time.time() < deadline and first.poll() is None and not (
                lock.exists() and lock.read_text().strip() == str(first.pid)):
            time.sleep(0.2)
        assert first.poll() is None, first.stderr.read()
        err = one_line_error(run(env, tmp_path, *args[3:]))
        assert f"in use by another tfm-jax process (pid {first.pid}" in err, err
    finally:
        first.kill()
        first.wait()
    # the first one was killed: its lock is gone with it, the run can be resumed again
    proc = run(env, tmp_path, "train", *TINY, "train.steps=2", f"run.dir={received}", "--resume")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
