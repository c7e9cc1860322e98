"""``init_from.via: hf`` (experiments/uptrain.yaml's chain): the source run goes out as a
Hugging Face folder (export-hf) and the conversion starts from the parameters read back from
it; convert.json and the run record say so, with the round trip's largest difference (0 for a
float32 export); the uptrained run starts where the checkpoint route starts."""

import json

import jax
import numpy as np
import yaml

from tfm_jax.ablate.runner import run_experiment
from tfm_jax.ablate.spec import EXPERIMENT_DIR, load_experiment


def test_uptraining_through_a_hugging_face_folder(tmp_path, text_corpus):
    raw = {**yaml.safe_load((EXPERIMENT_DIR / "smoke.yaml").read_text()),
           "out_dir": str(tmp_path / "out"), "seeds": [0], "claims": [], "plots": [],
           "measurements": ["params"]}
    raw["overrides"]["data.path"] = str(text_corpus)
    raw["variants"] = {
        "mha": {"model.n_kv_heads": 4},
        "up_ckpt": {"init_from": {"run": "mha", "convert": {"kv_heads": 2}},
                    "model.n_kv_heads": 2, "train.steps": 2},
        "up_hf": {"init_from": {"run": "mha", "via": "hf", "convert": {"kv_heads": 2}},
                  "model.n_kv_heads": 2, "train.steps": 2}}
    exp = load_experiment(tmp_path / "exp.yaml", raw)
    res = run_experiment(exp, devices=jax.devices()[:1], progress=False)
    runs = {r["variant"]: r for r in res.results["runs"]}
    assert all(r["status"] == "ok" for r in runs.values()), runs
    trip = runs["up_hf"]["hf_round_trip"]
    assert trip["via"] == "huggingface" and trip["max_abs_diff"] == 0.0
    folder = tmp_path / "out" / "up_hf" / "seed0-hf"
    assert trip["folder"] == str(folder.absolute())
    assert {"config.json", "model.safetensors"} <= {p.name for p in folder.iterdir()}
    info = json.loads((tmp_path / "out" / "up_hf" / "seed0" / "convert.json").read_text())
    assert info["params_from"] == trip and "hf_round_trip" not in runs["up_ckpt"]
    # both routes start from the same converted parameters: the same first evaluation
    init = {v: json.loads((tmp_path / "out" / v / "seed0" / "convert.json").read_text())["eval"]
            for v in ("up_ckpt", "up_hf")}
    np.testing.assert_allclose(init["up_hf"]["val_loss"], init["up_ckpt"]["val_loss"], rtol=1e-6)
    np.testing.assert_allclose(runs["up_hf"]["metrics"]["val_loss"],
                               runs["up_ckpt"]["metrics"]["val_loss"], rtol=1e-5)
