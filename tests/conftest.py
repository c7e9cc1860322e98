"""Test set-up: 8 fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

# The study scripts live in the repository's experiments/ folder, outside the package.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402
import pytest  # noqa: E402

# One persistent compilation cache for the whole test session (a fresh directory per session,
# so nothing carries over between runs): many tests compile the same small programs through
# different jitted functions, and XLA compilation is most of the suite's time on 2 cores.
# Executables from the cache are the same compiled code (bitwise tests are unaffected).
# TFM_JAX_TEST_COMPILE_CACHE=0 turns it off.
if os.environ.get("TFM_JAX_TEST_COMPILE_CACHE", "1") != "0":
    jax.config.update("jax_compilation_cache_dir",
                      tempfile.mkdtemp(prefix="tfm-jax-test-xla-cache."))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    if devs[0].platform != "cpu":    # e.g. the device check's GPU subset (JAX_PLATFORMS=cuda)
        pytest.skip(f"needs the 8 fake CPU devices; running on {devs[0].platform}")
    assert len(devs) == 8, "tests expect 8 fake CPU devices (XLA_FLAGS set in conftest)"
    return devs


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory):
    """A small deterministic text file (~100 KB), so CLI/ablation runs do not depend on the
    stdlib corpus."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("".join(f"def f{i}(x, y={i % 7}):\n    return x * y + {i}\n\n"
                            for i in range(2500)))
    return path


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need jax to see a GPU; elsewhere they are skipped with that reason."""
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason=f"needs a GPU (marker gpu); jax's backend is "
                                   f"{jax.default_backend()}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
