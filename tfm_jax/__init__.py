"""tfm-jax: a JAX/Flax research framework for Transformer LM components and their systems questions.

The Python API (:mod:`tfm_jax.api`): ``tfm_jax.load_run(run_dir)``, ``tfm_jax.import_hf(path)``,
``tfm_jax.train(config)``, each giving a :class:`~tfm_jax.tools.run.Run`. They are imported on
first use, so ``import tfm_jax`` (and the CLI's start-up) does not import jax.
"""

__version__ = "0.1.0"

_API = ("load_run", "import_hf", "Run")
__all__ = ["load_run", "import_hf", "train", "Run", "__version__"]


def __getattr__(name):
    import importlib

    if name in _API or name == "api":
        api = importlib.import_module("tfm_jax.api")
        return api if name == "api" else getattr(api, name)
    if name == "train":
        # The subpackage tfm_jax.train is callable: tfm_jax.train(config) is api.train (an
        # attribute lookup cannot tell the two apart once the subpackage is imported).
        return importlib.import_module("tfm_jax.train")
    raise AttributeError(f"module 'tfm_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
