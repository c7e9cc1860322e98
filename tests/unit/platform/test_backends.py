"""Backend selection and numeric profiles (tfm_jax.platform.backends, tfm_jax.config.profiles, tfm-jax env):
the PJRT plugin path's errors (no plugin for hpu, missing file, a library that is not a PJRT
plugin -- in a fresh process, since jax's backends are already up here --, backends already
started); a real PJRT plugin (the CUDA plugin of the jax-cuda12-pjrt wheel) loading and
reporting no devices on a CPU machine (slow; skipped without the wheel); profile numerics
against ml_dtypes casts (gaudi2 saturates at 240, hopper at 448), scales in the hardware sets;
a train step under backend.emulate=gaudi2 quantizing to float8_e4m3fnuz with power-of-16 state;
the profile's MoE dispatch; the two-pass static flow (train -> calibrate -> fp8_static eval);
the seed's Ch2.3 decision tree; ``tfm-jax env`` output."""

import glob
import json
import os
import pathlib
import re
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from tfm_jax.platform import backends, environment
from tfm_jax import cli
from tfm_jax.config import profiles
from tfm_jax.config import BackendConfig, ConfigError, compose_config, load_config
from tfm_jax.quant import fp8
from tfm_jax.quant.formats import fmt_max
from tfm_jax.quant.scaling import GAUDI2_E4M3_SCALES, round_scale_for

ROOT = pathlib.Path(__file__).resolve().parents[3]


# --------------------------------------------------------------------------------------------
# PJRT plugin path: errors


@pytest.fixture
def no_plugin_env(monkeypatch):
    monkeypatch.delenv(backends.PLUGIN_ENV, raising=False)
    monkeypatch.delenv("PJRT_NAMES_AND_LIBRARY_PATHS", raising=False)


def test_hpu_without_plugin_says_what_to_install(no_plugin_env, monkeypatch):
    monkeypatch.setattr(backends, "installed_plugins", lambda: [])
    with pytest.raises(ConfigError) as e:
        backends.configure(BackendConfig(platform="hpu"))
    msg = str(e.value)
    for w in ("backend.platform=hpu", "--pjrt-plugin", backends.PLUGIN_ENV,
              "jax_plugins", "No public JAX PJRT plugin for Gaudi", "backend.emulate=gaudi2"):
        assert w in msg, (w, msg)


def test_missing_plugin_path_from_env(no_plugin_env, monkeypatch, tmp_path):
    missing = str(tmp_path / "nope.so")
    monkeypatch.setenv(backends.PLUGIN_ENV, missing)
    assert backends.plugin_path(BackendConfig(platform="hpu")) == (missing,
                                                                   f"${backends.PLUGIN_ENV}")
    assert backends.plugin_path(BackendConfig(platform="auto")) == (None, "")   # not for auto
    with pytest.raises(ConfigError, match=r"\$TFM_JAX_PJRT_PLUGIN=.*nope.so: no such file"):
        backends.configure(BackendConfig(platform="gpu"))


def test_plugin_path_is_absolute(no_plugin_env, monkeypatch, tmp_path):
    """A bare or relative name would go through the system library search when dlopened."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(backends.PLUGIN_ENV, "libplugin.so")
    path, _ = backends.plugin_path(BackendConfig(platform="hpu"))
    assert path == str(tmp_path / "libplugin.so")


@pytest.mark.parametrize("where", ["override", "config file", "run config"])
def test_plugin_path_in_a_config_is_refused(where, tmp_path):
    """A config, an override or a run's saved config.yaml naming a library is refused before
    anything could load it, with the way to pass it."""
    from tfm_jax.config.schema import PLUGIN_FIX

    lib = str(tmp_path / "libplugin.so")
    with pytest.raises(ConfigError) as e:
        if where == "override":
            load_config(None, ["backend.platform=hpu", f"backend.pjrt_plugin={lib}"])
        else:
            f = tmp_path / ("config.yaml" if where == "run config" else "mine.yaml")
            f.write_text(f"backend:\n  platform: hpu\n  pjrt_plugin: {lib}\n")
            load_config(str(f), [])
    assert "backend.pjrt_plugin" in str(e.value) and PLUGIN_FIX in str(e.value)
    assert "\n" not in str(e.value)                                 # one line
    assert "--pjrt-plugin" in PLUGIN_FIX and backends.PLUGIN_ENV in PLUGIN_FIX
    with pytest.raises(ConfigError, match="never read from a config"):   # a hand-built one
        backends.plugin_path(BackendConfig.model_construct(platform="hpu", pjrt_plugin=lib))


def test_cli_flag_sets_absolute_plugin_env(no_plugin_env, monkeypatch, tmp_path):
    """--pjrt-plugin reaches the backend as an absolute path (kv-cache runs no backend, so the
    flag is tried on 'config show', which parses it and prints the config)."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["config", "show", "--pjrt-plugin", "rel/lib.so"]) == 0
    assert os.environ[backends.PLUGIN_ENV] == str(tmp_path / "rel" / "lib.so")


