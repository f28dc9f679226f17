"""Training configuration: one frozen dataclass, the paper's recipes as named presets.

``TrainConfig`` holds everything a run needs to be reproduced: the U-Net (``ddpmkit.nn.UNetConfig``),
the diffusion (``ddpmkit.diffusion.DiffusionConfig``) and the optimisation recipe. It goes to and
from JSON (``to_dict`` / ``from_dict``), takes ``key=value`` overrides (``apply_overrides``; nested
keys as ``unet.ch=64``, ``diffusion.num_timesteps=500``) and says how it differs from the paper
(``deviations_from_paper``).

The paper presets default to the paper's recipe (Sec. 4, App. B; the authors' ``run_cifar.py``,
``run_celebahq.py``, ``run_lsun.py``): Adam lr 2e-4 (2e-5 at 256x256), betas (0.9, 0.999), eps 1e-8,
linear warm-up over 5000 steps, global grad-norm clip 1.0, EMA 0.9999 every step, random horizontal
flips, batch 128 (64 at 256x256), T = 1000 linear betas 1e-4..0.02, eps-prediction, L_simple.
``digits`` is this package's own small recipe (8x8 digits, minutes on a CPU); its deviations from
the paper's CIFAR-10 recipe are listed at every start.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from ddpmkit.checks import check_float, check_int
from ddpmkit.data.sources import OnBadImage
from ddpmkit.diffusion import DiffusionConfig, VarType
from ddpmkit.enums import parse_enum, unknown_choice
from ddpmkit.fileio import atomic_write_json, read_json_object
from ddpmkit.nn import UNET_PRESETS, UNetConfig
from ddpmkit.schema import OneOf, Optional, check, problem

__all__ = [
    "CONFIG_SCHEMA",
    "PAPER_RECIPE_FIELDS",
    "RESUME_MUTABLE_FIELDS",
    "TRAIN_PRESETS",
    "LrSchedule",
    "Precision",
    "Tracker",
    "TrainConfig",
    "apply_overrides",
    "changed_on_resume",
    "config_from_partial_dict",
    "deviations_from_paper",
    "load_config",
    "parse_overrides",
    "preset_name",
    "save_config",
    "train_preset",
]


class Precision(str, Enum):
    """Arithmetic of the forward/backward pass. Parameters, optimiser and EMA stay float32."""

    FP32 = "fp32"  # the paper's
    BF16 = "bf16"  # torch.autocast(bfloat16); GPU only
    FP16 = "fp16"  # torch.autocast(float16) + GradScaler; GPU only


class LrSchedule(str, Enum):
    """The learning rate after the linear warm-up, from ``lr`` at update ``warmup_steps`` towards
    ``lr_min`` at update ``steps`` (see ``ddpmkit.training.step.learning_rate``)."""

    CONSTANT = "constant"  # the paper's
    LINEAR = "linear"
    COSINE = "cosine"


class Tracker(str, Enum):
    """Where metrics, sample grids and the config go besides metrics.jsonl and samples/."""

    NONE = "none"  # the default: nothing is opened unless asked
    TENSORBOARD = "tensorboard"  # RUN/tensorboard; pip install 'ddpmkit[tensorboard]'
    WANDB = "wandb"  # Weights & Biases under RUN/wandb; pip install 'ddpmkit[wandb]'


# Counts that size an allocation (threads, data-loader processes, the sample grid's batch): far
# above any use, below what crashes libgomp, forks a machine to death or fills memory.
MAX_COUNTS = {"num_threads": 1024, "num_workers": 256, "num_samples": 4096}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A training run, resolved. Defaults are the paper's CIFAR-10 recipe (App. B)."""

    preset: str = "custom"
    unet: UNetConfig = field(default_factory=lambda: UNET_PRESETS["cifar10"])  # dropout 0.1
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    # data
    data: str | None = None  # a source for ddpmkit.data.open_source; None = the digits
    random_flip: bool = True
    on_bad_image: OnBadImage = OnBadImage.SKIP
    num_workers: int = 0
    num_threads: int = 0  # torch intra-op CPU threads; 0 = torch's default
    # optimisation (the paper's recipe)
    batch_size: int = 128  # global: per-rank batch = batch_size / world size
    steps: int = 800_000
    lr: float = 2e-4
    warmup_steps: int = 5000
    lr_schedule: LrSchedule = LrSchedule.CONSTANT  # after the warm-up
    lr_min: float = 0.0  # where linear / cosine decay ends (at update ``steps``)
    grad_accum: int = 1  # micro-batches per update (same global batch, less memory)
    grad_clip: float = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    ema_decay: float = 0.9999
    # EMA warm-up (diffusers' EMAModel form): decay at 0-based update s is
    # min(ema_decay, max(ema_min_decay, 1 - (1 + s / ema_inv_gamma) ** -ema_power)); off: ema_decay
    ema_warmup: bool = False
    ema_inv_gamma: float = 1.0
    ema_power: float = 2 / 3
    ema_min_decay: float = 0.0
    precision: Precision = Precision.FP32
    seed: int = 0
    # bookkeeping
    checkpoint_every: int = 5000
    keep_last: int = 3
    sample_every: int = 5000
    num_samples: int = 64
    log_every: int = 50
    max_nonfinite: int = 20
    logger: Tracker = Tracker.NONE

    def __post_init__(self) -> None:
        top = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("unet", "diffusion")}
        p = problem({k: v.value if isinstance(v, Enum) else list(v) if isinstance(v, tuple) else v
                     for k, v in top.items()}, {k: v for k, v in CONFIG_SCHEMA.items() if k in top})
        if p is not None:
            raise ValueError(p)
        for name, cls in (("precision", Precision), ("on_bad_image", OnBadImage),
                          ("lr_schedule", LrSchedule), ("logger", Tracker)):
            object.__setattr__(self, name, parse_enum(cls, getattr(self, name), name))
        object.__setattr__(self, "adam_betas", tuple(float(b) for b in self.adam_betas))
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        positive = ("batch_size", "steps", "checkpoint_every", "keep_last", "sample_every", "log_every",
                    "max_nonfinite", "grad_accum")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("warmup_steps", "num_workers", "num_threads", "num_samples", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        check_int(self.seed, "seed", low=0, high=2**63 - 1)  # torch.manual_seed takes 64 bits, signed
        for name, high in MAX_COUNTS.items():  # before a thread pool, worker pool or sample grid is made
            check_int(getattr(self, name), name, low=0, high=high)
        check_float(self.adam_eps, "adam_eps", low=0, low_open=True)
        if not 0 < self.lr < float("inf"):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not 0.0 <= self.lr_min <= self.lr:
            raise ValueError(f"lr_min must be in [0, lr={self.lr!r}], got {self.lr_min!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by grad_accum "
                             f"{self.grad_accum}")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        for name in ("ema_inv_gamma", "ema_power"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.ema_min_decay <= self.ema_decay:
            raise ValueError(f"ema_min_decay must be in [0, ema_decay={self.ema_decay!r}], "
                             f"got {self.ema_min_decay!r}")
        if self.unet.in_channels != self.unet.out_channels:
            raise ValueError("unet.in_channels must equal unet.out_channels for a diffusion model")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; nested ``unet`` and ``diffusion`` dicts."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("unet", "diffusion"):
                value = value.to_dict()
            elif isinstance(value, Enum):
                value = value.value
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "train config") -> TrainConfig:
        """Inverse of ``to_dict``; missing keys take the defaults; unknown keys and values of the wrong
        type (``CONFIG_SCHEMA``) raise a ValueError ``"{where}: {key} ..."``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown train config keys {unknown}; expected a subset of {sorted(known)}")
        check(d, CONFIG_SCHEMA, where)
        kwargs = dict(d)
        if "unet" in kwargs:
            kwargs["unet"] = UNetConfig.from_dict(kwargs["unet"])
        if "diffusion" in kwargs:
            kwargs["diffusion"] = DiffusionConfig.from_dict(kwargs["diffusion"])
        if "adam_betas" in kwargs:
            kwargs["adam_betas"] = tuple(kwargs["adam_betas"])
        return cls(**kwargs)


def _spec_of(value: Any) -> Any:
    """The JSON type of a field, from its default value."""
    if isinstance(value, Enum):
        return str
    if isinstance(value, tuple):
        return [_spec_of(value[0])]
    return type(value)


def _fields_spec(cls: Any, defaults: Any = None, **special: Any) -> dict[str, Any]:
    """Each field of dataclass ``cls`` as an optional key of its default's type (from ``defaults``,
    an instance, where a field has no default)."""
    def default(f: Any) -> Any:
        if defaults is not None:
            return getattr(defaults, f.name)
        return f.default_factory() if f.default is dataclasses.MISSING else f.default

    return {f.name: Optional(special.get(f.name) or _spec_of(default(f))) for f in fields(cls)}


# The JSON shape of a config file (every key optional), field by field: a user's file is checked
# against it before any value is used (``ddpmkit.schema``); ranges are checked by the dataclasses.
CONFIG_SCHEMA: dict[str, Any] = {
    **_fields_spec(TrainConfig, data=OneOf(str, None), adam_betas=(float, float)),
    "unet": Optional(_fields_spec(UNetConfig, UNET_PRESETS["cifar10"])),
    "diffusion": Optional(_fields_spec(DiffusionConfig, DiffusionConfig())),
}


def _paper_cifar10() -> TrainConfig:
    return TrainConfig(preset="cifar10", unet=dataclasses.replace(UNET_PRESETS["cifar10"], dropout=0.1))


def _paper_256(name: str, steps: int) -> TrainConfig:
    # 256x256: lr 2e-5, batch 64, dropout 0; these models sample with the posterior variance
    return TrainConfig(
        preset=name,
        unet=dataclasses.replace(UNET_PRESETS[name], dropout=0.0),
        diffusion=DiffusionConfig(var_type=VarType.FIXED_SMALL),
        batch_size=64,
        lr=2e-5,
        steps=steps,
        checkpoint_every=2500,
        sample_every=10000,
        num_samples=16,
    )


def _digits() -> TrainConfig:
    # A short CPU run on scikit-learn's 8x8 digits: a 1.08M-parameter U-Net (ch 64, levels 8x8 and
    # 4x4, one res block per level, attention only in the middle block), a 5x larger lr with a
    # short warm-up, and an EMA whose memory (~500 steps) suits a few thousand steps, not 800k.
    # ch 64 rather than 32: with 32 channels GroupNorm(32) is a per-channel instance norm over 16
    # pixels at 4x4, and about a fifth of the samples stayed noise (measured; see docs/training.md).
    return TrainConfig(
        preset="digits",
        unet=UNET_PRESETS["digits"],
        data="digits",
        random_flip=False,  # digits are not mirror-symmetric
        batch_size=128,
        steps=1500,
        lr=1e-3,
        warmup_steps=200,
        ema_decay=0.998,
        # 8x8 images are too small for intra-op parallelism: on the 2-core test machine one thread
        # took 0.26 s a step and two threads 5 s (they spin while the other core is busy)
        num_threads=1,
        checkpoint_every=500,
        keep_last=2,
        sample_every=1000,
        num_samples=64,
        log_every=10,
    )


TRAIN_PRESETS: dict[str, Any] = {
    "digits": _digits,
    "cifar10": _paper_cifar10,
    "celebahq256": lambda: _paper_256("celebahq256", 500_000),
    "lsun256": lambda: _paper_256("lsun256", 2_400_000),  # LSUN Bedroom's length (Church 1.2M, Cat 1.8M)
}

# The paper recipe each preset is held against; anything else is held against CIFAR-10's.
_PAPER_REFERENCE = {"cifar10": "cifar10", "celebahq256": "celebahq256", "lsun256": "lsun256"}

# Fields that make the paper's recipe; the rest (data path, seed, logging cadence) are bookkeeping.
PAPER_RECIPE_FIELDS: tuple[str, ...] = (
    "unet", "diffusion", "random_flip", "batch_size", "steps", "lr", "warmup_steps", "grad_clip",
    "adam_betas", "adam_eps", "ema_decay", "precision", "lr_schedule", "lr_min", "ema_warmup",
    "ema_inv_gamma", "ema_power", "ema_min_decay",
)
# Fields that may change when a run is resumed (everything else must match the checkpoint).
RESUME_MUTABLE_FIELDS: frozenset[str] = frozenset(
    {"data", "num_workers", "num_threads", "steps", "checkpoint_every", "keep_last", "sample_every",
     "num_samples", "log_every", "max_nonfinite", "precision", "on_bad_image", "grad_accum", "logger"}
)


def preset_name(name: str) -> str:
    """The preset ``name`` names, in any case (``CIFAR10`` -> ``cifar10``); else a ValueError listing them."""
    key = name.lower() if isinstance(name, str) else name
    if key not in TRAIN_PRESETS:
        raise unknown_choice("preset", name, sorted(TRAIN_PRESETS))
    return key


def train_preset(name: str) -> TrainConfig:
    """The named preset (any case): ``digits``, ``cifar10``, ``celebahq256`` or ``lsun256``."""
    return TRAIN_PRESETS[preset_name(name)]()


def _parse_value(text: str, current: Any, key: str) -> Any:
    """``text`` converted to the type of the field's current value."""
    low = text.strip().lower()
    try:
        if isinstance(current, Enum):
            return parse_enum(type(current), text, key)
        if isinstance(current, bool):
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, tuple):
            parts = [p for p in low.strip("[]() ").replace(" ", "").split(",") if p]
            elem = type(current[0]) if current else int
            return tuple(elem(p) for p in parts)
        if current is None and low in ("none", "null", ""):
            return None
        if low in ("none", "null") and key in ("data",):
            return None
        return text
    except ValueError as err:
        raise ValueError(f"bad value {text!r} for {key}: {err}") from None


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["lr=1e-4", "unet.ch=64"]`` -> ``{"lr": "1e-4", "unet.ch": "64"}``."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bad override {item!r}; expected KEY=VALUE, e.g. lr=1e-4 or unet.ch=64")
        out[key.strip()] = value.strip()
    return out


