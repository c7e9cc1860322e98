"""Tests for tfm_jax.config: shipped configs, overrides, and that every validation failure is ONE
clear ConfigError line naming the dotted key, the offending value and what is allowed."""

import pathlib

import pydantic
import pytest

from tfm_jax.config import (CONFIG_DIR, Config, ConfigError, check_runtime, load_config,
                            parse_overrides, resolve_config_path, validate)


def _err(overrides=(), path=None) -> str:
    """The message of the ConfigError that loading ``path`` + ``overrides`` must raise."""
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


def _problems(msg: str) -> list[str]:
    """The problem lines of a validation message ('invalid config:' header stripped)."""
    lines = msg.splitlines()
    assert lines[0] == "invalid config:", msg
    return [line.strip() for line in lines[1:]]


def _one_problem(overrides=(), path=None) -> str:
    problems = _problems(_err(overrides, path))
    assert len(problems) == 1, problems
    return problems[0]


# ----------------------------------------------------------------------------- shipped configs


def test_default_is_tiny():
    cfg = load_config(None)
    assert resolve_config_path(None) == CONFIG_DIR / "tiny.yaml"
    assert cfg == load_config(str(CONFIG_DIR / "tiny.yaml"))
    assert cfg.run.name == "tiny"
    m = cfg.model
    assert (m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads) == (264, 128, 4, 4, 2)
    assert m.resolved_head_dim == 32
    assert m.resolved_ffn_hidden == 384            # 2/3*4*128 = 341 -> round up to 64
    assert cfg.data.path is None and cfg.mesh.data == -1


@pytest.mark.parametrize("name", ["small", "small.yaml", str(CONFIG_DIR / "small.yaml")])
def test_small_extends_tiny(name):
    cfg = load_config(name)
    tiny = load_config(None)
    assert cfg.run.name == "small"
    m = cfg.model
    assert (m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.multiple_of) == (256, 6, 8, 2, 128)
    # inherited from tiny.yaml through `base:`, not the class defaults
    assert m.vocab_size == tiny.model.vocab_size == 264
    assert cfg.train.log_every == tiny.train.log_every
    assert (cfg.data.seq_len, cfg.train.steps, cfg.train.lr) == (256, 2000, 1e-3)
    assert m.resolved_ffn_hidden == 768            # 2/3*4*256 = 682 -> round up to 128


def test_llama3_8b_shapes():
    cfg = load_config("llama3-8b")
    m = cfg.model
    assert m.resolved_ffn_hidden == 14336
    assert m.resolved_head_dim == 128
    assert (m.n_heads, m.n_kv_heads, m.n_layers) == (32, 8, 32)
    assert m.vocab_size == 128256
    assert m.rope_theta == 500000.0
    assert (m.dtype, m.param_dtype, m.remat, m.scan_layers) == ("bfloat16", "bfloat16", "full",
                                                                 True)
    assert (cfg.mesh.data, cfg.mesh.fsdp) == (1, -1)


# ----------------------------------------------------------------------------- overrides


def test_override_applied_and_run_name():
    cfg = load_config(None, ["model.n_kv_heads=1"])
    assert cfg.model.n_kv_heads == 1
    assert cfg.run.name == "tiny-n_kv_heads=1"
    # run.* overrides do not go into the derived name; several overrides are joined in order
    cfg = load_config("small", ["model.n_kv_heads=1", "train.steps=500", "run.progress=false"])
    assert cfg.run.name == "small-n_kv_heads=1-steps=500"
    assert cfg.run.progress is False
    # an explicit name wins; run_dir defaults to runs/<name>
    cfg = load_config(None, ["model.n_layers=2", "run.name=mine"])
    assert cfg.run.name == "mine" and cfg.run_dir == pathlib.Path("runs/mine")
    assert load_config(None, ["run.dir=/tmp/x"]).run_dir == pathlib.Path("/tmp/x")


def test_run_name_is_path_safe():
    name = load_config(None, ["data.path=/some dir/*.txt"]).run.name
    assert "/" not in name and " " not in name and "*" not in name
    assert name.startswith("tiny-path=")


