"""Hugging Face model folders in and out: :func:`read_hf`, :func:`import_hf`, :func:`export_hf`.

Reading streams the safetensors files one tensor at a time (``safe_open``, numpy): each tensor's
shape is checked against the model from its header before its data is read, transposed into this
framework's layout (:func:`tfm_jax.hf.mapping.tensor_table`) and cast to the parameter dtype, so
the peak memory is one copy of the parameters plus one tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import struct
from typing import Any, Callable, Iterator, Optional

import numpy as np

from tfm_jax.config import Config, ConfigError, load_config
from tfm_jax.config.schema import safe_run_name
from tfm_jax.core import rundir
from tfm_jax.core.errors import CheckpointMismatch, DataError
from tfm_jax.hf import mapping

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json")
# tensors a HF checkpoint may hold that carry no parameter (recomputed buffers)
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclasses.dataclass
class HFModel:
    """A Hugging Face model read into this framework: its ``config`` (``model.*`` from
    ``config.json``, ``data.tokenizer`` the folder when it holds a tokenizer, else ``none``),
    ``params`` (the unscanned :class:`~tfm_jax.model.TransformerLM` params tree, numpy) and
    ``tokenizer`` (or None)."""
    config: Config
    params: dict
    tokenizer: Any
    source: pathlib.Path


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


# -- reading safetensors -------------------------------------------------------------------------

class SafetensorsFolder:
    """The tensors of a HF folder (``model.safetensors``, or the shards an
    ``model.safetensors.index.json`` names), read one at a time."""

    def __init__(self, folder: pathlib.Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise DataError(f"{index}: not a safetensors index ({err})") from None
            self.files = {name: folder / f for name, f in weight_map.items()}
            missing = sorted({str(p) for p in self.files.values() if not p.is_file()})
            if missing:
                raise DataError(f"{index} names shard(s) that are not there: "
                                + ", ".join(missing))
        elif single.is_file():
            self.files = {name: single for name in self._names(single)}
        else:
            other = sorted(p.name for p in folder.glob("*.bin"))
            raise DataError(f"{folder}: no model.safetensors nor model.safetensors.index.json"
                            + (f" (only {', '.join(other)}: save it with safetensors, e.g. "
                               "save_pretrained(safe_serialization=True))" if other else ""))
        self._headers: dict[pathlib.Path, dict] = {}

    @staticmethod
    def _names(path: pathlib.Path) -> list[str]:
        return [k for k in _header(path) if k != "__metadata__"]

    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        meta = self._meta(self.files[name]).get(name)
        return tuple(meta["shape"]) if meta else ()

    def _meta(self, path: pathlib.Path) -> dict:
        if path not in self._headers:
            self._headers[path] = _header(path)
        return self._headers[path]

    def get(self, name: str) -> np.ndarray:
        """One tensor, read through its own ``safe_open`` handle: the file's memory map is
        released when the tensor has been copied out, so mapped pages of tensors already read
        do not stay resident (the peak stays one copy of the parameters plus one tensor)."""
        from safetensors import safe_open

        path = self.files[name]
        try:
            with safe_open(str(path), framework="numpy") as f:
                return f.get_tensor(name)
        except Exception:   # noqa: BLE001 - older safetensors: no bf16 in numpy -> raw bytes
            return _raw_tensor(path, name)

    def close(self) -> None:
        self._headers.clear()


def _header(path: pathlib.Path) -> dict:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            return json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as err:
        raise DataError(f"{path}: not a readable safetensors file ({err})") from None


_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _raw_tensor(path: pathlib.Path, name: str) -> np.ndarray:
    """One tensor from the file's bytes (safetensors: 8-byte header size, JSON header, data)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n))[name]
        begin, end = meta["data_offsets"]
        f.seek(8 + n + begin)
        raw = f.read(end - begin)
    if meta["dtype"] not in _ST_DTYPES:
        raise DataError(f"{path}: tensor {name} has dtype {meta['dtype']}; floating point "
                        "weights expected")
    return np.frombuffer(raw, _np_dtype(_ST_DTYPES[meta["dtype"]])).reshape(meta["shape"])


# -- config -------------------------------------------------------------------------------------

