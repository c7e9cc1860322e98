"""Hugging Face checkpoints against transformers itself: tiny random LlamaForCausalLM (llama3
RoPE scaling, sharded), Qwen2ForCausalLM (q/k/v biases, tied) and MistralForCausalLM saved with
save_pretrained here; imported logits equal transformers' (fp32, max abs <= 1e-4); export-hf of
an imported run and of a tfm-jax-trained run reload in transformers with the same logits; a bf16
save imports; GQA uptraining end to end: import -> eval/generate -> convert -> train --init-from
-> export-hf -> transformers. Skipped without torch/transformers (the [torch] and [dev] extras)."""

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs torch (the [torch] extra)")
transformers = pytest.importorskip("transformers", reason="needs transformers ([dev] extra)")

from tfm_jax import cli  # noqa: E402
from tfm_jax.config import load_config  # noqa: E402

VOCAB = 320
TOL = 1e-4
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
TRAIN = ["train.batch_size=8", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=2",
         "train.checkpoint_every=2", "train.eval_batches=1", "train.sample_tokens=0",
         "run.tensorboard=false", "run.progress=false", "data.seq_len=32", "train.lr=1e-3"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf_data")
    path = tmp / "corpus.txt"
    path.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n"
                            for i in range(1500)))
    from tfm_jax.data import tokenizer_train
    tok = tmp / "tok"
    tokenizer_train.train_from_config(
        load_config(None, [f"data.path={path}", f"data.cache_dir={tmp / 'cache'}"]).data,
        300, str(tok))
    return path, tok


def _hf_model(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**COMMON, num_key_value_heads=2, rope_theta=500000.0,
                                       rope_scaling=dict(LLAMA3_ROPE))
        m = transformers.LlamaForCausalLM(cfg)
    elif kind == "llama-mha":
        cfg = transformers.LlamaConfig(**COMMON, num_key_value_heads=4, rope_theta=10000.0,
                                       rope_scaling=dict(LLAMA3_ROPE))
        m = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**COMMON, num_key_value_heads=2, tie_word_embeddings=True,
                                       use_sliding_window=False)
        m = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.MistralConfig(**COMMON, num_key_value_heads=1, sliding_window=None)
        m = transformers.MistralForCausalLM(cfg)
    with torch.no_grad():   # non-trivial norms and biases (HF initializes them to 1 and 0)
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return m.eval()


def _save(m, folder, tok=None, **kw):
    m.save_pretrained(str(folder), **kw)
    if tok is not None:
        for f in tok.iterdir():
            shutil.copy(f, folder / f.name)
    return folder


def _ids(seed=0, t=40):
    return np.random.default_rng(seed).integers(0, VOCAB, (2, t))


def _torch_logits(m, ids):
    with torch.no_grad():
        return m(torch.tensor(ids)).logits.float().numpy()


def _tfm_logits_params(model_cfg, params, ids):
    import jax.numpy as jnp

    from tfm_jax.model import TransformerLM
    return np.asarray(TransformerLM(model_cfg).apply({"params": params},
                                                     jnp.asarray(ids, jnp.int32), train=False))


def _run_logits(run_dir, ids):
    import jax
    from flax import linen as nn

    from tfm_jax.tools.convert import load_run_config
    from tfm_jax.train import build
    from tfm_jax.train.checkpoint import Checkpointer

    cfg = load_run_config(run_dir)
    setup = build(cfg, jax.devices()[:1])
    ck = Checkpointer(run_dir / "checkpoints", read_only=True)
    try:
        state = ck.restore(setup.abstract_state())
    finally:
        ck.close()
    params = jax.device_get(nn.meta.unbox(state.params))
    return _tfm_logits_params(cfg.model, params, ids), cfg


def _max_diff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# ----------------------------------------------------------------------------- import


