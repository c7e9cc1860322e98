"""The experiment file of ``tfm-jax ablate``: schema (pydantic), loading, per-run configs.

An experiment is a base config, named variants (override sets) and seeds; each
(variant, seed) is one ordinary training run. Example (all keys)::

    name: attention                    # output: runs/ablate/attention/
    description: MHA vs GQA vs MQA ...
    base: tiny                         # a config file or shipped name, or a mapping:
    #   base: {config: tiny, model: {d_model: 64}}   (the file, then inline overrides)
    overrides: {train.steps: 600}      # common to every variant (dotted or nested keys)
    variants:
      mha: {model.n_kv_heads: 8}       # a variant is an override mapping, plus optionally
      gqa: {model.n_kv_heads: 2}       #   description: text
      up:                              #   init_from: start from another variant's run
        model.n_kv_heads: 2
        train.steps: 30
        init_from: {run: mha, convert: {kv_heads: 2}}
    seeds: [0, 1, 2]                   # train.seed of each run (init and data order)
    measurements:                      # names in tfm_jax.ablate.measurements.MEASUREMENTS,
      - params                         #   or {name: ..., <options>}; val_loss is always on
      - {name: kv_bytes, contexts: [256, 4096], batch: 1}
    plots:
      - {x: kv_bytes, y: perplexity}
      - {x: context, y: kv_bytes, series: variant, where: {batch: 1}}
    claims:
      - claim: GQA costs only +0.12 perplexity vs MHA
        source: seed Ch1.4.2
        metric: perplexity[gqa] - perplexity[mha]     # expression, evaluated per seed
        expected: 0.12
        kind: non_inferiority                         # superiority | equivalence |
        direction: less                               #   non_inferiority | point
        margin: 0.2                                   # (see ClaimSpec)

Every error names the key (``variants.gqa.init_from.run: ...``) and what is allowed. This module
imports neither jax nor flax.
"""

from __future__ import annotations

import difflib
import pathlib
import re
from typing import Any, Literal, Optional, Union

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tfm_jax.config import CONFIG_DIR, Config, ConfigError, compose_config, resolve_config_path
from tfm_jax.config.schema import safe_run_name

# The shipped experiments: the repository's top-level experiments/, package data of an installed
# wheel (tfm_jax/experiments links to it in a checkout).
EXPERIMENT_DIR = pathlib.Path(__file__).resolve().parents[1] / "experiments"
NAME = r"[A-Za-z0-9][\w.+=-]*"
RESERVED_VARIANT_KEYS = ("init_from", "description")


class ExperimentError(ConfigError):
    """An invalid experiment file; ``str(err)`` names the key and what is allowed (the CLI
    exits 2 with it, as for an invalid config)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MeasurementSpec(BaseModel):
    """One measurement: a registered ``name`` plus its options (any other keys), e.g.
    ``{name: kv_bytes, contexts: [256, 4096]}``. ``once: true`` measures the first seed's run
    only (for costly measurements that do not depend on the seed)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str
    once: bool = False

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def key(self) -> str:
        """Identity of name + options (the per-run measurement cache's key)."""
        return yaml.safe_dump({"name": self.name, **self.options}, sort_keys=True,
                              default_flow_style=True).strip()


class PlotSpec(_Strict):
    """A plot of ``y`` against ``x``. Both scalar metrics: one point per variant (mean, error
    bars = std over seeds). Otherwise ``y`` is a value and ``x`` a key of a measurement series
    (e.g. x ``context``, y ``decode_tokens_per_s``): one line per ``series`` group."""

    x: str
    y: str
    series: Union[str, list[str]] = "variant"
    where: dict[str, Any] = Field(default_factory=dict,
                                  description="keep series rows whose keys equal these")
    logx: bool = False
    logy: bool = False
    title: Optional[str] = None
    file: Optional[str] = Field(None, description="PNG file name (default <y>-vs-<x>.png)")

    @property
    def series_keys(self) -> list[str]:
        return [self.series] if isinstance(self.series, str) else list(self.series)


