"""Cases of default-suite tests that run here, in the integration tier, to keep the default
suite within its time budget (marked ``slow`` where they are defined, so the default suite
skips them and CI still runs them once)."""

import importlib.util
import pathlib


def _unit_module(rel: str):
    path = pathlib.Path(__file__).resolve().parents[1] / "unit" / rel
    spec = importlib.util.spec_from_file_location(f"_heavy_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_op_set_computes_the_same_unscanned_model():
    _unit_module("layers/test_ops.py").test_every_op_set_computes_the_same_model(False)


def test_causal_cores_agree_without_padding():
    _unit_module("layers/test_ops.py").test_causal_cores_agree_values_and_grads(False)