def test_plugin_after_backends_started_is_refused(no_plugin_env):
    jax.devices()                        # this process's backends are up
    so = _libm()
    with pytest.raises(ConfigError, match="already started.*before the first jax computation"):
        backends.register_pjrt_plugin("hpu", so)


def _libm() -> str:
    for p in ("/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib/x86_64-linux-gnu/libm.so.6",
              "/lib64/libm.so.6", "/usr/lib64/libm.so.6", "/lib/aarch64-linux-gnu/libm.so.6"):
        if os.path.isfile(p):
            return p
    pytest.skip("no libm.so.6 at the usual paths (used as a library that is not a PJRT plugin)")


_CONFIGURE = """
import sys
from tfm_jax.platform import backends
from tfm_jax.config import load_config, ConfigError
cfg = load_config(None, sys.argv[1:])
try:
    backends.configure(cfg.backend)
except ConfigError as e:
    print("CONFIG_ERROR", e)
    sys.exit(3)
import jax
print("DEVICES", jax.devices())
"""


def _configure_fresh(*overrides: str, timeout: int = 180,
                     extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """configure() in a fresh interpreter (nothing initialised yet), as a run does."""
    env = {k: v for k, v in os.environ.items()
           if k not in (backends.PLUGIN_ENV, "PJRT_NAMES_AND_LIBRARY_PATHS", "XLA_FLAGS")}
    env.update(extra_env or {})
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", _CONFIGURE, *overrides], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def test_library_that_is_not_a_pjrt_plugin_keeps_loader_message():
    r = _configure_fresh("backend.platform=hpu", extra_env={backends.PLUGIN_ENV: _libm()})
    assert r.returncode == 3, (r.stdout, r.stderr[-2000:])
    msg = r.stdout
    assert "did not load as a PJRT plugin" in msg and "GetPjrtApi" in msg, msg
    assert "GetPjrtApi not found" in msg, msg        # jaxlib's loader message, kept


def _cuda_plugin(tmp_path_factory) -> str:
    """xla_cuda_plugin.so from the jax-cuda12-pjrt wheel matching jaxlib (never downloaded
    here): $TFM_JAX_TEST_CUDA_PLUGIN, an extracted copy under /work/wheels, or the wheel
    there (extracted into a temporary folder)."""
    import jaxlib

    given = os.environ.get("TFM_JAX_TEST_CUDA_PLUGIN")
    if given:
        return given
    v = jaxlib.__version__
    wheels = os.environ.get("TFM_JAX_WHEELS", "/work/wheels")
    for so in glob.glob(f"{wheels}/**/xla_cuda12/xla_cuda_plugin.so", recursive=True):
        dist = glob.glob(str(pathlib.Path(so).parents[2] / "jax_cuda12_pjrt-*.dist-info"))
        if any(pathlib.Path(d).name == f"jax_cuda12_pjrt-{v}.dist-info" for d in dist):
            return so
    whl = glob.glob(f"{wheels}/jax_cuda12_pjrt-{v}-*.whl")
    if not whl:
        pytest.skip(f"no jax-cuda12-pjrt {v} wheel in {wheels} (fetch it once with "
                    f"`pip download --no-deps jax-cuda12-pjrt=={v} -d {wheels}`; tests never "
                    "download), nor $TFM_JAX_TEST_CUDA_PLUGIN")
    out = tmp_path_factory.mktemp("cuda_pjrt")
    with zipfile.ZipFile(whl[0]) as z:
        name = next(n for n in z.namelist() if n.endswith("xla_cuda_plugin.so"))
        return z.extract(name, out)


@pytest.mark.slow
@pytest.mark.parametrize("platform, how", [("gpu", "config"), ("hpu", "config"),
                                           ("hpu", "jax_env")])
def test_real_pjrt_plugin_loads_then_no_devices(platform, how, tmp_path_factory):
    """A real PJRT plugin library (CUDA) registered by path -- by $TFM_JAX_PJRT_PLUGIN (our
    register_plugin call) or by jax's own PJRT_NAMES_AND_LIBRARY_PATHS --: it loads; on a
    machine without an NVIDIA GPU it reports no device (on a GPU machine it starts and lists
    the GPUs)."""
    so = _cuda_plugin(tmp_path_factory)
    if how == "config":
        r = _configure_fresh(f"backend.platform={platform}", extra_env={backends.PLUGIN_ENV: so})
    else:
        r = _configure_fresh(f"backend.platform={platform}",
                             extra_env={"PJRT_NAMES_AND_LIBRARY_PATHS": f"hpu{os.pathsep}{so}"})
    if r.returncode == 0:                # a GPU is visible: the plugin really runs
        assert "DEVICES" in r.stdout and ("cuda" in r.stdout.lower()
                                          or "gpu" in r.stdout.lower()), r.stdout
        return
    assert r.returncode == 3, (r.stdout, r.stderr[-2000:])
    msg = r.stdout
    if how == "config":
        assert f"PJRT plugin {so} loaded, but no device came up" in msg, msg
    else:
        assert "hpu (PJRT_NAMES_AND_LIBRARY_PATHS)" in msg and "no device came up" in msg, msg
    assert "did not load" not in msg and "GetPjrtApi not found" not in msg
    if platform == "hpu":                # registered as 'hpu': the CUDA plugin's own words
        assert "No visible GPU devices" in msg, msg


# --------------------------------------------------------------------------------------------
# profiles: numerics


def _qdq(cfg, x, scale):
    """The forward operand quantizer of the config's FP8 dot (static scale ``scale``)."""
    dot = fp8.Fp8DotGeneral(recipe="fp8_static", fwd_format=cfg.quant.fwd_format,
                            scale_set=cfg.quant.scale_set)
    spec = dot._qspec("input")
    return fp8.qdq_operand(jnp.asarray(x, jnp.float32), {"scale": jnp.float32(scale)}, spec)


def test_gaudi2_saturates_at_240_hopper_at_448():
    x = np.array([300.0, -1000.0, 239.0, 100.5, 0.3, 500.0], np.float32)
    g2 = load_config(None, ["backend.emulate=gaudi2"])
    hop = load_config(None, ["backend.emulate=nvidia-hopper"])
    got_g2 = np.asarray(_qdq(g2, x, 1.0)[0])
    got_hop = np.asarray(_qdq(hop, x, 1.0)[0])
    ref_g2 = np.clip(x, -240, 240).astype(ml_dtypes.float8_e4m3fnuz).astype(np.float32)
    ref_hop = np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(got_g2, ref_g2)
    np.testing.assert_array_equal(got_hop, ref_hop)
    assert got_g2[0] == 240.0 and got_g2[1] == -240.0 and got_g2[5] == 240.0
    assert got_hop[0] == 288.0 and got_hop[5] == 448.0      # e4m3fn grid: 288, then 448 max


@pytest.mark.parametrize("emulate, allowed", [
    ("gaudi2", set(GAUDI2_E4M3_SCALES)), ("gaudi3", None), ("nvidia-hopper", None)])
def test_dynamic_scales_land_in_the_hardware_set(emulate, allowed):
    cfg = load_config(None, [f"backend.emulate={emulate}"])
    dot = fp8.Fp8DotGeneral(recipe="fp8_dynamic", fwd_format=cfg.quant.fwd_format,
                            scale_set=cfg.quant.scale_set)
    spec = dot._qspec("input")
    rng = np.random.default_rng(0)
    fmax = fmt_max(cfg.quant.fwd_format)
    for amax in [1e-3, 0.07, 0.5, 3.0, 15.0, 240.0, 1e3, 1e5]:
        x = rng.standard_normal(64).astype(np.float32)
        x = x / np.abs(x).max() * amax
        scale = float(fp8.qdq_operand(jnp.asarray(x), {}, spec)[1])
        exact = fmax / amax
        if allowed is None or exact >= min(allowed):
            assert scale <= exact * (1 + 1e-6)                 # rounded down: no new overflow
        if allowed is not None:                                # gaudi2: powers of 16
            assert scale in allowed, (amax, scale)
            below = [a for a in allowed if a <= exact]
            assert scale == (max(below) if below else min(allowed))
        elif cfg.quant.scale_set == "pow2":                    # gaudi3: a power of two
            assert np.log2(scale) == np.round(np.log2(scale)) and scale > exact / 2
        else:                                                  # hopper: the exact scale
            assert scale == pytest.approx(exact, rel=1e-6)


def test_round_scale_for_against_numpy():
    s = np.array([1e-3, 0.06, 0.0625, 0.9, 1.0, 15.9, 16.0, 300.0, 1e4], np.float32)
    g2 = np.asarray(round_scale_for(jnp.asarray(s), "gaudi2"))
    ref = [max([a for a in GAUDI2_E4M3_SCALES if a <= v], default=2.0 ** -4) for v in s]
    np.testing.assert_array_equal(g2, np.asarray(ref, np.float32))
    p2 = np.asarray(round_scale_for(jnp.asarray(s), "pow2"))
    np.testing.assert_array_equal(p2, 2.0 ** np.floor(np.log2(s.astype(np.float64))))
    np.testing.assert_array_equal(np.asarray(round_scale_for(jnp.asarray(s), "any")), s)
    with pytest.raises(ValueError, match="valid: any, pow2, gaudi2"):
        round_scale_for(jnp.asarray(s), "pow3")


def _tiny(extra=(), **sections):
    base = {"model": {"d_model": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2,
                      "multiple_of": 32},
            "data": {"seq_len": 16}, "train": {"batch_size": 4}}
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return compose_config("tiny", [base, dict(extra)])


def _batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, 256, (cfg.train.batch_size, cfg.data.seq_len + 1))
    return {"inputs": toks[:, :-1].astype(np.int32), "targets": toks[:, 1:].astype(np.int32),
            "mask": np.ones((cfg.train.batch_size, cfg.data.seq_len), np.float32)}