class ClaimSpec(_Strict):
    """A claim to test, declared before the run. ``metric`` is an expression over measured
    values (``perplexity[gqa] - perplexity[mha]``, ``value('kv_bytes', 'mha', context=4096)``),
    evaluated once per seed (paired by seed); ``kind`` says how its 95 % t interval over the
    seeds decides (:mod:`tfm_jax.ablate.verdict`):

    * ``superiority`` + ``direction`` (greater / less): the metric is above / below
      ``expected`` (default 0);
    * ``equivalence`` + ``margin``: the metric is within ``expected ± margin`` (default 0);
    * ``non_inferiority`` + ``direction`` + ``margin``: the metric is not worse than
      ``expected`` by more than ``margin`` (direction less: it stays below expected + margin);
    * ``point`` + ``margin``: the metric equals the numeric ``expected`` within ``margin``
      (a number, or ``"10%"`` of ``expected``).

    ``deterministic: true`` marks a metric that does not vary with the seed (bytes, counts,
    FLOPs): one value decides. ``timing: true`` decides only from three or more repeats whose
    spread is below the effect. ``device`` names the hardware the claim is about (``H100``,
    ``HPU``): measured on any other device the row is reported as a stand-in and its verdict is
    ``not measurable here``. ``check`` (a comparator or boolean expression) is the older,
    undeclared form: reported, not judged. Without ``metric`` the row is reported unjudged."""

    claim: str
    source: str = ""
    metric: Optional[str] = None
    expected: Union[float, int, str, None] = None
    kind: Optional[str] = None
    direction: Optional[str] = None
    margin: Union[float, int, str, None] = None
    deterministic: bool = False
    timing: bool = False
    device: Optional[str] = Field(None, description="hardware the claim is about (H100, HPU, ...)")
    check: Optional[str] = None
    where: Optional[str] = Field(None, description="where measured (default: this machine)")
    note: Optional[str] = None

    @field_validator("metric", "check")
    @classmethod
    def _parses(cls, v: Optional[str]) -> Optional[str]:
        from tfm_jax.ablate.report import parse_check, parse_expression

        if v is not None:
            (parse_check if _is_comparator(v) else parse_expression)(v)
        return v

    @model_validator(mode="after")
    def _declaration(self) -> "ClaimSpec":
        from tfm_jax.ablate.verdict import DIRECTIONS, KINDS

        if self.kind is None:
            return self
        name = f"claim {self.claim[:60]!r}"
        if self.kind not in KINDS:
            near = difflib.get_close_matches(self.kind, KINDS, n=1, cutoff=0.5)
            raise ValueError(f"{name}: kind {self.kind!r} is not one of {', '.join(KINDS)}"
                             + (f"; did you mean {near[0]!r}?" if near else ""))
        if self.metric is None:
            raise ValueError(f"{name}: metric: kind {self.kind} needs a metric expression")
        if self.expected is not None and not isinstance(self.expected, (int, float)):
            raise ValueError(f"{name}: expected: kind {self.kind} needs a number "
                             f"(got {self.expected!r})")
        if self.kind == "point" and self.expected is None:
            raise ValueError(f"{name}: expected: kind point needs the claimed value")
        if self.kind in ("superiority", "non_inferiority") and self.direction not in DIRECTIONS:
            raise ValueError(f"{name}: direction: kind {self.kind} needs direction "
                             f"{' or '.join(DIRECTIONS)} (got {self.direction!r})")
        if self.kind == "superiority" and self.margin is not None:
            raise ValueError(f"{name}: margin: kind superiority takes no margin (use "
                             "non_inferiority, or expected for a threshold)")
        if self.kind != "superiority":
            if self.margin is None:
                raise ValueError(f"{name}: margin: kind {self.kind} needs a margin")
            self.margin_value()
        return self

    def margin_value(self) -> Optional[float]:
        """The margin as a number (``"10%"`` -> 10 % of ``|expected|``)."""
        from tfm_jax.ablate.verdict import margin_value

        return margin_value(self.margin, self.expected, f"claim {self.claim[:60]!r}")


def _is_comparator(check: str) -> bool:
    return bool(re.fullmatch(r"\s*(<=|>=|<|>|==|~.*)\s*", check))


class ConvertSpec(_Strict):
    kv_heads: Optional[int] = Field(None, gt=0, description="K/V heads after mean-pooling "
                                    "(default: the variant's model.n_kv_heads)")


class InitFrom(_Strict):
    """Start each seed's run from the final checkpoint of variant ``run`` at the same seed,
    converted (``tfm_jax.tools.convert``: K/V heads mean-pooled when ``convert.kv_heads`` is given;
    step 0, fresh optimizer state)."""

    run: str
    convert: ConvertSpec = ConvertSpec()
    via: Literal["checkpoint", "hf"] = Field(
        "checkpoint", description="hf: the source run goes out as a Hugging Face folder "
        "(export-hf, float32) and its parameters are read back from it (as import-hf reads "
        "them) before the conversion; convert.json records the largest difference")


