"""The Python API, for notebooks and scripts: open a trained run, import a Hugging Face
checkpoint, or train one, and get a :class:`~tfm_jax.tools.run.Run` with ``.logits``,
``.generate`` and ``.evaluate``.

    import tfm_jax
    run = tfm_jax.load_run("runs/tiny")
    run.logits([[run.tokenizer.eos_id, *run.encode("def f")]])   # (1, T, V) float32
    run.generate("def f", max_new_tokens=32)                      # greedy completion
    run.evaluate()                                                # loss, perplexity, bits/byte

These names are the stable surface (``tfm_jax.load_run``, ``tfm_jax.import_hf``,
``tfm_jax.train``, ``tfm_jax.Run``); they are imported lazily by ``tfm_jax`` so that
``import tfm_jax`` (and the CLI) stays free of jax until one is used.
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping, Optional, Sequence, Union

from tfm_jax.config import Config, ConfigError, load_config, parse_overrides, validate
from tfm_jax.tools.run import Run

__all__ = ["Run", "load_run", "import_hf", "train"]


def load_run(run_dir: str | pathlib.Path, *, step: Optional[int] = None) -> Run:
    """The run written by ``tfm-jax train`` (or :func:`train`) at ``run_dir``, opened
    read-only: checkpoint ``step``, default the newest intact one (a damaged newer one is
    skipped with one line), as ``tfm-jax eval`` and ``tfm-jax generate`` open it."""
    from tfm_jax.tools.run import open_run

    return open_run(run_dir, step=step)


def import_hf(path: str | pathlib.Path, *, param_dtype: Optional[str] = None) -> Run:
    """A local Hugging Face model folder (config.json, safetensors, tokenizer files) of the
    Llama family as a :class:`Run` (not written anywhere; ``tfm-jax import-hf`` writes a run
    directory)."""
    import jax

    from tfm_jax.hf import read_hf      # the Hugging Face reader (tfm_jax.hf)
    from tfm_jax.platform import backends
    from tfm_jax.train import build

    model = read_hf(path, param_dtype=param_dtype)
    cfg = model.config
    backends.configure(cfg.backend)
    setup = build(cfg)
    params = jax.device_put(model.params, setup.state_shardings.params)
    return Run(setup, None, model.tokenizer, params=params, model_state={})


Overrides = Union[Sequence[str], Mapping[str, Any], None]


def _config(config: Union[Config, Mapping[str, Any], str, pathlib.Path],
            overrides: Overrides, out: Optional[str | pathlib.Path]) -> Config:
    """``config`` (a Config, a mapping, a YAML path or a shipped config name) with
    ``overrides`` (``["train.steps=50"]`` or ``{"train.steps": 50}``) and ``run.dir=out``."""
    ov = (parse_overrides(list(overrides)) if overrides is not None
          and not isinstance(overrides, Mapping) else dict(overrides or {}))
    if out is not None:
        ov["run.dir"] = str(out)
    if isinstance(config, (str, pathlib.Path)):
        return load_config(str(config), [f"{k}={_spelled(v)}" for k, v in ov.items()])
    if isinstance(config, Mapping):
        config = validate(dict(config))
    if not isinstance(config, Config):
        raise ConfigError(f"train: config must be a Config, a dict, a YAML path or a shipped "
                          f"config name, got {type(config).__name__}")
    return config.replace(**ov) if ov else config


def _spelled(value: Any) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value)


def train(config: Union[Config, Mapping[str, Any], str, pathlib.Path] = "tiny", *,
          overrides: Overrides = None, out: Optional[str | pathlib.Path] = None,
          resume: bool = False) -> Run:
    """Train as ``tfm-jax train`` does (the same loop, :func:`tfm_jax.train.train`) and return
    the trained :class:`Run`. ``config``: a :class:`~tfm_jax.config.Config`, a mapping of
    sections, a YAML path or a shipped config name; ``overrides``: dotted keys
    (``["train.steps=50"]`` or ``{"train.steps": 50}``); ``out``: the run directory (default
    ``run.dir``, else ``runs/<run.name>``); ``resume``: continue the run in that directory."""
    from tfm_jax import data as data_lib
    from tfm_jax import train as train_lib

    cfg = _config(config, overrides, out)
    result = train_lib.train(cfg, resume=resume)
    tok = data_lib.run_tokenizer(cfg.run_dir, cfg.data.tokenizer)
    return Run(result.setup, result.state, tok)