@pytest.mark.parametrize("kind, shard", [("llama", "60KB"), ("qwen2", None), ("mistral", None)])
def test_imported_logits_equal_transformers(tmp_path, kind, shard):
    from tfm_jax.hf import read_hf

    m = _hf_model(kind)
    src = _save(m, tmp_path / kind, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (src / "model.safetensors.index.json").is_file()
        assert len(list(src.glob("model-*.safetensors"))) > 1
    h = read_hf(src)
    ids = _ids()
    d = _max_diff(_tfm_logits_params(h.config.model, h.params, ids), _torch_logits(m, ids))
    assert d <= TOL, d
    if kind == "llama":   # positions past original_max_position_embeddings: the rule matters
        assert h.config.model.rope_scaling is not None
        plain = h.config.replace(**{"model.rope_scaling": None})
        assert _max_diff(_tfm_logits_params(plain.model, h.params, ids),
                         _torch_logits(m, ids)) > 20 * TOL


def test_bf16_checkpoint_imports(tmp_path):
    from tfm_jax.hf import read_hf

    m = _hf_model("qwen2").to(torch.bfloat16)
    src = _save(m, tmp_path / "bf16")
    h = read_hf(src)
    assert h.params["embed"]["embedding"].dtype == np.float32
    m32 = m.float()               # the same (bf16-representable) weights in float32
    ids = _ids(1)
    d = _max_diff(_tfm_logits_params(h.config.model, h.params, ids), _torch_logits(m32, ids))
    assert d <= TOL, d


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_import_then_export_reloads_in_transformers(tmp_path, corpus, kind, capsys):
    _, tok = corpus
    m = _hf_model(kind, seed=3)
    src = _save(m, tmp_path / "src", tok)
    run, out = tmp_path / "run", tmp_path / "out"
    assert cli.main(["import-hf", str(src), "--out", str(run)]) == 0
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    assert cli.main(["export-hf", "--run-dir", str(run), "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [type(m).__name__ if kind == "qwen2"
                                    else "LlamaForCausalLM"]
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = _ids(2)
    d = _max_diff(_torch_logits(back, ids), _torch_logits(m, ids))
    assert d <= TOL, d
    if kind == "llama":   # (transformers 5 gives a qwen2 folder its own Qwen2Tokenizer class,
        # which re-splits digits whatever tokenizer.json says; the file itself is the run's)
        t = transformers.AutoTokenizer.from_pretrained(str(out))
        text = "def f12(x):\n    return x"
        from tfm_jax.data.tokenizer import load_tokenizer
        assert list(t(text, add_special_tokens=False)["input_ids"]) == \
            load_tokenizer(tok).encode(text).tolist()
    assert (out / "tokenizer.json").read_bytes() == (run / "tokenizer" / "tokenizer.json"
                                                     ).read_bytes()
    # a second export into the same folder is refused in one line, nothing overwritten
    capsys.readouterr()
    assert cli.main(["export-hf", "--run-dir", str(run), "--out", str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err


def test_trained_run_exports_with_equal_logits(tmp_path, corpus, capsys):
    import jax

    from tfm_jax.train import train

    path, tok = corpus
    cfg = load_config(None, TRAIN + [
        f"data.path={path}", f"data.tokenizer={tok}", "model.vocab_size=auto",
        "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.qkv_bias=true", "model.tie_embeddings=true", "model.norm_eps=1e-5",
        "model.rope_scaling={type: llama3, factor: 4.0, original_max_position_embeddings: 8}",
        "train.steps=2", f"run.dir={tmp_path / 'run'}"])
    train(cfg, devices=jax.devices()[:1])
    out = tmp_path / "hf"
    assert cli.main(["export-hf", "--run-dir", str(tmp_path / "run"), "--out", str(out)]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(back).__name__ == "Qwen2ForCausalLM"
    ids = np.random.default_rng(4).integers(0, cfg.model.vocab_size, (2, 32))
    mine, _ = _run_logits(tmp_path / "run", ids)
    d = _max_diff(_torch_logits(back, ids), mine)
    assert d <= TOL, d
    # bfloat16 export: the tensors are the bf16 roundings of the run's
    out16 = tmp_path / "hf16"
    assert cli.main(["export-hf", "--run-dir", str(tmp_path / "run"), "--out", str(out16),
                     "--dtype", "bfloat16"]) == 0
    b16 = transformers.AutoModelForCausalLM.from_pretrained(str(out16), dtype=torch.bfloat16)
    w = dict(b16.named_parameters())["model.embed_tokens.weight"]
    assert w.dtype == torch.bfloat16
    np.testing.assert_array_equal(
        w.float().detach().numpy(),
        dict(back.named_parameters())["model.embed_tokens.weight"].detach().bfloat16()
        .float().numpy())


def test_gqa_uptraining_end_to_end(tmp_path, corpus, capsys):
    path, tok = corpus
    m = _hf_model("llama-mha", seed=5)
    src = _save(m, tmp_path / "mha", tok)
    imp, conv, ft, out = (tmp_path / n for n in ("imp", "kv2", "ft", "hf"))
    data = [f"data.path={path}", "data.seq_len=32"]
    assert cli.main(["import-hf", str(src), "--out", str(imp)]) == 0
    assert cli.main(["eval", "--run-dir", str(imp), *data, "train.eval_batches=1",
                     "train.batch_size=8"]) == 0
    assert cli.main(["generate", "--run-dir", str(imp), "--prompt", "def f",
                     "--tokens", "4"]) == 0
    # the imported checkpoint holds parameters only; a copy of the run trains on from it
    shutil.copytree(imp, tmp_path / "imp-train")
    capsys.readouterr()
    assert cli.main(["train", "--config", str(tmp_path / "imp-train" / "config.yaml"),
                     "--resume", f"run.dir={tmp_path / 'imp-train'}", *TRAIN, *data,
                     "train.steps=2"]) == 0
    out_err = capsys.readouterr()
    assert "holds parameters only" in out_err.out + out_err.err
    assert (tmp_path / "imp-train" / "checkpoints" / "2").is_dir()
    assert cli.main(["convert", "--run-dir", str(imp), "--kv-heads", "2", "--out", str(conv),
                     "--steps", "2", "--no-eval"]) == 0
    capsys.readouterr()
    # a model that does not fit the source: one line naming the field
    assert cli.main(["train", "--init-from", str(conv), f"run.dir={tmp_path / 'bad'}",
                     "model.n_kv_heads=1", *TRAIN, *data]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.n_kv_heads=1 but the source run has 2" in err and "\n" not in err
    assert cli.main(["train", "--init-from", str(conv), f"run.dir={ft}", "train.steps=2",
                     *TRAIN, *data]) == 0
    assert "parameters from" in capsys.readouterr().out
    assert cli.main(["export-hf", "--run-dir", str(ft), "--out", str(out)]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert back.config.num_key_value_heads == 2
    ids = _ids(6, 32)
    mine, cfg = _run_logits(ft, ids)
    assert cfg.model.n_kv_heads == 2 and cfg.model.rope_scaling is not None
    d = _max_diff(_torch_logits(back, ids), mine)
    assert d <= TOL, d
    # the fine-tuned run started from the converted parameters: its first step's loss is the
    # converted model's, far below a fresh model's ln(V)
    rows = [json.loads(x) for x in (ft / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "loss" in r)
    assert first["loss"] < np.log(VOCAB) + 1.0