def test_run_name_uses_yaml_spelling():
    """The name shows values as they are typed (YAML), not as Python prints them."""
    cfg = load_config(None, ["model.scan_layers=false", "model.tie_embeddings=true",
                             "model.head_dim=null"])
    assert cfg.run.name == "tiny-scan_layers=false-tie_embeddings=true-head_dim=null"
    assert cfg.model.scan_layers is False and cfg.model.head_dim is None


def test_override_yaml_typing():
    cfg = load_config(None, ["train.lr=3e-4", "data.path=null", "run.tensorboard=false",
                             "mesh.rules=[[batch, [data, fsdp]], [embed, null], [heads, tensor]]",
                             "train.sample_prompt=", "model.tie_embeddings=true"])
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 3e-4
    assert cfg.data.path is None
    assert cfg.run.tensorboard is False
    assert cfg.model.tie_embeddings is True
    assert cfg.train.sample_prompt == ""
    assert [tuple(r) for r in cfg.mesh.rules] == [("batch", ["data", "fsdp"]), ("embed", None),
                                                  ("heads", "tensor")]
    ov = parse_overrides(["model.n_layers=2", "data.path=null", "run.progress=false",
                          "train.lr=0.5"])
    assert ov == {"model.n_layers": 2, "data.path": None, "run.progress": False, "train.lr": 0.5}
    assert type(ov["model.n_layers"]) is int


@pytest.mark.parametrize("item", ["foo", "model=3", "=3", "model.=3", ".x=1", "model.n layers=2"])
def test_malformed_override(item):
    msg = _err([item])
    assert repr(item) in msg
    assert "expected section.key=value" in msg and "model.n_layers=2" in msg


def test_override_into_scalar():
    msg = _err(["model.d_model.x=1"])
    assert "model.d_model.x" in msg
    assert "'model.d_model' is a value, not a section" in msg


# ----------------------------------------------------------------------------- unknown keys


def test_unknown_key_suggests():
    line = _one_problem(["model.n_kv_head=1"])
    assert line.startswith("model.n_kv_head: unknown key")
    assert "did you mean 'model.n_kv_heads'" in line
    assert "n_kv_heads" in line.split("valid here:")[1]


def test_unknown_section_suggests():
    line = _one_problem(["modle.d_model=3"])
    assert line.startswith("modle: unknown key")
    assert "did you mean 'model'" in line
    assert "valid here: model, data, train, mesh" in line


def test_unknown_key_without_close_match_lists_valid_keys():
    line = _one_problem(["train.zzzzzzzz=1"])
    assert line.startswith("train.zzzzzzzz: unknown key")
    assert "did you mean" not in line
    assert "batch_size" in line and "warmup_steps" in line


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("base: " + str(CONFIG_DIR / "tiny.yaml") + "\ntrain:\n  stepz: 5\n")
    line = _one_problem(path=str(p))
    assert line.startswith("train.stepz: unknown key")
    assert "did you mean 'train.steps'" in line


# ----------------------------------------------------------------------------- wrong types / ranges


def test_wrong_type_float():
    line = _one_problem(["train.lr=abc"])
    assert line.startswith("train.lr:")
    assert "valid number" in line and "'abc'" in line


def test_wrong_type_int():
    line = _one_problem(["model.n_layers=2.5"])
    assert line.startswith("model.n_layers:")
    assert "valid integer" in line and "2.5" in line


def test_wrong_literal_lists_allowed_values():
    line = _one_problem(["model.norm=groupnorm"])
    assert line.startswith("model.norm:")
    assert "'groupnorm'" in line
    for allowed in ("layernorm", "rmsnorm", "batchnorm", "none"):
        assert f"'{allowed}'" in line


@pytest.mark.parametrize("key,value", [("model.d_model", 0), ("model.d_model", -4),
                                       ("model.n_layers", 0), ("train.batch_size", 0),
                                       ("train.lr", 0), ("model.head_dim", -2)])
def test_nonpositive_sizes(key, value):
    line = _one_problem([f"{key}={value}"])
    assert line.startswith(f"{key}:")
    assert "greater than 0" in line and f"(got {value})" in line


def test_range_bound():
    line = _one_problem(["data.val_fraction=0.9"])
    assert line.startswith("data.val_fraction:")
    assert "less than or equal to 0.5" in line and "0.9" in line


def test_errors_in_several_sections_are_all_reported():
    problems = _problems(_err(["model.norm=groupnorm", "train.lr=abc"]))
    assert len(problems) == 2
    assert problems[0].startswith("model.norm:") and problems[1].startswith("train.lr:")


