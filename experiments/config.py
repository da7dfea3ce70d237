"""Experiment configs: YAML presets validated against dataclasses, with ``--set key=value`` overrides.

Validation happens before any heavy work: an unknown key (with a "did you mean" hint), a value
of the wrong type, or an out-of-range value is a ``ConfigError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from agents.gates import GateConfig
from agents.joint import FinetuneConfig
from agents.rl import PolicyConfig
from backbone.data.datasets import DataConfig
from backbone.errors import ConfigError
from backbone.models.resnet import NORMALIZATION, SHORTCUTS, parse_depth
from backbone.models.torchvision_resnet import is_torchvision_name, parse_torchvision_name
from backbone.training.loop import TrainConfig

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class ModelConfig:
    """The backbone: a CIFAR ResNet (``resnet20``, ``resnet56``, …: depth 6n+2, with ``shortcut``
    and ``width``) or a torchvision ResNet (``tv_resnet18`` … ``tv_resnet152``, ImageNet
    normalisation, ``weights`` as torchvision names them, e.g. ``IMAGENET1K_V2``, or a local
    ``.pth``; ``shortcut`` and ``width`` do not apply). Weights for another number of classes than
    the data's (ImageNet's 1000) load with a fresh classifier for the data's classes.
    ``init_checkpoint``: weights to import instead of training from scratch."""

    arch: str = "resnet20"
    shortcut: str = "A"
    width: int = 16
    normalization: typing.Any = "cifar10"  # a name from backbone.NORMALIZATION or [mean, std]
    init_checkpoint: typing.Optional[str] = None
    weights: typing.Optional[str] = None  # torchvision ResNets: IMAGENET1K_V1 / IMAGENET1K_V2 / DEFAULT

    @property
    def torchvision(self) -> bool:
        return is_torchvision_name(self.arch)

    def __post_init__(self) -> None:
        if isinstance(self.normalization, str) and self.normalization not in NORMALIZATION:
            raise ConfigError(f"model.normalization must be one of {sorted(NORMALIZATION)} or [mean, std]")
        if self.torchvision:
            try:
                parse_torchvision_name(self.arch)
            except ConfigError as exc:
                raise ConfigError(f"model.arch: {exc}") from None
            return
        if self.weights is not None:
            raise ConfigError("model.weights names torchvision weights: it applies to tv_resnet* archs only "
                              "(use model.init_checkpoint for a CIFAR ResNet checkpoint)")
        try:
            depth = parse_depth(self.arch)
        except ValueError as exc:
            raise ConfigError(f"model.arch: {exc}") from None
        if (depth - 2) % 6 or depth < 8:
            raise ConfigError(f"model.arch {self.arch!r}: CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, 56, 110, ...)")
        if self.shortcut not in SHORTCUTS:
            raise ConfigError(f"model.shortcut must be one of {list(SHORTCUTS)}, got {self.shortcut!r}")
        if self.width < 1:
            raise ConfigError(f"model.width must be >= 1, got {self.width}")


#: What ``study.leave_out`` may name: the comparison's methods other than the fixed subsets.
LEAVE_OUT = ("full_finetune", "random_dropping", "gates", "static", "cascade")


@dataclass
class StudyConfig:
    """What ``experiments.run`` does beyond one policy: the comparison at matched compute, a λ
    sweep, several seeds.

    ``budgets``: FLOPs ratios (policy included) at which every method's curve is read and the
    headline compares them; the gates, static networks, fine-tuned fixed subsets and random
    dropping are trained for these budgets. ``lambdas``: extra policies (each also fine-tuned
    jointly), the RL curve. ``static_epochs``: training epochs of the static networks (from
    scratch, the pretraining recipe without stochastic depth); null = ``pretrain.epochs``, and
    must be set when the backbone is imported (``pretrain.epochs: 0``). ``share_backbone``: with
    several seeds, every seed reuses the first seed's backbone and its from-scratch static
    networks where the first seed has trained them (neither depends on what the seeds vary; the
    report says what was shared).
    """

    baselines: bool = True  # gates, static ResNets, random dropping, fixed subsets at the budgets
    # Methods the comparison leaves out (the fixed subsets, its reference, always run): e.g.
    # [static, gates] for a fine-tuning-budget study where the from-scratch networks take hours.
    leave_out: list = field(default_factory=list)
    budgets: list = field(default_factory=lambda: [0.5, 0.7])
    lambdas: list = field(default_factory=list)  # extra policies, one per λ: the accuracy-vs-FLOPs curve
    seeds: typing.Optional[list] = None  # the whole study per seed (mean ± std); null: just the top-level seed
    share_backbone: bool = False
    static_epochs: typing.Optional[int] = None
    keep_rates: list = field(default_factory=lambda: [0.25, 0.5, 0.75])  # random dropping without fine-tuning
    search_images: typing.Optional[int] = None  # fixed-subset search on this many held-out images (null: all)
    latency_batch: int = 256  # the "large batch" of the latency measurement (plus a stream at batch 1)
    latency_repeats: int = 10
    latency_stream: int = 64  # batch 1: this many different test images, one call each

    def __post_init__(self) -> None:
        if any(not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 for v in self.lambdas):
            raise ConfigError("study.lambdas must be a list of numbers >= 0")
        if any(not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < 1 for v in self.budgets):
            raise ConfigError("study.budgets must be a list of FLOPs ratios in (0, 1)")
        if any(not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v <= 1 for v in self.keep_rates):
            raise ConfigError("study.keep_rates must be a list of keep rates in (0, 1]")
        if self.seeds is not None and (not self.seeds or any(not isinstance(s, int) or isinstance(s, bool) for s in self.seeds)):
            raise ConfigError("study.seeds must be a non-empty list of integers")
        if self.search_images is not None and self.search_images < 1:
            raise ConfigError("study.search_images must be >= 1 (or null: all the policy's images)")
        if not isinstance(self.leave_out, list) or any(m not in LEAVE_OUT for m in self.leave_out):
            raise ConfigError(f"study.leave_out must be a list of {', '.join(LEAVE_OUT)}; got {self.leave_out!r}")
        if self.static_epochs is not None and self.static_epochs < 1:
            raise ConfigError("study.static_epochs must be >= 1 (or null: the pretraining epochs)")
        if self.latency_batch < 1 or self.latency_repeats < 1 or self.latency_stream < 1:
            raise ConfigError("study.latency_batch, latency_repeats and latency_stream must be >= 1")


@dataclass
class ExperimentConfig:
    """One run directory: ``<output_dir>/<name>/``."""

    name: str = "quickstart"
    output_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    gates: GateConfig = field(default_factory=GateConfig)
    study: StudyConfig = field(default_factory=StudyConfig)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ConfigError(f"name must be a plain directory name, got {self.name!r}")
        if self.pretrain.distill > 0 and self.model.init_checkpoint is None and self.model.weights is None:
            raise ConfigError("pretrain.distill distils from the weights the run starts from: it needs "
                              "model.init_checkpoint or model.weights (from scratch there is no teacher)")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def lambdas(self) -> list[float]:
        """Every λ of the study: the policy's first, then ``study.lambdas`` (each once)."""
        return list(dict.fromkeys([self.policy.reward.lam, *self.study.lambdas]))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from nested ``data``, checking keys and types on the way."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{name}'{hint}; valid keys: {', '.join(sorted(fields))}")
        kwargs[key] = _coerce(hints[key], value, name)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{exc}" if prefix and not str(exc).startswith(prefix) else str(exc)) from None


