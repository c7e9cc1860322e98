"""Native kernels (XLA FFI custom calls) that replace XLA-generated code where it is slow."""

from typing import Callable


def pick(kernels: str, xla_impl: Callable, native_name: str) -> Callable:
    """The implementation a module uses for its ``kernels`` setting: ``xla_impl`` for ``"xla"``,
    :mod:`tfm_jax.kernels.cpu`'s ``native_name`` (library built/loaded on first use) for
    ``"native"``."""
    if kernels == "xla":
        return xla_impl
    if kernels == "native":
        from tfm_jax.kernels import cpu
        cpu.load()
        return getattr(cpu, native_name)
    raise ValueError(f"kernels must be 'xla' or 'native', got {kernels!r}")