def apply_overrides(config: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """A copy of ``config`` with ``{"lr": "1e-4", "unet.ch": 64, ...}`` applied.

    Values may be strings (parsed to the field's type) or already typed. Unknown keys raise.
    """
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {"unet": {}, "diffusion": {}}
    for key, value in overrides.items():
        group, dot, name = key.partition(".")
        target = getattr(config, group, None) if dot else config
        attr = name if dot else key
        if dot and group not in nested:
            raise ValueError(f"unknown config group {group!r} in {key!r}; expected unet.* or diffusion.*")
        known = [f.name for f in fields(target)] if target is not None else []
        if attr not in known or (not dot and attr in nested):
            raise unknown_choice("config key", key, _all_keys(config))
        current = getattr(target, attr)
        parsed = _parse_value(value, current, key) if isinstance(value, str) else value
        (nested[group] if dot else top)[attr] = parsed
    if nested["unet"]:
        top["unet"] = dataclasses.replace(config.unet, **nested["unet"])
    if nested["diffusion"]:
        top["diffusion"] = dataclasses.replace(config.diffusion, **nested["diffusion"])
    return dataclasses.replace(config, **top)


def _all_keys(config: TrainConfig) -> list[str]:
    keys = [f.name for f in fields(config) if f.name not in ("unet", "diffusion")]
    keys += [f"unet.{f.name}" for f in fields(config.unet)]
    keys += [f"diffusion.{f.name}" for f in fields(config.diffusion)]
    return keys


def _flat(config: TrainConfig) -> dict[str, Any]:
    d = config.to_dict()
    flat = {k: v for k, v in d.items() if k not in ("unet", "diffusion")}
    flat.update({f"unet.{k}": v for k, v in d["unet"].items()})
    flat.update({f"diffusion.{k}": v for k, v in d["diffusion"].items()})
    return flat


def deviations_from_paper(config: TrainConfig) -> list[str]:
    """Every recipe setting of ``config`` that differs from the paper's, as ``"key VALUE (paper: X)"``.

    The reference is the paper preset of the same name, else the CIFAR-10 recipe. Bookkeeping
    (data path, seed, checkpoint and logging cadence) is not part of the recipe.
    """
    ref_name = _PAPER_REFERENCE.get(config.preset, "cifar10")
    ref = _flat(train_preset(ref_name))
    ours = _flat(config)
    out = []
    for key, value in ours.items():
        if key.split(".")[0] not in PAPER_RECIPE_FIELDS:
            continue
        if value != ref.get(key):
            out.append(f"{key} {value!r} (paper's {ref_name}: {ref.get(key)!r})")
    return out


def changed_on_resume(saved: TrainConfig, requested: TrainConfig) -> list[str]:
    """Keys that differ between a checkpoint's config and the requested one and may not change."""
    a, b = _flat(saved), _flat(requested)
    return [k for k in a if a[k] != b.get(k) and k.split(".")[0] not in RESUME_MUTABLE_FIELDS]


def save_config(config: TrainConfig, path: str | Path) -> Path:
    """Write ``config.to_dict()`` as indented JSON, atomically (fsync + rename)."""
    path = Path(path)
    atomic_write_json(path, config.to_dict())
    return path


def load_config(path: str | Path) -> TrainConfig:
    """Read a JSON file written by ``save_config`` (or a subset of its keys), checked field by field."""
    return config_from_partial_dict(read_json_object(path), where=str(path))


def config_from_partial_dict(d: dict[str, Any], where: str = "train config") -> TrainConfig:
    """A config from some of its keys: those missing come from ``d["preset"]``'s preset if it
    names one, else from the defaults (the paper's CIFAR-10 recipe). Nested dicts merge. The keys
    given are type-checked (``CONFIG_SCHEMA``) before they are merged, naming ``where``."""
    check(d, CONFIG_SCHEMA, where)
    preset = d.get("preset")
    base = (train_preset(preset) if preset in TRAIN_PRESETS else TrainConfig()).to_dict()
    for key, value in d.items():
        if key in ("unet", "diffusion") and isinstance(value, dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return TrainConfig.from_dict(base, where)
