"""Cases of default-suite tests that run here, in the integration tier, to keep the default
suite within its time budget (marked ``slow`` where they are defined, so the default suite
skips them and CI still runs them once)."""

import importlib.util
import pathlib

import pytest


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


@pytest.fixture(scope="module")
def builtin_corpus(tmp_path_factory):
    from tfm_jax import data as data_lib

    return data_lib.load_corpus(None, 0.05, str(tmp_path_factory.mktemp("cache")))


def test_fp8_state_data_sharded_equals_single_device(tmp_path, builtin_corpus, devices):
    _unit_module("quant/test_fp8.py").test_sharded_state_equals_single_device(
        tmp_path, builtin_corpus, devices, ["mesh.data=8"])


def test_fp8_dot_quantizing_nothing_trains_exactly_as_fp32(tmp_path, builtin_corpus, devices):
    _unit_module("quant/test_fp8.py").test_fp8_dot_quantizing_nothing_trains_exactly_as_fp32(
        tmp_path, builtin_corpus, devices)


def test_train_sharded_equals_single_device(tmp_path, builtin_corpus, devices):
    _unit_module("train/test_train.py").test_sharded_equals_single_device(
        tmp_path, builtin_corpus, devices)


def test_block_causal_path_equals_masked_path():
    _unit_module("model/test_model.py").test_block_causal_path_equals_masked_path()


def test_native_kernels_match_xla_unscanned():
    kernels = _unit_module("platform/test_kernels.py")
    if not kernels.OK:
        pytest.skip(f"native kernels unavailable: {kernels.WHY}")
    kernels.test_model_native_matches_xla(False, "openblas")


def test_quantized_pages_equal_the_quantized_contiguous_cache():
    paged = _unit_module("serve/test_paged_cache.py")
    for fmt in ("int8", "fp8"):
        paged.test_quantized_pages_equal_the_quantized_contiguous_cache(fmt)


def test_every_op_set_computes_the_same_scanned_model():
    _unit_module("layers/test_ops.py").test_every_op_set_computes_the_same_model(True)


def test_fp8_state_is_overwritten_not_optimized(tmp_path, builtin_corpus, devices):
    _unit_module("quant/test_fp8.py").test_state_is_overwritten_not_optimized(
        tmp_path, builtin_corpus, devices)


def test_fp8_static_scales_from_calibration_stay_fixed(tmp_path, builtin_corpus, devices):
    _unit_module("quant/test_fp8.py").test_static_scales_from_calibration_stay_fixed(
        tmp_path, builtin_corpus, devices)


def test_moe_fsdp_tensor_expert_mesh_equals_dense(devices, monkeypatch):
    _unit_module("layers/test_moe.py").test_fsdp_and_tensor_meshes_equal_dense(
        devices, {"fsdp": 2, "tensor": 2, "expert": 2}, monkeypatch)


def test_weight_decay_same_parameters_with_scan_layers(tmp_path, devices):
    _unit_module("train/test_train.py").test_weight_decay_same_parameters_with_scan_layers(
        tmp_path, devices, [])
