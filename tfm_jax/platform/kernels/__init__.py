"""Native kernels (XLA FFI custom calls) that replace XLA-generated code where it is slow.

Layers do not import this package: :func:`tfm_jax.platform.kernels.cpu.native_ops` wraps
:mod:`tfm_jax.platform.kernels.cpu` into the ops seam, and :func:`tfm_jax.platform.backends.resolve_ops` decides when
a run uses it.
"""