def _coerce(tp, value, name: str):
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, prefix=f"{name}.")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
        origin = typing.get_origin(tp)
    if tp is typing.Any:
        return value
    expected = origin or tp
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if expected is bool and not isinstance(value, bool):
        raise ConfigError(f"config key '{name}' must be true or false, got {value!r}")
    if expected is int and isinstance(value, bool):
        raise ConfigError(f"config key '{name}' must be an integer, got {value!r}")
    if not isinstance(value, expected):
        raise ConfigError(f"config key '{name}' must be of type {expected.__name__}, got {value!r} ({type(value).__name__})")
    return value


def parse_override(text: str) -> tuple[list[str], object]:
    """``"pretrain.lr=0.05"`` → (["pretrain", "lr"], 0.05); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML preset (a path, or a name in ``experiments/configs``), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        file = Path(path)
        if not file.exists() and (CONFIG_DIR / f"{path}.yaml").exists():
            file = CONFIG_DIR / f"{path}.yaml"
        if not file.is_file():
            presets = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
            raise ConfigError(f"config file {path} not found (presets: {presets})")
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {file} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {file} must hold a mapping of keys, not {type(data).__name__}")
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: '{key}' is not a section")
        node[keys[-1]] = value
    return from_dict(ExperimentConfig, data)


def dump_config(cfg, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
