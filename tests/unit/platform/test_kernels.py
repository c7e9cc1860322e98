"""Native fp32 CPU kernels (tfm_jax/platform/kernels): that they load where they can, the BLAS finder and
every installed BLAS, numerics against numpy and against the XLA path, the model with
the cpu-native vs cpu-xla op sets, the BLAS choice, the build cache (the backend.cpu_kernels
resolution is in tests/unit/layers/test_ops.py)."""

import contextlib
import ctypes
import os
import pathlib
import platform
import shutil
import subprocess
import sys

import jax
import jax.test_util  # noqa: F401  (check_grads)
import jax.numpy as jnp
import numpy as np
import pytest

from tfm_jax.config import ConfigError, ModelConfig, load_config
from tfm_jax.layers.attention_ops import block as attn_lib, dense as attn_dense
from tfm_jax.platform.kernels import cpu as cpu_kernels
from tfm_jax.platform.xla_cpu import cpu_xla_ops
from tfm_jax.model import TransformerLM

cpu = pytest.importorskip("tfm_jax.platform.kernels.cpu")
OK, WHY = cpu.available()           # the default BLAS (auto): what every numeric test below runs
DEFAULT_BLAS = cpu.active_blas()
needs_kernels = pytest.mark.skipif(not OK, reason=f"native kernels unavailable: {WHY}")
_ROOT = pathlib.Path(__file__).resolve().parents[3]


