"""Run directories are data (tfm_jax.core.rundir): the audit's harmless proofs -- symbolic links
planted in a run directory pointing at marker files or folders outside it -- against the writer,
the metrics log, the checkpoint manager (orbax's parallel deleter forced on) and the lock."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tfm_jax.core import rundir
from tfm_jax.core.rundir import RunDirError


@pytest.fixture
def victim(tmp_path):
    """A folder outside the run with a file a link will point at."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "precious.txt").write_text("keep me\n")
    return d


def test_atomic_write_replaces_whole_file_and_refuses_a_link(tmp_path, victim):
    run = tmp_path / "run"
    run.mkdir()
    rundir.atomic_write(run / "a.txt", "one")
    rundir.atomic_write(run / "a.txt", b"two")
    assert (run / "a.txt").read_text() == "two"
    assert sorted(p.name for p in run.iterdir()) == ["a.txt"]      # no temporary left
    (run / "samples.txt").symlink_to(victim / "precious.txt")
    with pytest.raises(RunDirError, match="symbolic link inside the run directory"):
        rundir.atomic_write(run / "samples.txt", "overwritten")
    assert (victim / "precious.txt").read_text() == "keep me\n"


def test_open_append_refuses_a_link(tmp_path, victim):
    (tmp_path / "metrics.jsonl").symlink_to(victim / "precious.txt")
    with pytest.raises(RunDirError, match="symbolic link"):
        rundir.open_append(tmp_path / "metrics.jsonl")
    with rundir.open_append(tmp_path / "new.jsonl") as f:
        f.write("x\n")
    assert (tmp_path / "new.jsonl").read_text() == "x\n"
    assert (victim / "precious.txt").read_text() == "keep me\n"


@pytest.mark.parametrize("planted", ["metrics.jsonl.tmp", "metrics.jsonl"])
def test_metrics_logger_never_writes_through_a_link(planted, tmp_path, victim):
    """The audit: a resume rewrote metrics.jsonl through a planted metrics.jsonl.tmp link, and a
    linked metrics.jsonl took the appended rows."""
    from tfm_jax.train.metrics import MetricsLogger, read_metrics

    run = tmp_path / "run"
    run.mkdir()
    if planted != "metrics.jsonl":
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 5}\n')
    (run / planted).symlink_to(victim / "precious.txt")
    try:
        log = MetricsLogger(run, resume_step=3, tensorboard=False, progress=False)
    except RunDirError:
        pass
    else:
        log.log(4, {"loss": 1.0})
        log.close()
        assert not (run / "metrics.jsonl").is_symlink()
        assert [r["step"] for r in read_metrics(run)] == [1, 4]
    assert (victim / "precious.txt").read_text() == "keep me\n"


def test_check_run_dir_finds_links_at_any_depth(tmp_path, victim):
    run = tmp_path / "run"
    (run / "checkpoints" / "3" / "default").mkdir(parents=True)
    rundir.check_run_dir(run)                              # real folders only: fine
    rundir.check_run_dir(tmp_path / "missing")             # nothing yet: fine
    (run / "checkpoints" / "3" / "default" / "x").symlink_to(victim / "precious.txt")
    with pytest.raises(RunDirError, match=r"checkpoints/3/default/x is a symbolic link"):
        rundir.check_run_dir(run)
    os.unlink(run / "checkpoints" / "3" / "default" / "x")
    (run / "events").symlink_to(victim, target_is_directory=True)
    with pytest.raises(RunDirError, match="events is a symbolic link"):
        rundir.check_run_dir(run)


def _save(ckpt, step):
    ckpt.save(step, {"w": np.full((4,), step, np.float32)})
    ckpt.wait()