# ----------------------------------------------------------------------------- cross-field


def test_d_model_not_divisible_by_n_heads():
    line = _one_problem(["model.d_model=130"])
    assert "model.d_model=130" in line and "model.n_heads=4" in line
    assert "model.head_dim" in line                   # the way out is named


def test_d_model_indivisible_ok_with_explicit_head_dim():
    cfg = load_config(None, ["model.d_model=130", "model.head_dim=32"])
    assert cfg.model.resolved_head_dim == 32


def test_n_heads_not_multiple_of_n_kv_heads():
    line = _one_problem(["model.n_kv_heads=3"])
    assert "model.n_heads=4" in line and "model.n_kv_heads=3" in line
    assert "multiple" in line


def test_n_kv_heads_exceeds_n_heads():
    line = _one_problem(["model.n_kv_heads=8"])
    assert "model.n_heads=4" in line and "model.n_kv_heads=8" in line


@pytest.mark.parametrize("overrides,head_dim", [
    (["model.d_model=12", "model.n_heads=4", "model.n_kv_heads=1"], 3),   # resolved d // h
    (["model.head_dim=5"], 5),                                             # explicit
])
def test_odd_head_dim(overrides, head_dim):
    line = _one_problem(overrides)
    assert f"model.head_dim={head_dim}" in line
    assert "even" in line and "RoPE" in line


def test_batch_size_not_divisible_by_grad_accum():
    line = _one_problem(["train.batch_size=10", "train.grad_accum=3"])
    assert "train.batch_size=10" in line and "train.grad_accum=3" in line
    assert "divisible" in line


def test_vocab_too_small_for_byte_tokenizer():
    line = _one_problem(["model.vocab_size=100"])
    assert "model.vocab_size=100" in line and "259" in line and "byte" in line
    assert load_config(None, ["model.vocab_size=259"]).model.vocab_size == 259


def test_mesh_two_fill_axes():
    line = _one_problem(["mesh.data=-1", "mesh.fsdp=-1"])
    assert line.startswith("mesh:")
    assert "at most one mesh axis may be -1" in line


@pytest.mark.parametrize("value", [0, -2])
def test_mesh_bad_size(value):
    line = _one_problem([f"mesh.fsdp={value}"])
    assert f"mesh.fsdp={value}" in line and "positive size or -1" in line


def test_mesh_rule_unknown_axis():
    line = _one_problem(["mesh.rules=[[batch, [data, fdsp]], [embed, fsdp]]"])
    assert line.startswith("mesh.rules:")
    assert "'batch'" in line and "'fdsp'" in line
    assert "['data', 'fsdp', 'tensor', 'expert']" in line


def test_moe_config_accepted():
    assert load_config(None, ["moe.n_experts=4"]).moe.n_experts == 4
    assert load_config(None, ["moe.n_experts=0"]).moe.n_experts == 0


@pytest.mark.parametrize("value", [2, -1])
def test_mesh_expert_refused_until_moe(value):
    line = _one_problem([f"mesh.expert={value}", "mesh.data=1"])
    assert f"mesh.expert={value}" in line and "only used by MoE" in line
    assert "keep mesh.expert=1" in line
    assert load_config(None, ["mesh.expert=1"]).mesh.expert == 1


def test_platform_hpu_validates_plugin_checked_at_configure():
    # hpu is a valid platform; whether a PJRT plugin exists is a runtime question
    # (tfm_jax.platform.backends.configure, tests/unit/platform/test_backends.py)
    assert load_config(None, ["backend.platform=hpu"]).backend.platform == "hpu"
    assert load_config(None, ["backend.platform=cpu"]).backend.platform == "cpu"


@pytest.mark.parametrize("overrides, words", [
    (["backend.profile=gaudi2"], ["backend.profile=gaudi2", "backend.platform=hpu",
                                  "backend.emulate=gaudi2"]),
    (["backend.profile=nvidia-hopper", "backend.platform=cpu"],
     ["backend.profile=nvidia-hopper", "backend.platform=gpu", "backend.emulate"]),
    (["backend.emulate=gaudi2", "backend.platform=hpu"],
     ["backend.emulate=gaudi2", "backend.platform=cpu", "backend.profile=gaudi2"]),
    (["backend.emulate=gaudi2", "backend.profile=gaudi3", "backend.platform=hpu"],
     ["backend.emulate=gaudi2"]),
])
def test_backend_profile_platform_refusals(overrides, words):
    line = _one_problem(overrides)
    for w in words:
        assert w in line, (w, line)


