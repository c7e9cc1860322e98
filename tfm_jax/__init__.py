"""tfm-jax: a JAX/Flax research framework for Transformer LM components and their systems questions."""

__version__ = "0.1.0"