def _platform_cannot_build():
    """Why this platform genuinely cannot have the native kernels (None: it must have them)."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"native kernels are built on Linux x86_64 only (this is {sys.platform} " \
               f"{platform.machine()})"
    if not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")):
        return "no C++ compiler (g++/c++) on PATH"
    return None


def test_native_kernels_load_on_linux_x86_64_with_a_compiler():
    """Fails (not skips) where the kernels should work: the old silent XLA fallback hid a missing
    BLAS (libmkl_rt.so.2 vs .so.3) from CI."""
    why_not = _platform_cannot_build()
    if why_not:
        pytest.skip(why_not)
    assert OK, f"native CPU kernels did not load: {WHY}"
    assert DEFAULT_BLAS is not None and str(DEFAULT_BLAS.path) in WHY


def _auto_candidates():
    """The kinds ``auto`` may pick on this machine: the installed libraries."""
    found = cpu.find_blas()
    return [k for k in cpu.AUTO_ORDER if found[k]]


@needs_kernels
def test_default_blas_is_the_first_installed_of_auto_order():
    found = cpu.find_blas()
    expected = _auto_candidates()[0]
    assert DEFAULT_BLAS.kind == expected
    assert found[expected][0] == DEFAULT_BLAS.path
    # the kernels' log line names the BLAS, its version, core (OpenBLAS) and library path
    assert DEFAULT_BLAS.version.split()[0] in WHY and str(DEFAULT_BLAS.path) in WHY
    if DEFAULT_BLAS.kind == "openblas":
        assert DEFAULT_BLAS.core and f"{DEFAULT_BLAS.core} core" in WHY
    # one line: the BLAS, then (where it applies) what the [mkl] extra would give
    assert WHY == DEFAULT_BLAS.describe() + (f"; {cpu.extra_hint(DEFAULT_BLAS)}"
                                             if cpu.extra_hint(DEFAULT_BLAS) else "")
    assert "\n" not in WHY


def test_kernels_line_says_what_the_mkl_extra_would_give():
    """On Intel without MKL the line names the extra; not where MKL runs or is installed (then
    OpenBLAS was a choice), nor on other vendors (MKL measured slower there)."""
    ob = cpu.Blas("openblas", pathlib.Path("/x/libscipy_openblas.so"), "OpenBLAS 0.3.34", "Zen",
                  0, False, "scipy-openblas32")
    mkl = cpu.Blas("mkl", pathlib.Path("/x/libmkl_rt.so.3"), "Intel MKL 2026.2", "", 0, False,
                   "(sequential)")
    hint = cpu.extra_hint(ob, "GenuineIntel", mkl_installed=False)
    assert "tfm-jax[mkl]" in hint and "MKL" in hint
    assert cpu.extra_hint(ob, "GenuineIntel", mkl_installed=True) == ""
    assert cpu.extra_hint(mkl, "GenuineIntel", mkl_installed=True) == ""
    assert cpu.extra_hint(ob, "AuthenticAMD", mkl_installed=False) == ""
    assert cpu.extra_hint(ob, "", mkl_installed=False) == ""


def _installed(kind):
    paths = cpu.find_blas()[kind]
    if not paths:
        pytest.skip(f"{kind} is not installed ({cpu.INSTALL_HINT[kind]})")
    return cpu.open_blas(kind, paths[0])


@needs_kernels
@pytest.mark.parametrize("kind", ["openblas", "mkl"])
@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("m,k,n", [(300, 40, 24), (17, 8, 5), (130, 257, 66), (3, 96, 300)])
def test_gemm_with_each_installed_blas_matches_numpy(kind, ta, tb, m, k, n):
    blas = _installed(kind)
    rng = np.random.default_rng(m + k + n)
    a = rng.standard_normal((k, m) if ta else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if tb else (k, n)).astype(np.float32)
    prev = cpu.use_blas(blas)
    try:
        got = np.asarray(jax.jit(lambda x, y: cpu._gemm(x, y, ta=ta, tb=tb))(a, b))
    finally:
        cpu.use_blas(prev)
    ref = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b).astype(np.float64)
    assert got.shape == (m, n)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


@needs_kernels
def test_use_blas_switches_the_library_between_calls():
    blas = _installed("mkl" if DEFAULT_BLAS.kind != "mkl" else "openblas")
    prev = cpu.use_blas(blas)
    try:
        assert cpu.active_blas() is blas and prev is DEFAULT_BLAS
        assert cpu.available()[1].startswith(blas.describe())
    finally:
        cpu.use_blas(prev)
    assert cpu.active_blas() is DEFAULT_BLAS


def test_a_blas_asked_for_by_name_but_missing_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(cpu, "find_blas", lambda *a, **k: {"openblas": [], "mkl": [],
                                                           "numpy-openblas": []})
    with pytest.raises(RuntimeError, match=r"cpu_blas=mkl: .*pip install 'tfm-jax\[mkl\]'"):
        cpu.resolve_blas("mkl")
    with pytest.raises(RuntimeError, match=r"cpu_blas=auto: ") as err:
        cpu.resolve_blas("auto")
    assert "pip install scipy-openblas32" in str(err.value)
    assert "pip install 'tfm-jax[mkl]'" in str(err.value)
    with pytest.raises(RuntimeError, match="must be one of"):
        cpu.resolve_blas("atlas")
    # the removed hand-written sgemm ($TFM_JAX_CPU_BLAS=builtin): refused with the fix
    with pytest.raises(RuntimeError, match=r"'builtin'.*removed.*openblas"):
        cpu.resolve_blas("builtin")


def test_cpu_blas_config_knob(tmp_path):
    assert load_config().backend.cpu_blas == "auto"
    assert load_config(overrides=["backend.cpu_blas=mkl"]).backend.cpu_blas == "mkl"
    assert load_config(overrides=["backend.cpu_blas=openblas"]).backend.cpu_blas == "openblas"
    with pytest.raises(ConfigError, match="cpu_blas"):
        load_config(overrides=["backend.cpu_blas=atlas"])
    # a config saved while 'builtin' (the removed hand-written sgemm) existed: the error names
    # the fix
    with pytest.raises(ConfigError, match=r"cpu_blas=builtin: .*removed.*cpu_blas=auto or "
                                          r"openblas.*tfm-jax\[mkl\]"):
        load_config(overrides=["backend.cpu_blas=builtin"])
    saved = tmp_path / "config.yaml"
    saved.write_text("backend:\n  cpu_blas: builtin\n")
    with pytest.raises(ConfigError, match="cpu_blas=builtin: .*removed"):
        load_config(str(saved))


def rand(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


@contextlib.contextmanager
def _blas(kind):
    """Runs the block on BLAS ``kind`` (skipped where it is not installed), then restores the
    previous one."""
    paths = cpu.find_blas()[kind]
    if not paths:
        pytest.skip(f"{kind} is not installed ({cpu.INSTALL_HINT[kind]})")
    prev = cpu.use_blas(cpu.open_blas(kind, paths[0]))
    try:
        yield
    finally:
        cpu.use_blas(prev)


@needs_kernels
@pytest.mark.parametrize("n,k,m", [(300, 40, 24), (17, 8, 5), (256, 64, 128)])
def test_matmul_and_grads_match_numpy(n, k, m):
    rng = np.random.default_rng(0)
    x, w, dy = rand(rng, n, k), rand(rng, k, m), rand(rng, n, m)
    y, vjp = jax.vjp(cpu.matmul, x, w)
    dx, dw = vjp(dy)
    x64, w64, dy64 = (np.asarray(a, np.float64) for a in (x, w, dy))
    np.testing.assert_allclose(y, x64 @ w64, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dx, dy64 @ w64.T, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dw, x64.T @ dy64, rtol=1e-5, atol=1e-4)


@needs_kernels
def test_dot_general_refuses_what_it_cannot_do():
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="fp32 only"):
        cpu.dot_general(x.astype(jnp.bfloat16), jnp.ones((3, 2), jnp.bfloat16),
                        (((1,), (0,)), ((), ())))
    with pytest.raises(ValueError, match=r"\(N, K\) @ \(K, M\)"):
        cpu.dot_general(x, jnp.ones((2, 3)), (((1,), (1,)), ((), ())))


@needs_kernels
@pytest.mark.parametrize("rows,native", [(1, True), (2, False), (16, False), (31, False),
                                         (32, True), (256, True)])
def test_dot_general_routes_few_rows_to_xla(rows, native):
    """Decode GEMMs with 2-31 rows go to XLA's dot (measured faster there), every other row
    count to tfm_gemm; both agree with numpy."""
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 48)).astype(np.float32)
    w = rng.standard_normal((48, 300)).astype(np.float32)
    f = jax.jit(lambda a, b: cpu.dot_general(a, b, (((1,), (0,)), ((), ()))))
    hlo = f.lower(x, w).as_text()
    assert ("tfm_gemm" in hlo) == native
    np.testing.assert_allclose(f(x, w), x.astype(np.float64) @ w, rtol=1e-5, atol=1e-4)


def numpy_causal_attention(q, k, v, k_valid, block):
    """Independent float64 reference with the framework's semantics: query block i sees keys
    [0, end_i), masked scores are -1e30 (finite); a query with no valid key gives 0."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, d = q.shape
    g = h // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            for t0 in range(0, t, block):
                end = min(t0 + block, t)
                s = q[bi, t0:end, hi] @ k[bi, :end, hi // g].T / np.sqrt(d)
                pos = np.arange(t0, end)[:, None]
                ok = (np.arange(end)[None] <= pos) & (np.asarray(k_valid)[bi, :end] > 0)[None]
                s = np.where(ok, s, -1e30)
                p = np.exp(s - s.max(-1, keepdims=True))
                rows = (p / p.sum(-1, keepdims=True)) @ v[bi, :end, hi // g]
                out[bi, t0:end, hi] = np.where(ok.any(-1)[:, None], rows, 0.0)
    return out


CASES = [  # B, T, H, Hkv, D, block, padded
    (2, 100, 4, 2, 16, 32, True),      # GQA, T not a multiple of the block, fully masked rows
    (1, 64, 2, 1, 8, 64, False),       # MQA, one block
    (3, 130, 6, 3, 32, 64, True),      # 3 blocks, the last one short
    (2, 48, 4, 4, 8, 16, False),       # MHA
]


@needs_kernels
@pytest.mark.parametrize("blas", ["openblas", "mkl"])
@pytest.mark.parametrize("b,t,h,hkv,d,block,padded", CASES)
def test_attention_matches_numpy_and_xla_path(b, t, h, hkv, d, block, padded, blas):
    with _blas(blas):
        _attention_matches_numpy_and_xla_path(b, t, h, hkv, d, block, padded)


def _attention_matches_numpy_and_xla_path(b, t, h, hkv, d, block, padded):
    rng = np.random.default_rng(1)
    q, k, v = rand(rng, b, t, h, d), rand(rng, b, t, hkv, d), rand(rng, b, t, hkv, d)
    kv = np.ones((b, t), np.float32)
    if padded:
        kv[0, :3] = 0          # rows 0..2 of batch 0 see no valid key at all
        kv[-1, t // 2:] = 0
    kv = jnp.asarray(kv)
    do = rand(rng, b, t, h, d)
    o_nat, vjp_nat = jax.vjp(lambda q, k, v: cpu.causal_attention(q, k, v, kv, block_q=block),
                             q, k, v)
    o_xla, vjp_xla = jax.vjp(
        lambda q, k, v: attn_lib.causal_attention(q, k, v, kv, block_q=block), q, k, v)
    np.testing.assert_allclose(o_nat, numpy_causal_attention(q, k, v, kv, block),
                               rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(o_nat, o_xla, rtol=1e-5, atol=2e-6)
    for g_nat, g_xla in zip(vjp_nat(do), vjp_xla(do)):
        np.testing.assert_allclose(g_nat, g_xla, rtol=1e-4, atol=1e-5)


def numpy_decode_attention(q, k, v, pos):
    """Independent float64 reference of decode attention: query t of row b sees cache slots
    0..pos[b, t] (and nothing beyond); G = H / Hkv query heads share a kv head."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, d = q.shape
    g = h // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for ti in range(t):
            n = int(pos[bi, ti]) + 1
            for hi in range(h):
                s = k[bi, :n, hi // g] @ q[bi, ti, hi] / np.sqrt(d)
                p = np.exp(s - s.max())
                out[bi, ti, hi] = (p / p.sum()) @ v[bi, :n, hi // g]
    return out


DECODE_CASES = [  # B, T, H, Hkv, D, S, per-row last positions (the T queries end there)
    (2, 1, 8, 2, 32, 1100, [1099, 37]),     # GQA, > 2 chunks of 512 slots, a short row
    (3, 3, 4, 1, 20, 600, [2, 511, 599]),   # MQA, several queries, D not a multiple of 8
    (2, 2, 4, 4, 8, 64, [1, 63]),           # MHA, a row that sees only slots 0..1 at t=0
]


@needs_kernels
@pytest.mark.parametrize("blas", ["openblas", "mkl"])
@pytest.mark.parametrize("b,t,h,hkv,d,s,last", DECODE_CASES)
def test_decode_attention_matches_numpy_and_xla_path(b, t, h, hkv, d, s, last, blas):
    """The native decode kernel reads only slots <= each query's position: the slots beyond
    hold NaN here, so any read of them (or of the wrong row / head) shows."""
    rng = np.random.default_rng(2)
    q = rand(rng, b, t, h, d)
    k, v = np.array(rand(rng, b, s, hkv, d)), np.array(rand(rng, b, s, hkv, d))
    pos = np.stack([np.arange(n - t + 1, n + 1) for n in last]).astype(np.int32)   # (B, T)
    want = numpy_decode_attention(q, k, v, pos)
    np.testing.assert_allclose(attn_dense.cached_attention(q, jnp.asarray(k), jnp.asarray(v),
                                                         jnp.asarray(pos)),
                               want, rtol=1e-5, atol=2e-6)
    for bi, n in enumerate(last):
        k[bi, n + 1:], v[bi, n + 1:] = np.nan, np.nan
    with _blas(blas):
        got = jax.jit(cpu.cached_attention)(q, jnp.asarray(k), jnp.asarray(v), jnp.asarray(pos))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)


@needs_kernels
def test_attention_grads_match_finite_differences():
    rng = np.random.default_rng(2)
    q, k, v = rand(rng, 1, 20, 2, 4), rand(rng, 1, 20, 1, 4), rand(rng, 1, 20, 1, 4)

    def f(q, k, v):
        return jnp.sum(jnp.sin(cpu.causal_attention(q, k, v, block_q=8)))

    jax.test_util.check_grads(f, (q, k, v), order=1, modes=["rev"], atol=2e-2, rtol=2e-2,
                              eps=1e-2)


@needs_kernels
@pytest.mark.parametrize("blas", ["openblas", "mkl"])
@pytest.mark.parametrize("scan", [pytest.param(False, marks=pytest.mark.slow), True])
def test_model_native_matches_xla(scan, blas):
    with _blas(blas):
        _model_native_matches_xla(scan)


def _model_native_matches_xla(scan):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      attn_block_q=8, scan_layers=scan, remat="full" if scan else "none")
    toks = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 24)), jnp.int32)
    xla_m = TransformerLM(cfg, ops=cpu_xla_ops())
    nat_m = TransformerLM(cfg, ops=cpu_kernels.native_ops())
    params = xla_m.init(jax.random.key(0), toks)["params"]
    assert jax.tree.structure(params) == jax.tree.structure(
        nat_m.init(jax.random.key(0), toks)["params"])           # same parameters

    def loss(model, p):
        logits = model.apply({"params": p}, toks)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

    (l_x, g_x), (l_n, g_n) = (jax.value_and_grad(lambda p, m=m: loss(m, p))(params)
                              for m in (xla_m, nat_m))
    np.testing.assert_allclose(l_n, l_x, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_n), jax.tree.leaves(g_x)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)


def test_kernel_library_builds_into_a_fresh_cache_once_for_every_blas(tmp_path):
    if not OK:
        pytest.skip(f"native kernels unavailable: {WHY}")
    kinds = [k for k in ("openblas", "mkl") if cpu.find_blas()[k]]
    code = ("from tfm_jax.platform.kernels import cpu; ok, d = cpu.available(); print(ok); "
            "print(cpu.library_path()); print(cpu.active_blas().kind); print(d)")
    libs = set()
    for kind in kinds:
        env = {**os.environ, "TFM_JAX_CACHE": str(tmp_path), "JAX_PLATFORMS": "cpu",
               "TFM_JAX_CPU_BLAS": kind, "PYTHONPATH": str(_ROOT)}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True).stdout.splitlines()
        assert out[0] == "True" and out[2] == kind, out
        assert pathlib.Path(out[1]).is_relative_to(tmp_path)
        libs.add(out[1])
    assert len(libs) == 1                  # the build does not depend on the BLAS
    files = [p.name for p in (tmp_path / "kernels").rglob("*")]
    assert files.count("libtfm_cpu_kernels.so") == 1
    assert not [f for f in files if f.startswith(".build.")]     # no half-written library left
    if shutil.which("readelf"):            # and links none
        dyn = subprocess.run(["readelf", "-d", libs.pop()], capture_output=True, text=True,
                             check=True).stdout
        needed = [ln for ln in dyn.splitlines() if "(NEEDED)" in ln]
        assert needed and not [ln for ln in needed if "blas" in ln.lower() or "mkl" in ln], needed


def test_blas_compare_smoke(tmp_path):
    """benchmarks/blas_compare.py checks every candidate's GEMMs against float64 numpy before
    timing them; in a subprocess because opening numpy's OpenBLAS sets numpy's threads to 1."""
    if not OK:
        pytest.skip(f"native kernels unavailable: {WHY}")
    out = tmp_path / "b.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(_ROOT)}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.blas_compare", "--iters", "1",
                           "--repeats", "1", "--train-steps", "0", "--no-torch", "--json",
                           str(out)], env=env, capture_output=True, text=True, cwd=_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    res = json.loads(out.read_text())
    assert DEFAULT_BLAS.kind in res["blas"] and res["default_blas"] == DEFAULT_BLAS.describe()
    assert len(res["gemm"]) == 6 * 3 + 1
    for r in res["gemm"]:
        assert set(r["gflops"]) == set(res["blas"])
        for kind, ms in r["ms"].items():
            assert r["gflops"][kind] == pytest.approx(2 * r["m"] * r["k"] * r["n"] / ms / 1e6)
    assert "GEMM GFLOP/s" in proc.stdout


@needs_kernels
def test_swiglu_matches_numpy_and_propagates_nan():
    rng = np.random.default_rng(3)
    g = np.asarray(rng.standard_normal((70, 33)) * 4, np.float32)
    g[0, :3] = [100.0, -100.0, 0.0]
    u, dh = (np.asarray(rng.standard_normal((70, 33)), np.float32) for _ in range(2))
    h, vjp = jax.vjp(cpu.swiglu, jnp.asarray(g), jnp.asarray(u))
    dg, du = vjp(jnp.asarray(dh))
    g64, u64, dh64 = (a.astype(np.float64) for a in (g, u, dh))
    s = 1.0 / (1.0 + np.exp(-g64))
    np.testing.assert_allclose(h, g64 * s * u64, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(du, dh64 * g64 * s, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(dg, dh64 * u64 * s * (1 + g64 * (1 - s)), rtol=2e-5, atol=1e-6)
    bad = cpu.swiglu(jnp.array([np.nan, 1.0], jnp.float32), jnp.array([1.0, np.nan], jnp.float32))
    assert np.isnan(np.asarray(bad)).all()


@needs_kernels
@pytest.mark.parametrize("n", [5, 300])
def test_rms_norm_matches_numpy(n):
    rng = np.random.default_rng(4)
    x = np.asarray(rng.standard_normal((n, 48)) * 3, np.float32)
    w = np.asarray(1 + 0.2 * rng.standard_normal(48), np.float32)
    dy = np.asarray(rng.standard_normal((n, 48)), np.float32)
    y, vjp = jax.vjp(lambda x, w: cpu.rms_norm(x, w, 1e-6), jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(dy))
    x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
    rstd = 1 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6)
    xh = x64 * rstd
    np.testing.assert_allclose(y, xh * w64, rtol=2e-6, atol=1e-6)
    ref_dx = rstd * (dy64 * w64 - xh * (dy64 * w64 * xh).mean(-1, keepdims=True))
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dw, (dy64 * xh).sum(0), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# The BLAS through ctypes, with cblas_sgemm's contract

ROW, NT_, T_ = 101, 111, 112
_I = ctypes.c_int
_SGEMM_T = ctypes.CFUNCTYPE(None, _I, _I, _I, _I, _I, _I, ctypes.c_float, ctypes.c_void_p, _I,
                            ctypes.c_void_p, _I, ctypes.c_float, ctypes.c_void_p, _I)


@needs_kernels
@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
def test_openblas_rows_do_not_depend_on_64_row_chunks(ta, tb):
    """Bitwise: rows computed in one sgemm call == the same rows computed in chunks of
    multiples of 64 rows, the chunking tfm_gemm uses over XLA's pool (cpu_kernels.cc), so a
    process with another pool size computes every row the same way (bitwise resume)."""
    fn = _SGEMM_T(_installed("openblas").sgemm)
    rng = np.random.default_rng(9)
    m, n, k = 300, 70, 600
    a = rng.standard_normal((k, m) if ta else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if tb else (k, n)).astype(np.float32)
    lda, ldb = a.shape[1], b.shape[1]
    whole = np.zeros((m, n), np.float32)
    fn(ROW, T_ if ta else NT_, T_ if tb else NT_, m, n, k, 1.0, a.ctypes.data, lda,
       b.ctypes.data, ldb, 0.0, whole.ctypes.data, n)
    np.testing.assert_allclose(whole, (a.T if ta else a).astype(np.float64)
                               @ (b.T if tb else b), rtol=1e-4, atol=1e-3)
    for cuts in ([0, 192, 300], [0, 64, 128, 192, 256, 300], [0, 128, 300]):
        parts = np.zeros((m, n), np.float32)
        for r0, r1 in zip(cuts[:-1], cuts[1:]):
            sub_a = a[:, r0:] if ta else a[r0:]
            fn(ROW, T_ if ta else NT_, T_ if tb else NT_, r1 - r0, n, k, 1.0,
               sub_a.ctypes.data, lda, b.ctypes.data, ldb, 0.0, parts[r0:].ctypes.data, n)
        np.testing.assert_array_equal(parts, whole)


def test_gemm_kernels_benchmark_smoke(tmp_path):
    """benchmarks/gemm_kernels.py: every candidate checked against float64 numpy before timing;
    the step totals are the count-weighted sums of the rows."""
    if not OK:
        pytest.skip(f"native kernels unavailable: {WHY}")
    out = tmp_path / "g.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(_ROOT)}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gemm_kernels", "--rounds", "1",
                           "--flops", "1e5", "--only", "attn", "--json", str(out)], env=env,
                          capture_output=True, text=True, cwd=_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    from benchmarks import gemm_kernels
    res = json.loads(out.read_text())
    assert set(res["blas"]) | set(res["missing"]) == {"openblas", "mkl"}
    assert len(res["calls"]) == 3 * 4 and {c["group"] for c in res["calls"]} == {"attn"}
    # 8 batches x 2 kv heads x 4 layers = 64 tasks: S/dP 3 calls each, the others 2
    assert sorted({c["count"] for c in res["calls"]}) == [128, 192]
    tot = gemm_kernels.step_totals(res)["attn"]
    for kind in res["blas"]:
        assert tot[kind] == pytest.approx(
            sum(c["best_us"][kind] * c["count"] for c in res["calls"]) / 1e3)
    assert "one step, attn, ms" in proc.stdout


def test_auto_order_by_cpu_vendor():
    # MKL first only on Intel, where it measured fastest; last elsewhere (slower on AMD Zen 4)
    assert cpu.auto_order("GenuineIntel") == ("mkl", "openblas")
    assert cpu.auto_order("AuthenticAMD") == ("openblas", "mkl")
    assert cpu.auto_order("") == ("openblas", "mkl")
    assert cpu.AUTO_ORDER == cpu.auto_order(cpu.cpu_vendor())
    assert sorted(cpu.AUTO_ORDER) == sorted(b for b in cpu.BLAS_CHOICES if b != "auto")
