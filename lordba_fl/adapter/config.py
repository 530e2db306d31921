"""Typed, validated configuration for LoRDBA adapters.

Every error raised here names the field, the bad value and the fix, so a wrong run config fails
once, where it enters, instead of deep inside a training step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lordba_fl.adapter.ste import STE_REGISTRY

# Every attention and MLP projection of LLaMA-, Qwen2- and Mistral-style decoders.
DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
SCALE_NAMES: tuple[str, ...] = ("in", "mid", "out")
INITS: tuple[str, ...] = ("scratch", "svd")
# How a fresh adapter's scales start (the outermost one is zero either way, so it starts as a no-op):
# "normalized" gives the folded factor A = S1 diag(s_mid) diag(s_in) entries of 1/sqrt(in * r), so a
# unit of scale moves the product about as much as a unit of LoRA's kaiming-initialised A does and
# Adam at LoRA's learning rate takes LoRA-sized steps; "ones" is the first design (s_in = s_mid = 1),
# whose steps are sqrt(in * r) times larger (it diverges at lr 1e-3, DESIGN.md's centralized table).
SCALE_INITS: tuple[str, ...] = ("normalized", "ones")
# How Adam's learning rate reaches each scale: "uniform" gives every scale ``lr``; "relative" scales a
# scale's lr by its normalized init relative to the full set's (s_in = 1/sqrt(in), s_mid = 1/sqrt(r)),
# so a scale that absorbs an absent one's share (s_mid = 1/sqrt(in * r) without s_in) takes the same
# relative steps as in the full set instead of sqrt(in) times larger ones.
SCALE_LRS: tuple[str, ...] = ("relative", "uniform")
# Where a fresh adapter's signs come from: "random" (seeded N(0, init_std^2) latents) or "base-svd"
# (the top-r singular vectors of the layer's own frozen, dequantized base weight, PiSSA-style: every
# party derives the same signs from the base, so they cost no bytes).
SIGN_INITS: tuple[str, ...] = ("random", "base-svd")


@dataclass(frozen=True)
class LoRDBAConfig:
    """Configuration of a LoRDBA adapter (DESIGN §1).

    The adapted layer computes ``y = W0 x + g * s_out * (S2 @ (s_mid * (S1 @ (s_in * x))))`` with
    ``S1 = sign(L1)``, ``S2 = sign(L2)`` and ``g = alpha / rank``.
    """

    rank: int = field(default=16, metadata={"help": "Rank r of the two sign carriers."})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha; the adapter is scaled by alpha / rank."})
    target_modules: tuple[str, ...] = field(
        default=DEFAULT_TARGET_MODULES,
        metadata={"help": "Module names (last path component, or a dotted suffix) to adapt."},
    )
    ste: str = field(default="smooth", metadata={"help": "Straight-through estimator: 'smooth' or 'clipped'."})
    ste_k: float = field(default=100.0, metadata={"help": "Sharpness k of the smooth STE, k * (1 - tanh(k L)^2)."})
    init: str = field(default="scratch", metadata={"help": "'scratch' (no-op start) or 'svd' (from a target update)."})
    init_std: float = field(
        default=0.01,
        metadata={"help": "Std of the scratch latents, and the magnitude given to latents rebuilt from packed signs."},
    )
    scales: tuple[str, ...] = field(
        default=SCALE_NAMES, metadata={"help": "Channel-wise scales to train, a subset of ('in', 'mid', 'out')."}
    )
    scale_init: str = field(
        default="normalized",
        metadata={"help": "Fresh scales: 'normalized' (s_in = 1/sqrt(in), s_mid = 1/sqrt(r), LoRA-sized steps) or 'ones'."},
    )
    sign_init: str = field(
        default="random",
        metadata={"help": "Fresh signs: 'random' (seeded) or 'base-svd' (top singular vectors of the frozen base weight)."},
    )
    svd_sweeps: int = field(default=5, metadata={"help": "Alternating least-squares sweeps of the 'svd' init."})
    seed: int | None = field(default=None, metadata={"help": "Seed of the scratch latents; None uses torch's RNG."})

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"rank must be a positive integer (e.g. 16); got {self.rank!r}")
        if not _finite_positive(self.alpha):
            raise ValueError(f"alpha must be a finite number > 0 (LoRA's lora_alpha, e.g. 2 * rank); got {self.alpha!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            targets = (targets,)
        targets = tuple(targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(
                f"target_modules must be a non-empty list of module names such as {list(DEFAULT_TARGET_MODULES)}; "
                f"got {self.target_modules!r}"
            )
        object.__setattr__(self, "target_modules", targets)
        if self.ste not in STE_REGISTRY:
            raise ValueError(f"ste must be one of {sorted(STE_REGISTRY)}; got {self.ste!r}")
        if not _finite_positive(self.ste_k):
            raise ValueError(f"ste_k must be a finite number > 0 (the reference uses 100); got {self.ste_k!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {list(INITS)}; got {self.init!r}")
        if self.scale_init not in SCALE_INITS:
            raise ValueError(f"scale_init must be one of {list(SCALE_INITS)}; got {self.scale_init!r}")
        if self.sign_init not in SIGN_INITS:
            raise ValueError(f"sign_init must be one of {list(SIGN_INITS)}; got {self.sign_init!r}")
        if not _finite_positive(self.init_std):
            raise ValueError(f"init_std must be a finite number > 0 (e.g. 0.01); got {self.init_std!r}")
        scales = (self.scales,) if isinstance(self.scales, str) else tuple(self.scales)
        unknown = [s for s in scales if s not in SCALE_NAMES]
        if unknown or not scales or len(set(scales)) != len(scales):
            raise ValueError(
                f"scales must be a non-empty subset of {list(SCALE_NAMES)} without repeats, e.g. ['out', 'mid']; "
                f"got {self.scales!r}"
            )
        object.__setattr__(self, "scales", tuple(s for s in SCALE_NAMES if s in scales))
        if isinstance(self.svd_sweeps, bool) or not isinstance(self.svd_sweeps, int) or self.svd_sweeps < 0:
            raise ValueError(f"svd_sweeps must be an integer >= 0; got {self.svd_sweeps!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None; got {self.seed!r}")

    @property
    def scaling(self) -> float:
        """``g = alpha / rank``, LoRA's scaling."""
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        d["scales"] = list(self.scales)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoRDBAConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LoRDBAConfig keys {unknown}; accepted keys are {sorted(known)}")
        d = dict(d)
        for key in ("target_modules", "scales"):
            if key in d and isinstance(d[key], list):
                d[key] = tuple(d[key])
        return cls(**d)


def _finite_positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
