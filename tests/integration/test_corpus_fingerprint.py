"""The corpus a run trained on is part of the run: ``corpus.json`` records its fingerprint;
``train --resume`` and ``eval`` on another corpus stop with one line naming both fingerprints,
and ``--allow-corpus-change`` accepts it (recorded in the run's corpus history)."""

import json
import shutil

import pytest

from tfm_jax import cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_corpus):
    run = tmp_path_factory.mktemp("run")
    common = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
              "model.ffn_hidden=64", "data.seq_len=32", "train.batch_size=8",
              "train.checkpoint_every=2", "train.eval_every=2", "train.sample_tokens=0",
              "train.eval_batches=2", "run.progress=false", "mesh.data=-1"]
    assert cli.main(["train", *common, f"data.path={text_corpus}", "train.steps=2",
                     f"run.dir={run}"]) == 0
    return run, common


def _one_line(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_resume_and_eval_on_another_corpus(trained, text_corpus, tmp_path, capsys):
    src, common = trained
    run = tmp_path / "run"
    shutil.copytree(src, run)
    recorded = json.loads((run / "corpus.json").read_text())["fingerprint"]
    assert recorded["source"] == str(text_corpus) and len(recorded["digest"]) == 64
    other = tmp_path / "other.txt"
    other.write_text(text_corpus.read_text().replace("return", "yield"))

    # eval on the run's own corpus: no note, and the digest is in the result
    capsys.readouterr()
    assert cli.main(["eval", "--run-dir", str(run)]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out[out.out.index("{"):])["corpus_digest"] == recorded["digest"]
    assert "corpus" not in out.err

    # another corpus: one line naming both fingerprints and the override; nothing written
    before = sorted(p.name for p in run.iterdir())
    assert cli.main(["eval", "--run-dir", str(run), f"data.path={other}"]) == 2
    line = _one_line(capsys)
    assert recorded["digest"][:12] in line and str(other) in line and "--allow-corpus-change" in line
    assert cli.main(["train", "--resume", *common, f"data.path={other}", "train.steps=4",
                     f"run.dir={run}"]) == 2
    line = _one_line(capsys)
    assert line.startswith("tfm-jax: error: --resume: the corpus differs") and recorded["digest"][:12] in line
    assert sorted(p.name for p in run.iterdir()) == before
    assert json.loads((run / "corpus.json").read_text())["fingerprint"] == recorded

    # the explicit override: the resume goes on and the run records both corpora
    assert cli.main(["train", "--resume", "--allow-corpus-change", *common, f"data.path={other}",
                     "train.steps=4", f"run.dir={run}"]) == 0
    out = capsys.readouterr().out
    assert "on a different corpus than the run trained on" in out and "resumed from step 2" in out
    saved = json.loads((run / "corpus.json").read_text())
    assert [h["from_step"] for h in saved["history"]] == [0, 2]
    assert saved["fingerprint"]["source"] == str(other)
    assert saved["history"][0]["fingerprint"] == recorded