def test_train_step_under_gaudi2_emulation_uses_fnuz_and_pow16_state():
    from tfm_jax.train import build

    cfg = _tiny({"backend.emulate": "gaudi2", "quant.recipe": "fp8_delayed",
                 "quant.amax_history": 4})
    assert cfg.quant.fwd_format == "float8_e4m3fnuz"
    setup = build(cfg, jax.devices()[:1])
    state = setup.init_state()
    batch = setup.shard_batch(_batch(cfg))
    with setup.context():
        text = setup.train_step.lower(state, batch).as_text()
        for _ in range(3):
            state, _m = setup.train_step(state, batch)
    # the quantize casts of the compiled step are to fnuz e4m3 (plus e5m2 for gradients),
    # never the OCP e4m3fn a profile-less run uses
    types = set(re.findall(r"f8E[45]M[23][A-Z]*", text))
    assert "f8E4M3FNUZ" in types and "f8E4M3FN" not in types, types
    scales = {jax.tree_util.keystr(p): np.asarray(x)
              for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]
              if "input_scale" in jax.tree_util.keystr(p)
              or "kernel_scale" in jax.tree_util.keystr(p)}
    assert scales
    for k, v in scales.items():
        assert set(np.ravel(v).tolist()) <= set(GAUDI2_E4M3_SCALES), (k, v)
    # and the unrounded scale would not have been in the set (the rounding did something)
    assert any(float(np.ravel(v)[0]) != 1.0 for v in scales.values())


