"""Hardware numeric profiles (``backend.profile`` / ``backend.emulate``) and the scaling decision.

A profile names the FP8 numerics of one accelerator family and fills the config keys that
depend on them. Pure data and plain functions: imported by :mod:`tfm_jax.config` (no jax).

=================  ===================  ======  ===============  =============  ==============
profile            forward FP8 format   max     hardware scales  scaling        MoE dispatch
=================  ===================  ======  ===============  =============  ==============
``nvidia-hopper``  ``float8_e4m3fn``    448     any float        dynamic/delay  ``all_to_all``
``gaudi2``         ``float8_e4m3fnuz``  240     powers of 16     static         ``implicit``
``gaudi3``         ``float8_e4m3fn``    448     powers of 2      static         ``implicit``
=================  ===================  ======  ===============  =============  ==============

Sources: Gaudi2's e4m3 range (max 240) and its scale set come from Intel Neural Compressor
(``neural_compressor/torch/algorithms/fp8_quant/_core/fp_utils.py``: Gaudi2 e4m3 max 240, exponent
biases {3, 7, 11, 15}, i.e. scales 16**k; Gaudi3 448 with any power-of-two scale);
the scaling column is the seed's Ch2.3 (NVIDIA: dynamic, HPU: static); the MoE column its Ch3.1
(HPU's fused MoE kernel: the all-to-all is implicit in the op, not an explicit collective).

**Emulated Gaudi2 e4m3.** ``ml_dtypes.float8_e4m3fnuz`` has Gaudi2's range (max 240) and the same
grid for ``|x| >= 2**-6``; below that it keeps one more binade (normals down to 2**-7, subnormal
step 2**-10 instead of Gaudi2's 2**-9), so tiny values round more finely than on the hardware.

**How a profile combines with explicit settings** (:func:`apply_defaults`): the profile fills a
key only where the YAML file (with its ``base:`` chain) and the overrides leave it unset; a key
that is set wins, whatever the profile says. The resolved values are what ``tfm-jax config
show`` prints and what a run saves, so a saved ``config.yaml`` holds them explicitly.
``Config.replace`` re-validates such a fully resolved config: changing the profile there keeps
the already resolved keys (load with an override instead). The profile never turns FP8 on:
``quant.recipe`` stays the user's (``fp8_static`` needs a calibration file -- the two-pass flow,
``tfm-jax calibrate`` then ``quant.recipe=fp8_static``); the profile's recommended recipe is
printed by ``tfm-jax env`` and ``tfm-jax config show``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

PROFILE_NAMES = ("none", "nvidia-hopper", "gaudi2", "gaudi3")
EMULATE_NAMES = ("none", "nvidia-hopper", "gaudi2", "gaudi3")
SCALE_SETS = ("any", "pow2", "gaudi2")


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    hardware: str
    platform: str                       # the jax platform of the real hardware
    fp8: str                            # native FP8 GEMMs on that hardware
    scaling: str                        # the seed's Ch2.3 strategy for inference
    defaults: tuple[tuple[str, Any], ...]   # dotted key -> value, filled when unset
    why: str

    def default(self, key: str) -> Any:
        return dict(self.defaults)[key]


PROFILES: dict[str, Profile] = {
    "nvidia-hopper": Profile(
        "nvidia-hopper", "NVIDIA H100/H200 (Hopper)", "gpu", "native (FP8 tensor cores)",
        "dynamic",
        (("quant.fwd_format", "float8_e4m3fn"), ("quant.bwd_format", "float8_e5m2"),
         ("quant.weight_storage_format", "float8_e4m3fn"), ("quant.scale_set", "any"),
         ("moe.dispatch", "all_to_all")),
        "OCP e4m3fn (max 448) forward, e5m2 gradients; scales are any float; MoE tokens move "
        "by an explicit all-to-all (NCCL)"),
    "gaudi2": Profile(
        "gaudi2", "Intel Gaudi2 (HPU)", "hpu", "native (MME FP8)", "static",
        (("quant.fwd_format", "float8_e4m3fnuz"), ("quant.bwd_format", "float8_e5m2"),
         ("quant.weight_storage_format", "float8_e4m3fnuz"), ("quant.scale_set", "gaudi2"),
         ("moe.dispatch", "implicit")),
        "e4m3 with max 240 (fnuz range), scales restricted to powers of 16 (the exponent "
        "biases the hardware switches between); static scales from calibration; fused MoE "
        "kernel (implicit dispatch)"),
    "gaudi3": Profile(
        "gaudi3", "Intel Gaudi3 (HPU)", "hpu", "native (MME FP8)", "static",
        (("quant.fwd_format", "float8_e4m3fn"), ("quant.bwd_format", "float8_e5m2"),
         ("quant.weight_storage_format", "float8_e4m3fn"), ("quant.scale_set", "pow2"),
         ("moe.dispatch", "implicit")),
        "e4m3 with max 448, any power-of-two scale; static scales from calibration; fused MoE "
        "kernel (implicit dispatch)"),
}


def active_name(backend: Any) -> str:
    """The profile whose numerics a config runs: ``backend.emulate`` if set, else
    ``backend.profile`` (a mapping or a :class:`~tfm_jax.config.BackendConfig`)."""
    get = backend.get if isinstance(backend, dict) else (lambda k, d=None: getattr(backend, k, d))
    emulate = get("emulate", "none") or "none"
    return emulate if emulate != "none" else (get("profile", "none") or "none")


def apply_defaults(raw: Any) -> Any:
    """A copy of a raw config mapping with the active profile's defaults filled where the
    mapping leaves a key unset (module doc). Anything that is not a mapping is returned as is
    (validation then reports it)."""
    if not isinstance(raw, dict) or raw.get("backend") is None:
        return raw
    name = active_name(raw["backend"])      # a mapping, or a BackendConfig given as such
    profile = PROFILES.get(name) if isinstance(name, str) else None
    if profile is None:
        return raw                      # "none", or an invalid name validation reports
    out = dict(raw)
    for key, value in profile.defaults:
        section, field = key.split(".")
        sec = out.get(section)
        if sec is None:
            sec = {}
        if not isinstance(sec, dict):
            continue                    # a section object is explicit; anything else invalid
        if field not in sec:
            out[section] = {**sec, field: value}
    return out


def describe(cfg: Any) -> list[str]:
    """Lines for ``tfm-jax config show``: each profile key's resolved value and whether it is
    the profile's default or an explicit setting that overrides it."""
    name = active_name(cfg.backend)
    profile = PROFILES.get(name)
    if profile is None:
        return []
    how = "emulated on CPU" if cfg.backend.emulate != "none" else "on the hardware"
    lines = [f"profile {name} ({profile.hardware}, {how}): {profile.why}"]
    for key, value in profile.defaults:
        section, field = key.split(".")
        got = getattr(getattr(cfg, section), field)
        lines.append(f"  {key}={got}" + ("  (profile default)" if got == value else
                                         f"  (explicit; the profile's default is {value})"))
    train = recommend_scaling(name, workload="training").recipe
    infer = recommend_scaling(name, workload="inference").recipe
    lines.append(f"  recommended quant.recipe: training {train}, inference {infer} (tfm-jax env "
                 "says why; the profile never sets the recipe)")
    return lines


