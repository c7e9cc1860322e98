"""Hugging Face checkpoints in and out (Llama 2/3, Mistral, Qwen2); see docs/huggingface.md.

``read_hf(folder)`` -> :class:`HFModel` (config, params, tokenizer); ``import_hf(folder, out)``
writes a tfm-jax run directory; ``export_hf(run_dir, dst)`` writes a folder ``transformers``
loads. The ``config.json`` mapping lives in :mod:`tfm_jax.hf.mapping`.
"""

from tfm_jax.hf.checkpoint import (HFModel, SafetensorsFolder, config_from_hf, export_hf,
                                   import_hf, params_via_hf, read_hf, read_params)

__all__ = ["HFModel", "SafetensorsFolder", "config_from_hf", "export_hf", "import_hf",
           "params_via_hf", "read_hf", "read_params"]