def test_gaudi2_profile_moe_dispatch_is_implicit():
    from tfm_jax.train import build

    kw = dict(moe={"n_experts": 4, "top_k": 2}, train={"batch_size": 8})
    cfg = _tiny({"backend.emulate": "gaudi2", "mesh.data": 4, "mesh.expert": 2}, **kw)
    assert cfg.moe.dispatch == "implicit"
    explicit = _tiny({"mesh.data": 4, "mesh.expert": 2}, **kw)
    assert explicit.moe.dispatch == "all_to_all"
    texts = {}
    for name, c in (("gaudi2", cfg), ("default", explicit)):
        setup = build(c, jax.devices())
        batch = {k: jax.ShapeDtypeStruct((8, c.data.seq_len), jnp.float32 if k == "mask"
                                         else jnp.int32, sharding=setup.batch_sharding)
                 for k in ("inputs", "targets", "mask")}
        with setup.context():        # lowered from shapes only: nothing initialised or run
            texts[name] = setup.eval_step.lower(setup.eval_state(setup.abstract_state()),
                                                batch).as_text()
    # the explicit path is a shard_map with an all_to_all; the profile's implicit path leaves
    # the collectives to XLA (none in the lowered program)
    assert "all_to_all" in texts["default"]
    assert "all_to_all" not in texts["gaudi2"]