# --------------------------------------------------------------------------------------------
# The seed's Ch2.3 decision tree ("2.3.3 决策树"), as code.


@dataclasses.dataclass(frozen=True)
class Recommendation:
    scaling: str                        # dynamic | delayed | static
    recipe: str                         # the quant.recipe that implements it
    reason: str


def recommend_scaling(profile: Optional[str], *, workload: str = "inference",
                      stable_inputs: bool = True, priority: Optional[str] = None,
                      fp8_native: bool = True) -> Recommendation:
    """The scaling strategy for a workload on a profile's hardware.

    Seed Ch2.3.3 (inference): inputs not stable -> dynamic; stable and throughput first ->
    static (the HPU way: calibrate once, no amax at run time); stable and accuracy first ->
    dynamic (the NVIDIA way). ``priority`` None takes the hardware's own (Ch2.3: NVIDIA favours
    accuracy robustness, HPU throughput determinism). Training is not in the seed's tree: its
    inputs shift as the weights change, so a calibrated scale goes stale; delayed scaling
    (amax history, Transformer Engine's default) is the standard there. Without native FP8
    (``fp8_native=False``) FP8 is emulated -- numerics only, no speed-up -- said in the reason.
    """
    if workload not in ("inference", "training"):
        raise ValueError(f"workload {workload!r}; valid: inference, training")
    if priority not in (None, "throughput", "accuracy"):
        raise ValueError(f"priority {priority!r}; valid: throughput, accuracy (or None)")
    p = PROFILES.get(profile or "none")
    emu = "" if fp8_native else " (FP8 emulated here: numerics only, no speed-up)"
    if workload == "training":
        return Recommendation("delayed", "fp8_delayed",
                              "training: activations and gradients drift as the weights learn, "
                              "so a calibrated (static) scale goes stale; delayed scaling "
                              "follows them from an amax history at no extra pass" + emu)
    if not stable_inputs:
        return Recommendation("dynamic", "fp8_dynamic", "seed Ch2.3.3: input distribution not "
                              "stable -> dynamic scaling (per-tensor amax each step)" + emu)
    if priority is None:
        priority = "throughput" if p is not None and p.scaling == "static" else "accuracy"
        src = (f"{p.hardware} favours {priority}" if p is not None
               else "no hardware profile: accuracy first")
    else:
        src = f"{priority} first (asked)"
    if priority == "throughput":
        return Recommendation("static", "fp8_static", f"seed Ch2.3.3: stable inputs, {src} -> "
                              "static scales from calibration (tfm-jax calibrate), no amax at "
                              "run time" + emu)
    return Recommendation("dynamic", "fp8_dynamic", f"seed Ch2.3.3: stable inputs, {src} -> "
                          "dynamic scaling (robust to shifts, ~one amax pass per tensor)" + emu)
