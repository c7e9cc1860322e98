"""``tfm_jax.import_hf``: a small random Llama saved by ``transformers`` in the test's folder opens
as a Run whose logits, greedy completions and evaluation agree with transformers (float32).
Skipped until the Hugging Face reader (``tfm_jax.hf``) is present."""

from __future__ import annotations

import math

import numpy as np
import pytest

import tfm_jax

pytest.importorskip("tfm_jax.hf", reason="tfm_jax.import_hf needs the Hugging Face reader "
                    "(tfm_jax.hf)")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["def f(x):\n    return x * 2\n"] * 50 + ["hello world"] * 50,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=[
                                "<unk>", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out)
    cfg = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=fast.bos_token_id,
                                   eos_token_id=fast.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out, safe_serialization=True)
    return out, model


def test_import_hf_logits_equal_transformers(hf_folder):
    folder, model = hf_folder
    run = tfm_jax.import_hf(folder)
    assert isinstance(run, tfm_jax.Run)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(2, 12))
    with torch.no_grad():
        ref = model(torch.as_tensor(ids)).logits.numpy()
    got = run.logits(ids)[..., :model.config.vocab_size]
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_import_hf_greedy_and_evaluate(hf_folder, tmp_path):
    folder, model = hf_folder
    run = tfm_jax.import_hf(folder)
    prompt = [run.tokenizer.eos_id, *run.encode("def f(")]
    with torch.no_grad():
        out = model.generate(torch.as_tensor([prompt]), max_new_tokens=5, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert run.generate([prompt], max_new_tokens=5) == [run.decode(out)]
    text = tmp_path / "eval.txt"
    text.write_text("def f(x):\n    return x * 2\n" * 400)     # > 16 rows of 128 tokens
    res = run.evaluate(text, batches=1)
    assert res["loss"] > 0 and res["perplexity"] == pytest.approx(math.exp(res["loss"]))