def _model_folder(src: str | os.PathLike) -> tuple[pathlib.Path, dict]:
    src = pathlib.Path(src).expanduser()
    cfg_file = src / "config.json"
    if not src.is_dir() or not cfg_file.is_file():
        raise DataError(f"{src}: not a Hugging Face model folder (needs config.json and "
                        "model.safetensors or a sharded index)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as err:
        raise DataError(f"{cfg_file}: not valid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise DataError(f"{cfg_file}: not a model config (a JSON object expected)")
    return src, cfg


def _has_tokenizer(src: pathlib.Path) -> bool:
    return (src / "tokenizer.json").is_file() or (src / "tokenizer.model").is_file()


def config_from_hf(src: str | os.PathLike, *, param_dtype: Optional[str] = None,
                   base: Optional[Config] = None) -> Config:
    """The run config of a HF folder: ``base`` (default the default config) with ``model.*``
    from ``config.json`` and ``data.tokenizer`` the folder (when it holds a tokenizer)."""
    src, hf = _model_folder(src)
    over = mapping.model_overrides(hf)
    over.update({"model.param_dtype": param_dtype or "float32", "model.dtype": "float32",
                 "model.scan_layers": False, "model.master_weights": "auto",
                 "data.tokenizer": str(src.absolute()) if _has_tokenizer(src) else "none",
                 "run.name": safe_run_name(src.name or "hf")})
    base = base if base is not None else load_config()
    return base.replace(**over)


# -- params -------------------------------------------------------------------------------------

def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def read_params(src: str | os.PathLike, cfg: Config) -> dict:
    """The unscanned params tree of ``cfg.model`` from the folder's safetensors, streamed; a
    missing, mis-shaped or unexpected tensor raises :class:`CheckpointMismatch` naming it."""
    src = pathlib.Path(src).expanduser()
    store = SafetensorsFolder(src)
    dtype = _np_dtype(cfg.model.param_dtype)
    table = mapping.tensor_table(cfg.model)
    wanted = {row[1] for row in table}
    extra = [n for n in store.names() if n not in wanted and not n.endswith(_IGNORED_SUFFIXES)
             and not (cfg.model.tie_embeddings and n == "lm_head.weight")]
    if extra:
        raise CheckpointMismatch(f"{src}: tensor {extra[0]} has no place in the model config.json"
                                 f" describes ({len(extra)} such tensor(s))")
    params: dict = {}
    try:
        for path, name, to_tfm, _, shape in table:
            if name not in store.files:
                raise CheckpointMismatch(f"{src}: tensor {name} is missing (expected shape "
                                         f"{shape}, from config.json)")
            have = store.shape(name)
            if have != shape:
                raise CheckpointMismatch(f"{src}: tensor {name} has shape {have}, config.json "
                                         f"implies {shape}")
            a = store.get(name)
            if not np.issubdtype(a.dtype, np.floating) and a.dtype != _np_dtype("bfloat16"):
                raise CheckpointMismatch(f"{src}: tensor {name} has dtype {a.dtype}; floating "
                                         "point weights expected")
            # to_tfm is a view (transpose + axis split): one copy, into the target dtype
            _set(params, path, np.ascontiguousarray(to_tfm(a), dtype=dtype))
            del a
    finally:
        store.close()
    return params


def read_hf(src: str | os.PathLike, *, param_dtype: Optional[str] = None) -> HFModel:
    """Read a local Hugging Face model folder (Llama / Mistral / Qwen2): config, params
    (streamed; numpy, ``param_dtype`` default float32) and tokenizer. Raises ``ConfigError``
    naming a config.json field it cannot represent, ``CheckpointMismatch`` naming a missing or
    mis-shaped tensor, ``DataError`` for a folder that is not a model."""
    from tfm_jax.data.tokenizer import load_tokenizer

    cfg = config_from_hf(src, param_dtype=param_dtype)
    src = pathlib.Path(src).expanduser()
    params = read_params(src, cfg)
    tok = load_tokenizer(src) if _has_tokenizer(src) else None
    return HFModel(cfg, params, tok, src)


# -- run directories ----------------------------------------------------------------------------

def _check_tree(params: Any, abstract: Any, what: str) -> None:
    import jax
    want = {jax.tree_util.keystr(p): (tuple(x.shape), np.dtype(x.dtype))
            for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    have = {jax.tree_util.keystr(p): (tuple(x.shape), np.dtype(x.dtype))
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    for k in sorted(set(want) | set(have)):
        if want.get(k) != have.get(k):
            raise CheckpointMismatch(f"{what}: parameter {k}: have {have.get(k)}, the model "
                                     f"wants {want.get(k)}")


def write_fresh_run(cfg: Config, model: HFModel, info: dict, info_name: str,
                    devices: Optional[list] = None) -> pathlib.Path:
    """A run directory at ``cfg.run_dir``: config.yaml, the tokenizer copy, a parameters-only
    orbax checkpoint at step 0 holding ``model.params`` (no optimizer state: a run that trains
    from it builds a fresh one, :meth:`tfm_jax.train.setup.Setup.restore`), and ``info_name``
    (provenance). No optimizer state is allocated, so the peak stays near one copy of the
    parameters: ``model.params`` moves to the devices a leaf at a time and is dropped from
    ``model``."""
    import jax

    from tfm_jax.data import tokenizer as tokenizer_lib
    from tfm_jax.platform import backends
    from tfm_jax.train import TrainState, build
    from tfm_jax.train.checkpoint import Checkpointer

    out = cfg.run_dir
    rundir.claim_output_dir(out, "--out")
    if (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
        raise FileExistsError(f"--out {out} already holds checkpoints; choose another directory")
    backends.configure(cfg.backend)
    setup = build(cfg, devices)
    abstract = setup.abstract_state()
    _check_tree(model.params, abstract.params, "import")
    model_state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract.model_state)
    # one leaf at a time onto the devices, each numpy leaf dropped once copied (orbax writes
    # device arrays without a host copy on CPU; numpy leaves it would copy twice)
    flat, treedef = jax.tree.flatten(model.params)
    model.params = None
    for i, sh in enumerate(jax.tree.leaves(setup.state_shardings.params)):
        flat[i] = jax.block_until_ready(jax.device_put(flat[i], sh))
    state = TrainState(np.zeros((), np.int32), jax.tree.unflatten(treedef, flat), model_state,
                       None)
    del flat
    out.mkdir(parents=True, exist_ok=True)
    rundir.atomic_write(out / "config.yaml", cfg.to_yaml())
    if model.tokenizer is not None:
        tokenizer_lib.copy_into(model.tokenizer, out)
    ckpt = Checkpointer(out / "checkpoints", keep=cfg.train.keep_checkpoints, async_save=False)
    try:
        ckpt.save(0, state, optimizer=False)
        ckpt.wait()
    finally:
        ckpt.close()
    del state
    rundir.atomic_write(out / info_name, json.dumps(info, indent=2) + "\n")
    return out


def import_hf(src: str | os.PathLike, out_run_dir: str | os.PathLike, *,
              param_dtype: Optional[str] = None, devices: Optional[list] = None) -> pathlib.Path:
    """A HF model folder -> a tfm-jax run directory (config.yaml, a parameters-only checkpoint
    at step 0, the tokenizer) that ``tfm-jax eval / generate / convert / train
    --resume`` and ``train --init-from`` accept."""
    out = pathlib.Path(out_run_dir)
    rundir.claim_output_dir(out, "--out")                      # before reading anything big
    m = read_hf(src, param_dtype=param_dtype)
    cfg = m.config.replace(**{"run.dir": str(out), "run.name": safe_run_name(out.name or "hf")})
    if m.tokenizer is None:
        cfg = cfg.replace(**{"data.tokenizer": "none"})
    info = {"source": str(m.source.absolute()), "format": "huggingface",
            "architectures": json.loads((m.source / "config.json").read_text()).get(
                "architectures"), "checkpoint_step": 0,
            "optimizer_state": "none (built fresh when the run trains)"}
    m.config = cfg
    return write_fresh_run(cfg, m, info, "import_hf.json", devices)


# -- export -------------------------------------------------------------------------------------

def _unscanned(params: dict, n_layers: int) -> dict:
    if "layers" not in params:
        return params
    import jax
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(n_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda a, i=i: np.asarray(a)[i], params["layers"])
    return out


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def hf_tensors(params: dict, cfg: Config, dtype: str) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array in ``dtype``) of each parameter of an unboxed params tree."""
    params = _unscanned(params, cfg.model.n_layers)
    np_dtype = _np_dtype(dtype)
    for path, name, _, to_hf, shape in mapping.tensor_table(cfg.model):
        a = to_hf(np.asarray(_get(params, path)))
        assert a.shape == shape, (name, a.shape, shape)
        yield name, np.ascontiguousarray(a.astype(np_dtype))


def export_hf(run_dir: str | os.PathLike, dst: str | os.PathLike, *, step: Optional[int] = None,
              dtype: Optional[str] = None, say=print) -> pathlib.Path:
    """A run's checkpoint (latest, or ``step``) -> a HF folder ``dst``: config.json (Llama, or
    Qwen2 with q/k/v biases), model.safetensors (``dtype``: default the run's param_dtype) and
    the tokenizer files when the run has a HF or sentencepiece tokenizer."""
    import jax
    from flax import linen as nn

    from tfm_jax.data.tokenizer import ByteTokenizer, run_tokenizer
    from tfm_jax.platform import backends
    from tfm_jax.tools.convert import load_run_config
    from tfm_jax.train import build
    from tfm_jax.train.checkpoint import Checkpointer

    run_dir, dst = pathlib.Path(run_dir), pathlib.Path(dst)
    cfg = load_run_config(run_dir)
    mapping.check_exportable(cfg.model, cfg.quant, cfg.moe)
    dtype = dtype or cfg.model.param_dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"export-hf: --dtype {dtype}: choose float32, bfloat16 or float16")
    if dst.resolve() == run_dir.resolve():
        raise ConfigError(f"export-hf: --out {dst} is the run itself; choose a new folder")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise rundir.RunDirError(f"export-hf: --out {dst}: exists and is not an empty folder; "
                                 "choose a new or empty directory")
    rundir.check_run_dir(run_dir)
    backends.configure(cfg.backend)
    setup = build(cfg)
    ckpt = Checkpointer(run_dir / "checkpoints", async_save=False)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"export-hf: {run_dir} has no checkpoint to export")
        state = setup.restore(ckpt, step=step, optimizer=False)
    finally:
        ckpt.close()
    params = jax.device_get(nn.meta.unbox(state.params))
    del state
    tok = run_tokenizer(run_dir, cfg.data.tokenizer) if cfg.data.tokenizer != "none" else None
    ids = {}
    if tok is not None and not isinstance(tok, ByteTokenizer):
        ids = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}
    hf_cfg = mapping.hf_config(cfg.model, seq_len=cfg.data.seq_len, dtype=dtype, **ids)

    from safetensors.numpy import save_file
    dst.mkdir(parents=True, exist_ok=True)
    tensors = dict(hf_tensors(params, cfg, dtype))
    tmp = dst / ".model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, dst / "model.safetensors")
    rundir.atomic_write(dst / "config.json", json.dumps(hf_cfg, indent=2) + "\n")
    if tok is None or isinstance(tok, ByteTokenizer):
        say(f"export-hf: the run uses the {'byte' if tok is not None else 'caller-fed (none)'} "
            "tokenizer, which has no Hugging Face form: no tokenizer files written")
    else:
        src = run_dir / "tokenizer"
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                rundir.atomic_write(dst / name, (src / name).read_bytes())
    return dst


def params_via_hf(folder: str | os.PathLike) -> Callable[[Config, Any], tuple[Any, dict]]:
    """For ``convert_run(params_from=...)``: the run's parameters read back from ``folder`` (a
    ``export_hf`` of that run) as :func:`read_params` reads them, in the layout (and partition
    boxes) of the restored ones, with the largest absolute difference from them (0 for a
    float32 export)."""
    def read(cfg: Config, like: Any) -> tuple[Any, dict]:
        import jax

        flat, treedef = jax.tree.flatten(like)
        got = jax.tree.leaves(read_params(folder, cfg))
        if [np.shape(a) for a in got] != [np.shape(a) for a in flat]:
            raise CheckpointMismatch(f"{folder}: its parameters do not have the run's layout "
                                     "(model.scan_layers runs are exported unscanned)")
        diff = max(float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(a, np.float64))))
                   for g, a in zip(got, flat))
        params = jax.tree.unflatten(treedef, [np.asarray(g).astype(np.asarray(a).dtype)
                                              for g, a in zip(got, flat)])
        return params, {"via": "huggingface", "folder": str(pathlib.Path(folder).absolute()),
                        "max_abs_diff": diff}

    return read
