"""The FP8 GEMM form of tfm-jax's train step in every configuration: lowered with the op set a GPU
run gets (on CPU, nothing runs), every dot fed by FP8 values checked against XLA:GPU's GEMM
rewriter rules (tfm_jax.quant.hlo_check)."""

import pytest

from tfm_jax.quant import hlo_check

from fp8_support import step_hlo

CONFIGS = [
    (dtype, scan, remat, accum)
    for dtype in ("float32", "bfloat16")
    for scan in (False, True)
    for remat in ("none", "full", "dots")
    for accum in (1, 2)
]


@pytest.mark.parametrize("dtype,scan,remat,accum", CONFIGS)
def test_every_fp8_fed_dot_takes_the_fp8_gemm_form(tmp_path, devices, dtype, scan, remat,
                                                    accum):
    text = step_hlo(tmp_path, devices, f"model.dtype={dtype}",
                    f"model.scan_layers={str(scan).lower()}", f"model.remat={remat}",
                    f"train.grad_accum={accum}")
    rep = hlo_check.check_hlo(text)
    # forward, input gradient, kernel gradient of 7 projections per (scanned) layer; full
    # remat recomputes forward dots in the backward pass
    assert rep.total >= 3 * 7 * (1 if scan else 2) and rep.all_accepted, rep.summary()


@pytest.mark.parametrize("extra", [["quant.fp8_weight_storage=true"],
                                   ["quant.telemetry=true"],
                                   ["quant.fp8_weight_storage=true", "model.scan_layers=true"]])
@pytest.mark.parametrize("recipe", ["fp8_delayed", "fp8_dynamic"])
def test_recipes_storage_and_telemetry_keep_the_form(tmp_path, devices, recipe, extra):
    rep = hlo_check.check_hlo(step_hlo(tmp_path, devices, "model.dtype=bfloat16", *extra,
                                       recipe=recipe))
    assert rep.total >= 21 and rep.all_accepted, rep.summary()


def test_per_channel_kernel_scales_lose_the_input_gradient_gemm(tmp_path, devices):
    """Per-channel kernel scales: forward and kernel gradient stay FP8 GEMMs (the column scales
    act on the output); the input gradient contracts over the scaled axis, so its GEMM takes the
    dequantized kernel -- refused, one of three per projection."""
    rep = hlo_check.check_hlo(step_hlo(tmp_path, devices, "model.dtype=bfloat16",
                                       "quant.kernel_granularity=per_channel"))
    assert rep.total == 42 and rep.accepted == 28, rep.summary()


def test_static_recipe(tmp_path, devices):
    from tfm_jax.quant import fp8
    projs = [f"layers_{i}/{p}" for i in range(2) for p in
             ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "ffn/wi_0",
              "ffn/wi_1", "ffn/wo")]
    path = tmp_path / "calib.json"
    fp8.write_calibration(path, {p: {"input_scale": 100.0, "kernel_scale": 5000.0}
                                 for p in projs})
    rep = hlo_check.check_hlo(step_hlo(tmp_path, devices, "model.dtype=bfloat16",
                                       f"quant.calibration={path}", recipe="fp8_static"))
    assert rep.total == 42 and rep.all_accepted, rep.summary()