class Variant(_Strict):
    overrides: dict[str, Any] = Field(default_factory=dict)
    init_from: Optional[InitFrom] = None
    description: str = ""


class Experiment(_Strict):
    name: str = Field(pattern=f"^{NAME}$")
    description: str = ""
    base: Union[str, dict[str, Any]] = "tiny"
    overrides: dict[str, Any] = Field(default_factory=dict)
    variants: dict[str, Variant] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    # validate_default: the validator adds val_loss also when the key is left out
    measurements: list[MeasurementSpec] = Field(default_factory=list, validate_default=True)
    plots: list[PlotSpec] = Field(default_factory=list)
    claims: list[ClaimSpec] = Field(default_factory=list)
    out_dir: Optional[str] = Field(None, description="default runs/ablate/<name>")
    # set by derive: the experiment this one was derived from on the command line
    derived_from: Optional[str] = None
    # set by load_experiment: the file's folder, for relative base paths
    source: Optional[str] = None

    @field_validator("variants", mode="before")
    @classmethod
    def _variants(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            raise ValueError("must be a mapping {variant_name: {overrides...}}")
        out = {}
        for name, body in raw.items():
            if not isinstance(name, str) or not re.fullmatch(NAME, name):
                raise ValueError(f"variant name {name!r}: use letters, digits, '_', '-', '.' "
                                 "(it names a folder)")
            body = {} if body is None else body
            if not isinstance(body, dict):
                raise ValueError(f"variant {name!r} must be a mapping of overrides, got "
                                 f"{body!r}")
            rest = {k: v for k, v in body.items() if k not in RESERVED_VARIANT_KEYS}
            out[name] = {"overrides": rest,
                         **{k: body[k] for k in RESERVED_VARIANT_KEYS if k in body}}
        return out

    @field_validator("measurements", mode="before")
    @classmethod
    def _measurements(cls, raw: Any) -> Any:
        from tfm_jax.ablate.measurements import MEASUREMENTS

        raw = [] if raw is None else raw
        if not isinstance(raw, list):
            raise ValueError("must be a list of names or {name: ..., options...}")
        items = [{"name": m} if isinstance(m, str) else m for m in raw]
        names = []
        for i, m in enumerate(items):
            name = m.get("name") if isinstance(m, dict) else None
            if name is None:
                raise ValueError(f"item {i}: {m!r} needs a 'name' (a measurement name, or a "
                                 "mapping {name: ..., options...})")
            if name not in MEASUREMENTS:
                near = difflib.get_close_matches(str(name), list(MEASUREMENTS), n=1, cutoff=0.5)
                raise ValueError(
                    f"item {i}: unknown measurement {name!r}"
                    + (f"; did you mean {near[0]!r}?" if near else "")
                    + f" (registered: {', '.join(MEASUREMENTS)}; add one with "
                    "tfm_jax.ablate.measurements.register)")
            names.append(name)
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"measurement {dup[0]!r} listed twice; give it once, with all "
                             "its options")
        if "val_loss" not in names and "perplexity" not in names:
            items.insert(0, {"name": "val_loss"})      # always measured
        return items

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds {v} repeat a value")
        return v

    @model_validator(mode="after")
    def _init_from(self) -> "Experiment":
        for name, var in self.variants.items():
            if var.init_from is None:
                continue
            src = var.init_from.run
            if src not in self.variants:
                raise ValueError(f"variants.{name}.init_from.run: {src!r} is not a variant of "
                                 f"this experiment ({', '.join(self.variants)})")
        self.order()       # raises on cycles
        return self

    def order(self) -> list[str]:
        """Variant names, each after the variant its ``init_from`` starts from (else in file
        order)."""
        done: list[str] = []

        def visit(name: str, path: tuple[str, ...]) -> None:
            if name in done:
                return
            if name in path:
                raise ValueError(f"variants: init_from forms a cycle: {' -> '.join(path + (name,))}")
            var = self.variants[name]
            if var.init_from is not None:
                visit(var.init_from.run, path + (name,))
            done.append(name)

        for name in self.variants:
            visit(name, ())
        return done

    def derive(self, *, sets: Optional[dict[str, Any]] = None,
               variants: Optional[list[str]] = None, seeds: Optional[list[int]] = None,
               name: Optional[str] = None) -> "Experiment":
        """This experiment changed from the command line (``tfm-jax ablate --set/--variants/
        --seeds/--name``): ``sets`` (dotted keys) go after the common overrides (a variant's own
        value still wins); ``variants`` keeps those, in that order (claims naming a dropped
        variant are dropped); ``seeds`` replaces the seeds; ``name`` renames it, and with it the
        output folder (``runs/ablate/<name>``). Changing the runs' config (``sets``) needs a new
        name, so the file's own runs are never mixed with the derived ones."""
        if sets and not name:
            raise ExperimentError(
                f"--set changes every run's config; give the derived experiment a name with "
                f"--name (e.g. --name {self.name}-{_slug(sets)}): its runs then go to "
                f"runs/ablate/<name>, apart from {self.name}'s")
        update: dict[str, Any] = {}
        notes = []
        if sets:
            overrides = dict(self.overrides)
            for key, value in sets.items():
                overrides.pop(key, None)       # re-inserted last: applied after the sections
                overrides[key] = value
            update["overrides"] = overrides
            notes.append("--set " + " ".join(f"{k}={v}" for k, v in sets.items()))
        if variants:
            unknown = [v for v in variants if v not in self.variants]
            if unknown:
                raise ExperimentError(f"--variants {', '.join(unknown)}: not a variant of "
                                      f"{self.name} ({', '.join(self.variants)})")
            if len(set(variants)) != len(variants):
                raise ExperimentError(f"--variants {','.join(variants)} names a variant twice")
            for v in variants:
                src = self.variants[v].init_from
                if src is not None and src.run not in variants:
                    raise ExperimentError(f"--variants: {v} starts from {src.run}'s run "
                                          f"(init_from); keep {src.run} in --variants")
            update["variants"] = {v: self.variants[v] for v in variants}
            dropped = set(self.variants) - set(variants)
            update["claims"] = [c for c in self.claims
                                if not dropped & set(re.findall(r"\w+", c.metric or ""))]
            notes.append("--variants " + ",".join(variants))
        if seeds:
            if len(set(seeds)) != len(seeds):
                raise ExperimentError(f"--seeds {seeds} repeat a value")
            update["seeds"] = list(seeds)
            notes.append("--seeds " + ",".join(map(str, seeds)))
        if name:
            if not re.fullmatch(NAME, name):
                raise ExperimentError(f"--name {name!r}: use letters, digits, '_', '-', '.', "
                                      "'+', '=' (it names a folder)")
            update.update(name=name, out_dir=None)
            notes.append(f"derived from {self.name}")
        if notes:
            update["derived_from"] = self.derived_from or self.name
        derived = self.model_copy(update=update)
        cfg = derived.common_config()   # base + overrides must still validate (ExperimentError)
        if notes:
            # its own description: what runs now; the parent's text (its steps, seeds and
            # notes) describes other runs and is only pointed to
            seeds_ = derived.seeds
            derived = derived.model_copy(update={
                "description": f"Derived from {self.name} ({'; '.join(notes)}): "
                f"{cfg.train.steps} steps (common config), seeds "
                f"{', '.join(map(str, seeds_))}, variants {', '.join(derived.variants)}. "
                f"The question each variant asks is {self.name}'s (its experiment file).",
                "claims": [c.model_copy(update={"note": f"(written for {self.name}'s own runs) "
                                                f"{c.note}"}) if c.note else c
                           for c in derived.claims]})
        return derived

    @property
    def out(self) -> pathlib.Path:
        return pathlib.Path(self.out_dir or pathlib.Path("runs") / "ablate" / self.name)

    def run_dir(self, variant: str, seed: int) -> pathlib.Path:
        return self.out / variant / f"seed{seed}"

    # ---------------------------------------------------------------------------- configs

    def _base(self) -> tuple[Optional[str], dict[str, Any]]:
        """(config file, inline overrides) of ``base``."""
        if isinstance(self.base, str):
            return self._find_config(self.base), {}
        inline = dict(self.base)
        path = inline.pop("config", None)
        return (self._find_config(path) if path is not None else None), inline

    def _find_config(self, path: str) -> str:
        p = pathlib.Path(path).expanduser()
        if not p.exists() and self.source and not p.is_absolute():
            beside = pathlib.Path(self.source) / p
            if beside.exists():
                return str(beside)
        return str(resolve_config_path(str(p)))

    def common_config(self) -> Config:
        """base + overrides, no variant (checked before any run: an error here is everyone's)."""
        path, inline = self._base()
        try:
            return compose_config(path, [inline, self.overrides])
        except ConfigError as err:
            raise ExperimentError(f"experiment {self.name!r}: base + overrides: {err}") from None

    def config(self, variant: str, seed: int, extra: Optional[dict[str, Any]] = None) -> Config:
        """The full config of one run: base, overrides, the variant's overrides, ``extra``,
        then ``train.seed``, ``run.dir`` and ``run.name``. Raises ConfigError naming the
        variant."""
        path, inline = self._base()
        run = {"train.seed": seed, "run.dir": str(self.run_dir(variant, seed)),
               "run.name": safe_run_name(f"{self.name}-{variant}-seed{seed}")}
        try:
            return compose_config(path, [inline, self.overrides,
                                         self.variants[variant].overrides, extra or {}, run])
        except ConfigError as err:
            raise ConfigError(f"variant {variant!r}: {err}") from None