def test_symlinked_step_folder_never_deleted_through(tmp_path, victim, monkeypatch):
    """The audit: a checkpoint step folder linked to another folder; removing old checkpoints
    with orbax's parallel deleter (picked from os.cpu_count() >= 4, forced here) unlinked every
    file of the link's target."""
    from tfm_jax.train.checkpoint import Checkpointer

    monkeypatch.setattr(os, "cpu_count", lambda: 16)        # the parallel deleter
    run = tmp_path / "run"
    ckpt = Checkpointer(run / "checkpoints", keep=1, async_save=False)
    _save(ckpt, 1)
    ckpt.close()
    import shutil
    shutil.rmtree(run / "checkpoints" / "1")
    (run / "checkpoints" / "1").symlink_to(victim, target_is_directory=True)
    ckpt = Checkpointer(run / "checkpoints", keep=1, async_save=False)
    try:
        with pytest.raises(RunDirError, match=r"checkpoints/1 is a symbolic link"):
            _save(ckpt, 2)                                 # would remove step 1
    finally:
        ckpt.close()
    assert (victim / "precious.txt").read_text() == "keep me\n"


def test_read_only_checkpointer_creates_and_cleans_nothing(tmp_path):
    from tfm_jax.train.checkpoint import Checkpointer

    missing = tmp_path / "none" / "checkpoints"
    ro = Checkpointer(missing, read_only=True)
    assert ro.latest_step() is None and not missing.parent.exists()
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=2, async_save=False)
    _save(ckpt, 2)
    ckpt.close()
    leftover = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234"   # a crashed save
    leftover.mkdir()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    ro = Checkpointer(tmp_path / "checkpoints", read_only=True)
    try:
        assert ro.latest_step() == 2
        got = ro.restore({"w": np.zeros((4,), np.float32)})
        np.testing.assert_array_equal(np.asarray(got["w"]), np.full((4,), 2, np.float32))
        with pytest.raises(RuntimeError, match="read-only"):
            ro.save(4, {"w": np.zeros((4,), np.float32)})
    finally:
        ro.close()
    assert leftover.is_dir()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_claim_output_dir(tmp_path):
    rundir.claim_output_dir(tmp_path / "new", "--out")             # missing: fine
    (tmp_path / "empty").mkdir()
    rundir.claim_output_dir(tmp_path / "empty", "--out")           # empty: fine
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "chapter1.tex").write_text("x")
    with pytest.raises(RunDirError, match=r"--out .*thesis: an existing folder that is not a "
                       r"tfm-jax run"):
        rundir.claim_output_dir(other, "--out")
    (other / "config.yaml").write_text("model: {}\n")              # a run: fine
    rundir.claim_output_dir(other, "--out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="not a folder"):
        rundir.claim_output_dir(tmp_path / "file", "--out")


def test_second_lock_stops_with_the_holder(tmp_path):
    run = tmp_path / "run"
    with rundir.RunLock(run):
        with pytest.raises(RunDirError, match=rf"in use by another tfm-jax process \(pid "
                           rf"{os.getpid()}"):
            rundir.RunLock(run).acquire()
    with rundir.RunLock(run):                                      # released: free again
        pass
    assert rundir.is_run_dir(run)


def test_lock_of_a_killed_process_does_not_block(tmp_path):
    """A crash (here SIGKILL) leaves the lock file, but the kernel dropped the lock."""
    run = tmp_path / "run"
    code = ("import os, sys, pathlib; sys.path.insert(0, sys.argv[2]);"
            "from tfm_jax.core.rundir import RunLock; RunLock(sys.argv[1]).acquire();"
            "os.kill(os.getpid(), 9)")
    root = str(pathlib.Path(__file__).resolve().parents[3])
    r = subprocess.run([sys.executable, "-c", code, str(run), root], timeout=60)
    assert r.returncode == -9
    assert (run / rundir.LOCK_NAME).is_file()
    with rundir.RunLock(run):
        pass


def test_lock_file_link_is_refused(tmp_path, victim):
    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.LOCK_NAME).symlink_to(victim / "precious.txt")
    with pytest.raises(RunDirError, match="symbolic link"):
        rundir.RunLock(run).acquire()
    assert (victim / "precious.txt").read_text() == "keep me\n"