def test_profile_fills_unset_keys_explicit_wins():
    cfg = load_config(None, ["backend.emulate=gaudi2"])
    assert cfg.quant.fwd_format == "float8_e4m3fnuz" and cfg.quant.scale_set == "gaudi2"
    assert cfg.quant.weight_storage_format == "float8_e4m3fnuz"
    assert cfg.moe.dispatch == "implicit" and cfg.quant.recipe == "none"   # never turns FP8 on
    cfg = load_config(None, ["backend.emulate=gaudi2", "quant.fwd_format=float8_e4m3fn",
                             "moe.dispatch=dense"])
    assert cfg.quant.fwd_format == "float8_e4m3fn" and cfg.moe.dispatch == "dense"
    assert cfg.quant.scale_set == "gaudi2"
    cfg = load_config(None, ["backend.profile=gaudi3", "backend.platform=hpu"])
    assert cfg.quant.fwd_format == "float8_e4m3fn" and cfg.quant.scale_set == "pow2"
    plain = load_config(None, [])
    assert plain.quant.scale_set == "any" and plain.moe.dispatch == "all_to_all"
    # the resolved values are saved: reloading the dump gives the same config
    assert validate(cfg.to_dict()) == cfg


# ----------------------------------------------------------------------------- runtime checks


def test_check_runtime_ok():
    cfg = load_config(None)                       # batch 16, mesh.data=-1
    assert check_runtime(cfg, 8) == {"data": 8, "fsdp": 1, "tensor": 1, "expert": 1}
    assert check_runtime(cfg, 1)["data"] == 1
    cfg = cfg.replace(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    assert check_runtime(cfg, 8) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}


def test_check_runtime_product_mismatch():
    cfg = load_config(None, ["mesh.data=2", "mesh.fsdp=2"])
    with pytest.raises(ConfigError) as info:
        check_runtime(cfg, 8)
    msg = str(info.value)
    assert "= 4" in msg and "8 devices" in msg and "-1" in msg


def test_check_runtime_fill_does_not_divide():
    cfg = load_config(None, ["mesh.fsdp=3"])      # data=-1 fills
    with pytest.raises(ConfigError) as info:
        check_runtime(cfg, 8)
    msg = str(info.value)
    assert "multiply to 3" in msg and "8 available devices" in msg


def test_check_runtime_micro_batch_not_divisible_by_shards():
    cfg = load_config(None, ["train.batch_size=8", "train.grad_accum=2"])   # micro 4, 8 shards
    with pytest.raises(ConfigError) as info:
        check_runtime(cfg, 8)
    msg = str(info.value)
    assert "= 4 sequences per micro-batch" in msg and "8 batch shards" in msg
    assert "mesh.data*mesh.fsdp" in msg
    # with the batch split over 4 (data*fsdp) instead it fits
    assert check_runtime(cfg.replace(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}), 8)


# ----------------------------------------------------------------------------- files


def test_missing_config_file_lists_shipped(tmp_path):
    missing = tmp_path / "nope.yaml"
    msg = _err(path=str(missing))
    assert str(missing) in msg and "not found" in msg
    for shipped in ("tiny.yaml", "small.yaml", "llama3-8b.yaml"):
        assert shipped in msg
    assert "not found" in _err(path="no-such-config")