def _format(err: pydantic.ValidationError, path: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<top level>"
        if e["type"] == "extra_forbidden":
            parent = e["loc"][:-1]
            valid = _valid_keys(parent)
            near = difflib.get_close_matches(str(e["loc"][-1]), valid, n=1, cutoff=0.5)
            lines.append(f"{loc}: unknown key" + (f"; did you mean {near[0]!r}?" if near else "")
                         + (f" (valid here: {', '.join(valid)})" if valid else ""))
        else:
            msg = str(e["msg"]).removeprefix("Value error, ")
            got = e.get("input")
            shown = f" (got {got!r})" if e["type"] != "value_error" and not isinstance(
                got, dict) else ""
            lines.append(f"{loc}: {msg}{shown}")
    return f"invalid experiment file {path}:\n  " + "\n  ".join(lines)


def _valid_keys(loc: tuple) -> list[str]:
    """Field names of the schema node at ``loc`` (for 'did you mean')."""
    cls: Any = Experiment
    for part in loc:
        if isinstance(part, int) or cls is None:
            continue
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            if cls is Experiment or not isinstance(part, str):
                return []
            continue
        ann = field.annotation
        nxt = None
        for cand in (ann, *getattr(ann, "__args__", ())):
            for sub in (cand, *getattr(cand, "__args__", ())):
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    nxt = sub
        cls = nxt
    return [k for k in cls.model_fields if k != "source"] if cls is not None else []


def _slug(sets: dict[str, Any]) -> str:
    return "-".join(f"{k.split('.')[-1]}{v}" for k, v in sets.items())


def resolve_experiment_path(path: str) -> pathlib.Path:
    """A path as given, or a bare name (``attention``) of a shipped experiment."""
    p = pathlib.Path(path)
    if p.exists():
        return p
    for cand in (EXPERIMENT_DIR / p.name, EXPERIMENT_DIR / f"{p.name}.yaml"):
        if len(p.parts) == 1 and cand.is_file():
            return cand
    shipped = ", ".join(sorted(q.stem for q in EXPERIMENT_DIR.glob("*.yaml")))
    raise ExperimentError(f"experiment file {path} not found (shipped experiments in "
                          f"{EXPERIMENT_DIR}: {shipped or 'none'})")


def load_experiment(path: str | pathlib.Path, raw: Optional[dict[str, Any]] = None
                    ) -> Experiment:
    """Read and validate an experiment file (or ``raw``, an already parsed mapping, with
    ``path`` naming it in messages and anchoring relative base paths)."""
    if raw is None:
        p = resolve_experiment_path(str(path))
        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise ExperimentError(f"experiment file {p} is not valid YAML: {err}") from None
    else:
        p = pathlib.Path(path)
    if not isinstance(raw, dict):
        raise ExperimentError(f"experiment file {p}: top level must be a mapping with keys "
                              f"{', '.join(k for k in Experiment.model_fields if k != 'source')}")
    raw = {**raw, "source": str(p.parent)}
    try:
        exp = Experiment.model_validate(raw)
    except pydantic.ValidationError as err:
        raise ExperimentError(_format(err, str(p))) from None
    return exp


__all__ = ["CONFIG_DIR", "ClaimSpec", "ConvertSpec", "Experiment", "ExperimentError",
           "InitFrom", "MeasurementSpec", "PlotSpec", "Variant", "load_experiment",
           "resolve_experiment_path"]
