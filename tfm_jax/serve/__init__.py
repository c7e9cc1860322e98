"""Serving: continuous batching over a paged KV cache (:mod:`tfm_jax.serve.scheduler`; the pages
themselves are :mod:`tfm_jax.layers.paged_cache`)."""

from tfm_jax.serve.scheduler import Request, SamplingParams, Scheduler, sample

__all__ = ["Request", "SamplingParams", "Scheduler", "sample"]
