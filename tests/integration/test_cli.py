"""The command line as a user runs it: ``python -m tfm_jax ...`` in a subprocess (one CPU device),
checking exit codes, stdout/stderr text and the run directory an end-to-end run leaves behind."""

import json
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
from train_support import cli_env

TIMEOUT = 180
ROOT = str(pathlib.Path(__file__).resolve().parents[2])

# The end-to-end run: seconds on CPU (a 1-layer, d=32 model, 6 steps of 4x32 tokens).
TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
        "data.seq_len=32", "train.batch_size=4", "train.warmup_steps=1", "train.eval_every=3",
        "train.checkpoint_every=3", "train.eval_batches=1", "train.log_every=2",
        "train.sample_tokens=10", "run.progress=false"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return cli_env(tmp_path_factory.mktemp("tfm_jax_cache"))


@pytest.fixture(scope="module")
def corpus(text_corpus):
    return text_corpus


def run(env, cwd, *args, exe=None):
    cmd = ([exe] if exe else [sys.executable, "-m", "tfm_jax"]) + [str(a) for a in args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          errors="replace", timeout=TIMEOUT)


def _check(proc, code):
    assert proc.returncode == code, (
        f"exit {proc.returncode} != {code}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def _config_error(proc) -> str:
    """A config/input error: exit 2, one 'tfm-jax: error: ' message on stderr (the same prefix
    for every command and error kind), no traceback."""
    _check(proc, 2)
    assert proc.stderr.startswith("tfm-jax: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stderr


# ----------------------------------------------------------------------------- help / config show


def test_help_module(env, tmp_path):
    """`tfm-jax --help` lists every command of the table with the first words of its line."""
    from tfm_jax import cli

    out = _check(run(env, tmp_path, "--help"), 0).stdout
    assert "usage: tfm-jax" in out
    listed = " ".join(out.split())
    for cmd in cli.COMMANDS:
        head = cmd.name[0]
        line = cli._GROUP_HELP.get(head, cmd.help) if len(cmd.name) > 1 else cmd.help
        assert f"{head} {' '.join(line.split()[:4])}" in listed, (cmd.name, out)


def test_help_console_script(env, tmp_path):
    exe = shutil.which("tfm-jax", path=env.get("PATH"))
    if exe is None:
        pytest.skip("tfm-jax console script not on PATH (package not installed)")
    out = _check(run(env, tmp_path, "--help", exe=exe), 0).stdout
    m = re.search(r"\{([a-z,-]+)\}", out)
    assert m, out
    from tfm_jax import cli

    listed = set(m.group(1).split(","))
    expected = {cmd.name[0] for cmd in cli.COMMANDS}   # the installed script runs this package
    assert {"train", "eval", "generate", "import-hf", "export-hf", "lm-eval", "serve"} <= expected
    assert listed == expected, (sorted(listed ^ expected), out)


def test_config_show(env, tmp_path):
    out = _check(run(env, tmp_path, "config", "show"), 0).stdout
    assert "n_kv_heads: 2\n" in out
    assert "name: tiny\n" in out
    out = _check(run(env, tmp_path, "config", "show", "model.n_kv_heads=1"), 0).stdout
    assert "n_kv_heads: 1\n" in out and "n_kv_heads: 2" not in out
    assert "name: tiny-n_kv_heads=1\n" in out


def test_config_show_is_light(env, tmp_path):
    """`config show` (the CLI module and the command) imports neither jax nor orbax."""
    code = ("import sys, tfm_jax.cli as c; rc = c.main(['config', 'show']); "
            "heavy = [m for m in ('jax', 'orbax.checkpoint', 'flax', 'optax') if m in sys.modules]; "
            "print('RC', rc, 'HEAVY', heavy)")
    proc = _check(subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=TIMEOUT), 0)
    assert "name: tiny\n" in proc.stdout and "parameters=855,168" in proc.stdout
    assert proc.stdout.rstrip().endswith("RC 0 HEAVY []"), proc.stdout[-300:]


def test_config_show_small(env, tmp_path):
    out = _check(run(env, tmp_path, "config", "show", "--config", "small"), 0).stdout
    assert "d_model: 256\n" in out and "n_layers: 6\n" in out and "name: small\n" in out
    assert "vocab_size: 264\n" in out                     # inherited from tiny.yaml


def test_bad_override_exits_2(env, tmp_path):
    err = _config_error(run(env, tmp_path, "config", "show", "model.n_kv_head=1"))
    assert "model.n_kv_head" in err and "did you mean 'model.n_kv_heads'" in err
    err = _config_error(run(env, tmp_path, "train", "model.d_model=130"))
    assert "model.d_model=130" in err and "model.n_heads=4" in err
    assert not (tmp_path / "runs").exists()


def test_missing_config_exits_2(env, tmp_path):
    err = _config_error(run(env, tmp_path, "config", "show", "--config", "nope.yaml"))
    assert "nope.yaml" in err and "not found" in err and "tiny.yaml" in err


# ----------------------------------------------------------------------------- train/eval/generate errors


def test_train_missing_data_path_fails_fast(env, tmp_path):
    missing = tmp_path / "no_such_corpus.txt"
    err = _config_error(run(env, tmp_path, "train", f"data.path={missing}",
                            f"run.dir={tmp_path / 'run'}"))
    assert str(missing) in err
    assert not (tmp_path / "run" / "config.yaml").exists()   # stopped before building the model


def test_train_mesh_mismatch(env, tmp_path, corpus):
    err = _config_error(run(env, tmp_path, "train", "mesh.data=3", f"data.path={corpus}",
                            f"run.dir={tmp_path / 'run'}"))
    assert "mesh" in err and "3" in err and "1 devices" in err
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_generate_run_dir_without_config(env, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _config_error(run(env, tmp_path, "generate", "--run-dir", empty))
    assert "no config.yaml" in err and str(empty) in err


def test_eval_without_checkpoint(env, tmp_path):
    rd = tmp_path / "untrained"
    proc = run(env, tmp_path, "eval", *TINY, f"run.dir={rd}")
    _check(proc, 2)
    assert "tfm-jax:" in proc.stderr and "no checkpoint" in proc.stderr
    assert str(rd / "checkpoints") in proc.stderr


# ----------------------------------------------------------------------------- end to end


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train_steps(rows):
    return [r["step"] for r in rows if "loss" in r]


def _eval_steps(rows):
    return [r["step"] for r in rows if "val_loss" in r]


def _ckpt_steps(run_dir):
    return sorted(int(re.sub(r"\D", "", p.name)) for p in (run_dir / "checkpoints").iterdir()
                  if p.is_dir() and re.search(r"\d", p.name))


@pytest.fixture(scope="module")
def trained(env, corpus, tmp_path_factory):
    """One 6-step training run through the CLI; returns (run_dir, stdout, base directory)."""
    base = tmp_path_factory.mktemp("e2e")
    rd = base / "run"
    proc = _check(run(env, base, "train", *TINY, "train.steps=6", f"data.path={corpus}",
                      f"run.dir={rd}"), 0)
    return rd, proc.stdout, base


def test_train_writes_run_dir(trained):
    rd, stdout, _ = trained
    assert f"run directory: {rd}" in stdout
    assert "finished step 6" in stdout
    assert re.search(r"^MFU peak: [\d,.]+ GFLOP/s \(CPU float32 matmul peak, (measured now|"
                     r"cached in) .*matmul_peak.json", stdout, re.M), stdout[:2000]
    assert (rd / "config.yaml").is_file()
    saved = (rd / "config.yaml").read_text()
    assert "d_model: 32\n" in saved and f"dir: {rd}\n" in saved

    rows = _rows(rd)
    train_rows = [r for r in rows if "loss" in r]
    assert _train_steps(rows) == [2, 4, 6]              # log_every=2
    assert all(r["loss"] > 0 for r in train_rows)
    # throughput: every row but possibly one whose window is only the compiling first step
    assert sum("tokens_per_s" in r for r in train_rows) >= 2
    assert all(r["tokens_per_s"] > 0 for r in train_rows if "tokens_per_s" in r)
    assert _eval_steps(rows) == [3, 6]                   # eval_every=3
    assert all(r["val_loss"] > 0 for r in rows if "val_loss" in r)

    assert 6 in _ckpt_steps(rd)
    events = list((rd / "events").glob("events.out.tfevents*"))
    assert events and events[0].stat().st_size > 0
    sample = (rd / "samples.txt").read_text(errors="replace")
    assert sample.startswith("def ")
    assert len(sample) > len("def "), sample        # tokens were generated beyond the prompt


def test_eval_run_dir(env, trained):
    rd, _, base = trained
    proc = _check(run(env, base, "eval", "--run-dir", rd), 0)
    row = json.loads(proc.stdout)
    assert row["step"] == 6
    assert row["val_loss"] > 0 and row["val_ppl"] > 1
    # the same checkpoint evaluated on the same data as at the end of training
    final_eval = [r for r in _rows(rd) if "val_loss" in r and r["step"] == 6][0]
    assert row["val_loss"] == pytest.approx(final_eval["val_loss"], rel=1e-4)


def test_generate_run_dir(env, trained):
    rd, _, base = trained
    proc = _check(run(env, base, "generate", "--run-dir", rd, "--tokens", "5", "--prompt",
                      "def "), 0)
    assert proc.stdout.startswith("def ") and proc.stdout.endswith("\n")
    text = proc.stdout[:-1]                          # print()'s newline
    # new tokens beyond the echoed prompt (5 requested; fewer only if EOS was sampled, and at
    # least one byte decodes to at least one character)
    assert len(text) > len("def "), repr(proc.stdout)


def test_generate_batch_of_prompts(env, trained, tmp_path):
    """Several prompts (--prompt twice + --prompts-file) are one batch; --json prints one object
    with the completions, prefill time, decode tokens/s and the KV-cache bytes (the formula
    for this model: 1 layer, 1 kv head of 16, int8 + float32 per-token scales)."""
    rd, _, base = trained
    pf = tmp_path / "prompts.txt"
    pf.write_text("class \nimport os\n")
    proc = _check(run(env, base, "generate", "--run-dir", rd, "--tokens", "4", "--prompt",
                      "def ", "--prompt", "x = ", "--prompts-file", pf, "--top-p", "0.9",
                      "--json", "quant.kv_cache=int8"), 0)
    out = json.loads(proc.stdout)
    rows = out["completions"]
    assert [r["prompt"] for r in rows] == ["def ", "x = ", "class ", "import os"]
    for r in rows:
        assert r["text"].startswith(r["prompt"]) and 0 <= r["new_tokens"] <= 4
    assert out["prefill_s"] > 0 and out["batch"] == 4 and out["kv_cache"] == "int8"
    assert out["decode_steps"] == 0 or out["decode_tokens_per_s"] > 0
    max_len = len("import os") + 1 + 4 - 1          # EOS + prompt + fed-back new tokens
    assert out["kv_cache_bytes"] == 2 * 1 * 4 * max_len * 1 * (16 * 1 + 4)
    # text mode: the completions on stdout, the timings on stderr
    proc = _check(run(env, base, "generate", "--run-dir", rd, "--tokens", "3", "--prompt",
                      "def ", "--prompt", "x = ", "--temperature", "0"), 0)
    assert proc.stdout.startswith("=== prompt 1/2 ===\ndef ") and "=== prompt 2/2 ===\nx = " \
        in proc.stdout
    assert re.search(r"^prefill [\d.]+ ms \(2 prompts\), decode .*tokens/s", proc.stderr, re.M), \
        proc.stderr
    err = _config_error(run(env, base, "generate", "--run-dir", rd, "--top-p", "1.5"))
    assert "--top-p 1.5" in err


def test_train_again_requires_resume(env, trained, corpus):
    rd, _, base = trained
    before = (rd / "metrics.jsonl").read_text()
    err = _config_error(run(env, base, "train", *TINY, "train.steps=6", f"data.path={corpus}",
                            f"run.dir={rd}"))
    assert "--resume" in err and str(rd) in err
    assert (rd / "metrics.jsonl").read_text() == before      # the existing run is untouched


def test_resume_continues(env, trained, corpus, tmp_path):
    """--resume restores the latest checkpoint and continues to train.steps; metrics rows past
    the restored step are dropped and re-logged once. The run is copied and its last checkpoint
    (6) removed, so it resumes from 3 and rows 4..6 written before must not appear twice."""
    rd0, _, _ = trained
    rd = tmp_path / "run"                  # a copy: the other tests keep seeing the 6-step run
    shutil.copytree(rd0, rd)
    assert _ckpt_steps(rd) == [3, 6]
    shutil.rmtree(rd / "checkpoints" / "6")
    before = _rows(rd)
    out = _check(run(env, tmp_path, "train", "--resume", *TINY, "train.steps=8",
                     "train.sample_tokens=0", f"data.path={corpus}", f"run.dir={rd}"), 0).stdout
    assert "finished step 8" in out and "samples.txt" not in out   # no sample: not listed
    assert re.search(r"^MFU peak: .*cached in .*matmul_peak.json", out, re.M), out[:2000]
    rows = _rows(rd)
    assert rows[-1]["step"] == 8
    steps = _train_steps(rows)
    assert steps == sorted(set(steps)), steps          # no duplicated train step rows
    assert {2, 6, 8} <= set(steps) and set(steps) <= {2, 4, 6, 8}
    assert _eval_steps(rows) == [3, 6, 8]
    assert [r for r in rows if r["step"] <= 3] == [r for r in before if r["step"] <= 3]
    assert 8 in _ckpt_steps(rd)


def test_resume_incompatible_config_leaves_run_untouched(env, trained, corpus, tmp_path):
    """A resume whose model does not fit the checkpoint fails (exit 2, naming the differing
    key) before writing anything: config.yaml and metrics.jsonl stay byte-identical."""
    rd = tmp_path / "run"
    shutil.copytree(trained[0], rd)
    before = {name: (rd / name).read_bytes() for name in ("config.yaml", "metrics.jsonl")}
    err = _config_error(run(env, tmp_path, "train", "--resume", *TINY, "model.d_model=64",
                            "train.steps=8", f"data.path={corpus}", f"run.dir={rd}"))
    assert "does not match" in err and "model.d_model: 32 -> 64" in err, err
    assert {name: (rd / name).read_bytes() for name in before} == before
    assert _ckpt_steps(rd) == [3, 6]


def test_resume_under_another_run_name_is_an_error(env, trained, corpus, tmp_path):
    """Run names derive from the overrides: `--resume train.steps=8` looks in another
    directory. That is an error naming the directory and how to point at the run, not a
    silent fresh run."""
    from tfm_jax.config import load_config

    raw = load_config(None, TINY + ["train.steps=6", f"data.path={corpus}"]).to_dict()
    raw["run"].update(name=None, dir=None)
    (tmp_path / "exp.yaml").write_text(json.dumps(raw))     # JSON is YAML
    runs = tmp_path / "runs"
    shutil.copytree(trained[0], runs / "exp")                # = `train --config exp.yaml`
    err = _config_error(run(env, tmp_path, "train", "--resume", "--config", "exp.yaml",
                            "train.steps=8"))
    assert f"no checkpoint in {runs / 'exp-steps=8' / 'checkpoints'}, so" in err, err
    assert "'exp-steps=8'" in err and "run.dir=" in err and "run.name=" in err, err
    assert str(runs / "exp") in err                          # the run that does exist
    assert [p.name for p in runs.iterdir()] == ["exp"]       # nothing written


def test_resume_finished_run_says_so(env, trained, corpus, tmp_path):
    rd = tmp_path / "run"
    shutil.copytree(trained[0], rd)
    last = [r for r in _rows(rd) if "loss" in r][-1]
    proc = _check(run(env, tmp_path, "train", "--resume", *TINY, "train.steps=6",
                      "train.sample_tokens=0", f"data.path={corpus}", f"run.dir={rd}"), 0)
    out = proc.stdout
    assert "already finished: step 6 of train.steps=6" in out, out
    assert f"train loss {last['loss']:.4f}" in out and "nan" not in out.lower(), out
    assert "samples.txt" not in out                             # sample_tokens=0: none written


# ----------------------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [pytest.param("SIGTERM", marks=pytest.mark.slow), "SIGINT"])
def test_signal_saves_checkpoint_and_resume_finishes(env, tmp_path, corpus, sig):
    """A real signal to a running `tfm-jax train`: checkpoint saved, exit 128+signum, and
    `--resume` continues to the configured last step."""
    import signal
    import time

    run_dir = tmp_path / "run"
    args = TINY + ["train.steps=400", "train.log_every=1", "train.eval_every=1000",
                   "train.checkpoint_every=1000", "train.sample_tokens=0",
                   f"data.path={corpus}", f"run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "tfm_jax", "train", *args], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before the signal could be sent"
    signum = getattr(signal, sig)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 128 + signum, (proc.returncode, err)
    m = re.search(rf"{sig} at step (\d+)", err)
    assert m, err
    stopped = int(m.group(1))
    assert 3 <= stopped < 400
    assert (run_dir / "checkpoints" / str(stopped)).is_dir()
    _check(run(env, tmp_path, "train", *args, "--resume"), 0)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 401)), steps[:10]


@pytest.mark.parametrize("sig", ["SIGINT", pytest.param("SIGTERM", marks=pytest.mark.slow)])
def test_signal_at_any_moment_exits_cleanly(env, tmp_path, corpus, sig):
    """Ctrl-C/SIGTERM at several moments of a real `python -m tfm_jax train` (imports, config,
    data, model build, compile, possibly the first steps): always exit 128 + signum, no
    traceback, one line saying what was interrupted and what was saved."""
    import signal
    import time

    signum = getattr(signal, sig)
    args = TINY + ["train.steps=100000", "train.eval_every=100000",
                   "train.checkpoint_every=100000", "train.sample_tokens=0",
                   f"data.path={corpus}"]
    for delay in (0.5, 1.5, 3.0, 5.0):
        run_dir = tmp_path / f"run{delay}"
        proc = subprocess.Popen([sys.executable, "-m", "tfm_jax", "train", *args,
                                 f"run.dir={run_dir}"], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        assert proc.poll() is None, (delay, proc.communicate())
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 128 + signum, (delay, proc.returncode, err[-3000:])
        assert "Traceback" not in err and "Error" not in err, (delay, err[-3000:])
        lines = [line for line in err.splitlines() if "interrupted" in line]
        assert len(lines) == 1, (delay, err)
        m = re.fullmatch(rf"tfm-jax: interrupted by {sig} (?:(?:while starting|before step 1), "
                         rf"nothing saved|at step (\d+): checkpoint saved to .*)", lines[0])
        assert m, (delay, lines[0])
        ckpts = _ckpt_steps(run_dir) if (run_dir / "checkpoints").is_dir() else []
        assert ckpts == ([int(m.group(1))] if m.group(1) else []), (delay, lines[0], ckpts)
