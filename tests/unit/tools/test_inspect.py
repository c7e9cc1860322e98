"""tfm-jax inspect (tfm_jax.tools.inspect): collectives parsed from optimized HLO, with count and bytes;
data parallelism shows all-reduces, the all_to_all MoE shows all-to-alls of the capacity
formula's bytes."""

import json
import math

from tfm_jax import cli
from tfm_jax.config import load_config
from tfm_jax.tools.inspect import COLLECTIVES, collectives, inspect_train_step

_HLO = """
%body.1 (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %ar = f32[4]{0} all-reduce(f32[4]{0} %x), replica_groups={{0,1}}, to_apply=%add
}
ENTRY %main (a: f32[8,16]) -> f32[8,16] {
  %a2a = f32[8,5,32]{2,1,0} all-to-all(f32[8,5,32]{2,1,0} %b), dimensions={0}
  %ags = (bf16[2,3]{1,0}, bf16[4,3]{1,0}) all-gather-start(bf16[2,3]{1,0} %c), dimensions={0}
  %agd = bf16[4,3]{1,0} all-gather-done((bf16[2,3]{1,0}, bf16[4,3]{1,0}) %ags)
  %w = (s32[], f32[4]) while((s32[], f32[4]) %t), condition=%cond.1, body=%body.1
}
"""


def test_collectives_parser():
    c = collectives(_HLO)
    assert set(c) == set(COLLECTIVES)
    assert c["all-to-all"] == {"count": 1, "bytes": 8 * 5 * 32 * 4, "in_loop": 0}
    assert c["all-gather"] == {"count": 1, "bytes": 4 * 3 * 2, "in_loop": 0}   # -done not counted
    assert c["all-reduce"] == {"count": 1, "bytes": 16, "in_loop": 1}
    assert c["reduce-scatter"]["count"] == 0


_SMALL = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1",
          "model.ffn_hidden=32", "data.seq_len=16", "train.batch_size=8"]


def test_inspect_data_parallel_dense(devices):
    rep = inspect_train_step(load_config(None, _SMALL), devices)
    c = rep["collectives"]
    assert rep["mesh"]["data"] == 8
    assert c["all-reduce"]["count"] >= 1 and c["all-reduce"]["bytes"] > 0   # gradient reduce
    assert c["all-to-all"]["count"] == 0
    assert rep["params"]["total"] > 0 and rep["flops_per_token"] > 0
    assert rep["memory"]["argument_bytes"] is None or rep["memory"]["argument_bytes"] > 0


def test_inspect_moe_all_to_all_bytes_match_capacity(devices, capsys):
    """moe-tiny (data 2 x expert 4), 8 experts, top-2: per MoE layer two all-to-alls forward and
    two backward, each an (E, C, d) float32 buffer per device, C = ceil(1.25 * N * 2 / 8)."""
    assert cli.main(["inspect", "--config", "moe-tiny", *_SMALL, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    e, d, n_tok = 8, 32, (8 // 8) * 16                    # tokens per group (one per device)
    cap = math.ceil(1.25 * n_tok * 2 / e)
    a2a = rep["collectives"]["all-to-all"]
    assert a2a["count"] == 4
    assert a2a["bytes"] == 4 * e * cap * d * 4
    assert rep["params"]["active"] < rep["params"]["total"]
