"""``tfm-jax lm-eval``: the lm-evaluation-harness adapter against the run's own log-softmax
(numpy, float64) on an untrained run directory, and local tasks end to end through the harness
and the CLI (a task YAML and jsonl data in the test's folder; offline, nothing downloaded)."""

from __future__ import annotations

import numpy as np
import pytest

import tfm_jax
from train_support import write_initialized_run

pytest.importorskip("lm_eval", reason="the lm-eval adapter needs the eval extra: "
                    "pip install -e '.[eval]'")
from lm_eval.api.instance import Instance  # noqa: E402

from tfm_jax.tools.lm_eval import make_lm  # noqa: E402

TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.multiple_of=16", "data.seq_len=16", "train.batch_size=8",
        "run.progress=false", "run.tensorboard=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm-eval-run")
    write_initialized_run(out, TINY)
    return tfm_jax.load_run(out)


def _req(kind, *args):
    return Instance(kind, {}, tuple(args), 0)


def _logp(run, ids: list[int]) -> np.ndarray:
    """log p(ids[t + 1] | ids[:t + 1]) for every t, from one unpadded forward (float64)."""
    x = run.logits(np.asarray([ids[:-1]])).astype(np.float64)[0]
    m = x.max(-1, keepdims=True)
    lp = x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
    return lp[np.arange(len(ids) - 1), ids[1:]]


def test_loglikelihood_is_the_sum_of_the_continuations_log_probs(run):
    lm = make_lm(run, batch_size=2)
    pairs = [("def f(", "x):"), ("", "abc"), ("héllo ", "wörld")]   # 3 requests: 2 batches
    got = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs])
    eos = run.tokenizer.eos_id
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        ids = [eos] + run.encode(ctx) + run.encode(cont)
        n = len(run.encode(cont))
        assert ll == pytest.approx(_logp(run, ids)[-n:].sum(), rel=1e-5)
        x = run.logits(np.asarray([ids[:-1]]))[0, -n:]
        assert greedy == bool((x.argmax(-1) == np.asarray(ids[-n:])).all())
    # a continuation made of the greedy tokens is greedy
    ctx = "def "
    best = run.generate(ctx, max_new_tokens=3)
    if len(run.encode(best)) == 3:
        assert lm.loglikelihood([_req("loglikelihood", ctx, best)])[0][1]


def test_loglikelihood_rolling_scores_every_token_once(run):
    text = "def f(x):\n    return x * 2\n" * 2            # 56 tokens, windows of 24
    lm = make_lm(run, batch_size=2, max_length=24)
    got = lm.loglikelihood_rolling([_req("loglikelihood_rolling", text)])[0]
    toks = run.encode(text)
    # the harness's rule: the first 24 tokens after EOS; then chunks of 24 predicted tokens,
    # each from a full row of the 24 tokens before its last one
    ref = float(_logp(run, [run.tokenizer.eos_id] + toks[:24]).sum())
    for start in range(24, len(toks), 24):
        end = min(start + 24, len(toks))
        ref += float(_logp(run, toks[end - 25:end])[-(end - start):].sum())
    assert got == pytest.approx(ref, rel=1e-4)


def test_generate_until_cuts_at_the_stop_string(run):
    lm = make_lm(run, batch_size=2)
    full = run.generate("def f(", max_new_tokens=8)
    stop = full[3:5]
    out = lm.generate_until([_req("generate_until", "def f(", {"until": [stop],
                                                                "max_gen_toks": 8}),
                             _req("generate_until", "def f(", {"max_gen_toks": 8})])
    assert out == [full[:full.find(stop)], full]


# ----------------------------------------------------------------------------- end to end

MC_TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
GEN_TASK = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    import json

    folder = tmp_path_factory.mktemp("tasks")
    mc = [{"question": f"{a} + {b} =", "choices": [f" {a + b}", f" {a + b + 1}"], "answer": 0}
          for a, b in [(1, 2), (3, 4), (5, 6), (7, 1)]]
    gen = [{"prompt": "def f(", "target": "x)"}, {"prompt": "return ", "target": "x"}]
    for name, rows, template in (("mc", mc, MC_TASK), ("gen", gen, GEN_TASK)):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"tiny_{name}.yaml").write_text(template.format(data=data))
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import os
    import pathlib

    root = str(pathlib.Path(__file__).resolve().parents[2])
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([root] + [p for p in e.get("PYTHONPATH", "").split(
        os.pathsep) if p and os.path.abspath(p) != root])
    e.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
             HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
             HF_HOME=str(tmp_path_factory.mktemp("hf_home")))
    return e, root


def _cli(env, *args):
    import subprocess
    import sys

    e, root = env
    return subprocess.run([sys.executable, "-m", "tfm_jax", "lm-eval", *map(str, args)],
                          cwd=root, env=e, capture_output=True, text=True, timeout=300)


def test_local_tasks_end_to_end(run, tasks, env, tmp_path):
    """A multiple-choice task reports acc, a generate_until task exact_match; the acc equals
    the share of questions whose right choice has the larger log-likelihood (numpy)."""
    import json

    out = tmp_path / "results.json"
    proc = _cli(env, "--run-dir", run.config.run_dir, "--tasks", "tiny_mc,tiny_gen",
                "--include-path", tasks, "--batch-size", 4, "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert "tiny_mc" in proc.stdout and "acc" in proc.stdout and "tiny_gen" in proc.stdout
    res = json.loads(out.read_text())["results"]
    eos = run.tokenizer.eos_id
    right = []
    for line in (tasks / "mc.jsonl").read_text().splitlines():
        row = json.loads(line)
        lls = [_logp(run, [eos] + run.encode(row["question"]) + run.encode(c))
               [-len(run.encode(c)):].sum() for c in row["choices"]]
        right.append(float(np.argmax(lls) == row["answer"]))
    assert res["tiny_mc"]["acc,none"] == pytest.approx(np.mean(right))
    gen = [json.loads(line) for line in (tasks / "gen.jsonl").read_text().splitlines()]
    expect = [float(run.generate(g["prompt"], max_new_tokens=6, stop=["\n"]).strip()
                    == g["target"]) for g in gen]
    assert res["tiny_gen"]["exact_match,none"] == pytest.approx(np.mean(expect))


def test_bad_input_is_one_line(run, tasks, env, tmp_path):
    proc = _cli(env, "--run-dir", run.config.run_dir, "--tasks", "no_such_task",
                "--include-path", tasks)
    assert proc.returncode == 2 and "unknown task(s) no_such_task" in proc.stderr
    assert "Traceback" not in proc.stderr
    shim = tmp_path / "shim"                   # an environment without lm_eval
    shim.mkdir()
    (shim / "lm_eval.py").write_text("raise ImportError('no lm_eval here')\n")
    e, root = env
    proc = _cli(({**e, "PYTHONPATH": f"{root}:{shim}"}, root), "--run-dir",
                run.config.run_dir, "--tasks", "tiny_mc")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "tfm-jax: error: tfm-jax lm-eval needs the lm-evaluation-harness package (lm_eval): "
        "pip install 'tfm-jax[eval]'"]
