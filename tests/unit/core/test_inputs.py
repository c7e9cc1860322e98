"""Inputs from shared files and command lines are bounded before any work: run.name stays one
folder under runs/, outputs never land in a folder that is not a run, generate's prompts are
checked against the model's context and a cap on rows (all refused with one line, exit 2)."""

import pytest

from tfm_jax import cli
from tfm_jax.config import ConfigError, load_config


@pytest.mark.parametrize("name", ["../../../x", "/tmp/x", "a/b", "..", ".", "a\\b"])
def test_run_name_never_escapes_runs(name):
    with pytest.raises(ConfigError, match="one folder name under runs/"):
        load_config(None, [f"run.name={name}"])


def test_derived_and_plain_run_names_still_work():
    assert str(load_config(None, ["run.name=gqa-kv=2.x"]).run_dir) == "runs/gqa-kv=2.x"
    cfg = load_config(None, ["model.n_kv_heads=1"])
    assert cfg.run_dir.parent.name == "runs" and "n_kv_heads=1" in cfg.run.name


@pytest.fixture
def run_dir(tmp_path):
    """A received run's folder (config only: the checks come before any checkpoint is read)."""
    d = tmp_path / "run"
    d.mkdir()
    d.joinpath("config.yaml").write_text("data: {seq_len: 32}\n")
    return d


def test_prompt_beyond_the_context_is_refused(run_dir, capsys):
    """The audit: a 200 KB prompt ran for more than 300 s of CPU."""
    code = cli.main(["generate", "--run-dir", str(run_dir), "--prompt", "x" * 200_000,
                     "--tokens", "5"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "200,001 tokens" in err and "context limit 256" in err and "8 x data.seq_len=32" in err
    code = cli.main(["generate", "--run-dir", str(run_dir), "--prompt", "hi", "--tokens", "300",
                     "--max-context", "100"])
    assert code == 2 and "context limit 100 (--max-context)" in capsys.readouterr().err


def test_too_many_prompts_are_refused(run_dir, tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("p\n" * 1000)
    code = cli.main(["generate", "--run-dir", str(run_dir), "--prompts-file", str(f)])
    err = capsys.readouterr().err
    assert code == 2 and "1,000 prompts: at most --max-prompts 256" in err, err


@pytest.mark.parametrize("command", ["quantize", "convert"])
def test_out_into_a_folder_that_is_not_a_run_is_refused(command, run_dir, tmp_path, capsys):
    """The audit: --out accepted an existing folder and overwrote its config.yaml."""
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "notes.txt").write_text("mine\n")
    extra = ["--recipe", "int8_weight"] if command == "quantize" else ["--kv-heads", "1"]
    code = cli.main([command, "--run-dir", str(run_dir), *extra, "--out", str(other)])
    err = capsys.readouterr().err
    assert code == 2 and "not a tfm-jax run" in err, err
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
