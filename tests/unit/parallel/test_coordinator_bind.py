"""The multi-process coordinator listens where it is told (tfm_jax.parallel.distributed): the
--coordinator address itself or --bind, never jax's default of every interface. The call into
jax is captured (no process waits for peers here; tests/integration/test_shared_runs.py reads
the listening socket of a real coordinator)."""

import argparse
import inspect

import jax
import pytest

from tfm_jax.config import ConfigError
from tfm_jax.parallel import distributed


def _args(*argv):
    p = argparse.ArgumentParser()
    distributed.add_args(p)
    return p.parse_args(list(argv))


def _captured(monkeypatch, settings, environ=None):
    seen = {}
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)

    def fake_initialize(coordinator, **kw):
        seen.update(kw, coordinator=coordinator)
    # keep the real signature: initialize() looks for coordinator_bind_address in it
    fake_initialize.__signature__ = inspect.signature(jax.distributed.initialize)
    monkeypatch.setattr(jax.distributed, "initialize", fake_initialize)
    for k, v in (environ or {}).items():
        monkeypatch.setenv(k, v)
    distributed.initialize(settings)
    return seen


def test_jax_takes_a_bind_address():
    """jax 0.10.2 and 0.12.x: coordinator_bind_address (default '[::]:PORT', every interface)."""
    assert "coordinator_bind_address" in inspect.signature(jax.distributed.initialize).parameters


def test_coordinator_binds_the_given_address(monkeypatch):
    monkeypatch.delenv(distributed.JAX_ENV_BIND, raising=False)
    s = distributed.from_args(_args("--coordinator", "127.0.0.1:47123", "--num-processes", "2",
                                    "--process-id", "0"), environ={})
    assert _captured(monkeypatch, s)["coordinator_bind_address"] == "127.0.0.1:47123"
    s = distributed.from_args(_args("--coordinator", "10.0.0.1:47123", "--num-processes", "2",
                                    "--process-id", "0", "--bind", "0.0.0.0:47123"), environ={})
    assert _captured(monkeypatch, s)["coordinator_bind_address"] == "0.0.0.0:47123"
    s = distributed.from_args(_args("--coordinator", "10.0.0.1:47123", "--num-processes", "2",
                                    "--process-id", "0"), environ={})
    got = _captured(monkeypatch, s, {distributed.JAX_ENV_BIND: "10.0.0.1:5000"})
    assert got["coordinator_bind_address"] == "10.0.0.1:5000"        # jax's own variable


@pytest.mark.parametrize("argv, words", [
    (["--bind", "nohost"], "HOST:PORT"),
    (["--bind", "127.0.0.1:1"], "no multi-process setting"),
])
def test_bind_errors(argv, words):
    with pytest.raises(ConfigError, match=words):
        distributed.from_args(_args(*argv), environ={})