def test_invalid_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  d_model: [1, 2\n")
    msg = _err(path=str(p))
    assert str(p) in msg and "not valid YAML" in msg


@pytest.mark.parametrize("text", ["- model\n- train\n", "42\n", "just a string\n"])
def test_non_mapping_top_level(tmp_path, text):
    p = tmp_path / "list.yaml"
    p.write_text(text)
    msg = _err(path=str(p))
    assert str(p) in msg and "top level must be a mapping" in msg


def test_empty_file_is_all_defaults(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("# nothing\n")
    cfg = load_config(str(p))
    assert cfg.run.name == "empty"
    assert cfg.model == Config().model


def test_base_loop_detected(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nmodel:\n  n_layers: 2\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nmodel:\n  n_layers: 3\n")
    msg = _err(path=str(tmp_path / "a.yaml"))
    assert "'base' chain loops back" in msg and "a.yaml" in msg
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    assert "loops back" in _err(path=str(tmp_path / "self.yaml"))


def test_base_chain_merges_deeply(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  n_layers: 2\n  d_model: 64\ntrain:\n  steps: 9\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nmodel:\n  n_layers: 3\n")
    cfg = load_config(str(tmp_path / "b.yaml"), ["train.warmup_steps=1"])
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.train.steps) == (3, 64, 9)
    assert cfg.run.name == "b-warmup_steps=1"


# ----------------------------------------------------------------------------- Config object


def test_config_is_frozen():
    cfg = load_config(None)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.model.n_layers = 2
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.train = None
    assert cfg.model.n_layers == 4


def test_replace_revalidates():
    cfg = load_config(None)
    new = cfg.replace(**{"model.n_layers": 2, "train.lr": 1e-3})
    assert isinstance(new, Config) and new is not cfg
    assert (new.model.n_layers, new.train.lr) == (2, 1e-3)
    assert cfg.model.n_layers == 4 and cfg.train.lr == 3e-3        # original untouched
    with pytest.raises(ConfigError) as info:
        cfg.replace(**{"model.n_layers": 0})
    assert "model.n_layers" in str(info.value) and "greater than 0" in str(info.value)
    with pytest.raises(ConfigError) as info:
        cfg.replace(**{"model.n_kv_heads": 3})                     # cross-field
    assert "model.n_kv_heads=3" in str(info.value)
    with pytest.raises(ConfigError) as info:
        cfg.replace(**{"model.n_layer": 2})
    assert "did you mean 'model.n_layers'" in str(info.value)


@pytest.mark.parametrize("name,overrides", [
    (None, []),
    (None, ["model.n_kv_heads=1", "mesh.rules=[[batch, [data, fsdp]], [embed, null]]",
            "data.path=/x/y.txt", "train.peak_flops=1e12"]),
    ("small", []),
    ("llama3-8b", []),
])
def test_to_yaml_round_trip(tmp_path, name, overrides):
    cfg = load_config(name, overrides)
    p = tmp_path / "saved.yaml"
    p.write_text(cfg.to_yaml())
    again = load_config(str(p))
    assert again == cfg
    assert again.to_yaml() == cfg.to_yaml()
    assert again.run.name == cfg.run.name          # saved name is kept, not re-derived


# ----------------------------------------------------------------------------- strictness


def test_mesh_rule_bad_element_is_one_message():
    line = _one_problem(["mesh.rules=[[batch, 3]]"])
    assert line.startswith("mesh.rules")


def test_bool_for_number_rejected():
    line = _one_problem(["model.n_layers=true"])
    assert line.startswith("model.n_layers:")


def test_number_accepted_for_text_and_empty_section(tmp_path):
    assert load_config(None, ["train.sample_prompt=42"]).train.sample_prompt == "42"
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  # nothing here yet\nmodel:\n  n_layers: 2\n")
    cfg = load_config(str(p))
    from tfm_jax.config import TrainConfig
    assert cfg.model.n_layers == 2 and cfg.train.steps == TrainConfig().steps


def test_a_mesh_larger_than_the_machine_names_the_cpu_device_flag():
    """moe-tiny (data 2 x expert 4) on one device: the error says how to get 8 CPU devices."""
    cfg = load_config(None, ["moe.n_experts=8", "mesh.data=2", "mesh.expert=4"])
    with pytest.raises(ConfigError, match="8 but 1 devices.*XLA_FLAGS=--xla_force_host_platform"
                                          "_device_count=8"):
        cfg.mesh.resolved_sizes(1)


def test_every_command_reports_errors_with_one_prefix(tmp_path, capsys):
    """A config error and a missing-checkpoint error, from different commands: exit 2 and the
    same 'tfm-jax: error: ' prefix (no command-specific variants)."""
    from tfm_jax import cli

    cases = [["config", "show", "model.d_model=-1"],
             ["kv-cache", "--seq", "0"],
             ["eval", "--run-dir", str(tmp_path / "nothing-here")]]
    for argv in cases:
        capsys.readouterr()
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("tfm-jax: error: ") and "Traceback" not in err, (argv, err)