# --------------------------------------------------------------------------------------------
# the two-pass static flow (measure -> quantize) under the gaudi2 profile


@pytest.mark.slow                   # ~60 s on the shared 2-core machine: train, calibrate, eval
def test_two_pass_static_flow_gaudi2(tmp_path, text_corpus, capsys):
    from tfm_jax.train import train

    cfg = _tiny({"backend.emulate": "gaudi2"}, data={"path": str(text_corpus)},
                train={"batch_size": 8, "steps": 20, "warmup_steps": 2, "log_every": 10, "eval_every": 20,
                       "checkpoint_every": 20, "eval_batches": 2, "sample_tokens": 0},
                run={"dir": str(tmp_path / "run"), "tensorboard": False, "progress": False})
    res = train(cfg, devices=jax.devices()[:1])
    run = str(cfg.run_dir)
    # pass 1: measure (the run's own config carries the profile's format and scale set)
    assert cli.main(["calibrate", "--run-dir", run, "--batches", "2"]) == 0
    out = cfg.run_dir / "calibration-max.json"
    assert f"calibration file: {out}" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["fwd_format"] == "float8_e4m3fnuz" and doc["scale_set"] == "gaudi2"
    vals = [v for e in doc["scales"].values() for s in e.values() for v in np.ravel(s)]
    assert vals and set(vals) <= set(GAUDI2_E4M3_SCALES), sorted(set(vals))
    # pass 2: quantize with the fixed scales
    assert cli.main(["eval", "--run-dir", run, "quant.recipe=fp8_static",
                     f"quant.calibration={out}"]) == 0
    static = json.loads(capsys.readouterr().out)
    assert static["quant_recipe"] == "fp8_static"
    assert static["val_loss"] != pytest.approx(res.eval["val_loss"], rel=1e-7)
    assert abs(static["val_ppl"] / res.eval["val_ppl"] - 1) < 0.05, (static, res.eval)
    # a calibration made for another format is refused, naming the fix
    other = tmp_path / "e4m3fn.json"
    fp8.write_calibration(other, doc["scales"], fwd_format="float8_e4m3fn")
    assert cli.main(["eval", "--run-dir", run, "quant.recipe=fp8_static",
                     f"quant.calibration={other}"]) == 2
    err = capsys.readouterr().err
    assert "float8_e4m3fn" in err and "recalibrate with quant.fwd_format=float8_e4m3fnuz" in err


# --------------------------------------------------------------------------------------------
# the seed's Ch2.3 decision tree, tfm-jax env


@pytest.mark.parametrize("profile, workload, stable, priority, want", [
    ("gaudi2", "inference", True, None, "static"),          # HPU: throughput -> static
    ("gaudi3", "inference", True, None, "static"),
    ("nvidia-hopper", "inference", True, None, "dynamic"),  # NVIDIA: accuracy -> dynamic
    (None, "inference", True, None, "dynamic"),
    ("gaudi2", "inference", False, None, "dynamic"),        # unstable inputs -> dynamic
    ("nvidia-hopper", "inference", True, "throughput", "static"),
    ("gaudi2", "inference", True, "accuracy", "dynamic"),
    ("gaudi2", "training", True, None, "delayed"),
    ("nvidia-hopper", "training", True, None, "delayed"),
])
def test_decision_tree(profile, workload, stable, priority, want):
    r = profiles.recommend_scaling(profile, workload=workload, stable_inputs=stable,
                                   priority=priority)
    assert r.scaling == want
    assert r.recipe == {"static": "fp8_static", "dynamic": "fp8_dynamic",
                        "delayed": "fp8_delayed"}[want]
    assert r.reason
    if workload == "inference":
        assert "Ch2.3.3" in r.reason
    assert "emulated" in profiles.recommend_scaling(profile, fp8_native=False).reason


def test_env_report_and_cli(capsys):
    rep = environment.report(BackendConfig(), measure=False)
    assert rep["versions"]["jax"] == jax.__version__
    assert rep["backend"]["platform"] == jax.devices()[0].platform
    assert rep["backend"]["device_count"] == len(jax.devices())
    assert rep["fp8"]["mode"] == ("emulated" if jax.devices()[0].platform == "cpu" else
                                  rep["fp8"]["mode"])
    assert rep["plugins"]["error"] is None
    assert set(rep["recommended_scaling"]) == {"training", "inference"}
    assert cli.main(["env", "--json", "--no-measure", "backend.emulate=gaudi2"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["profile"]["used"] == "gaudi2" and got["profile"]["emulated"]
    assert got["recommended_scaling"]["inference"]["recipe"] == "fp8_static"
    assert cli.main(["env", "--no-measure"]) == 0
    text = capsys.readouterr().out
    for head in ("versions", "platform", "devices", "plugins", "kernels", "fp8", "peak",
                 "profile", "scaling"):
        assert re.search(rf"^{re.escape(head)}\s", text, re.M), (head, text)


def test_fp8_support_by_device():
    class D:
        def __init__(self, platform, kind, cc=None):
            self.platform, self.device_kind = platform, kind
            if cc:
                self.compute_capability = cc
    assert environment.fp8_support(D("cpu", "cpu"))[0] == "emulated"
    assert environment.fp8_support(D("gpu", "NVIDIA H100 80GB HBM3", "9.0"))[0] == "native"
    assert environment.fp8_support(D("gpu", "NVIDIA A100-SXM4-80GB", "8.0"))[0] == "emulated"
    assert environment.fp8_support(D("gpu", "NVIDIA H200"))[0] == "native"
    assert environment.fp8_support(D("hpu", "GAUDI2"))[0] == "native"
    assert environment.matching_profile(D("gpu", "NVIDIA H100 80GB HBM3")) == "nvidia-hopper"
    assert environment.matching_profile(D("hpu", "GAUDI3")) == "gaudi3"
    assert environment.matching_profile(D("gpu", "NVIDIA A100")) is None


@pytest.mark.parametrize("kind, bf16", [("NVIDIA H100 80GB HBM3", 989e12),
                                        ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
                                        ("NVIDIA H200 NVL", 835e12)])
def test_peak_flops_per_card_variant(kind, bf16, monkeypatch):
    """Each H100/H200 variant gets its own dense bf16 peak (a PCIe card is not an SXM one)."""
    from tfm_jax.config import load_config

    class Dev:
        platform, device_kind = "gpu", kind

    monkeypatch.setattr(backends.jax, "devices", lambda *a: [Dev()])
    peak, source = backends.peak_flops_info(load_config(None, ["model.dtype=bfloat16"]), 2)
    assert peak == 2 * bf16 and "vendor figure" in source
