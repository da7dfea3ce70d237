"""torchvision's ImageNet ResNets (18/34/50/101/152) as skippable backbones.

Same contract as ``CifarResNet``: the residual blocks of ``layer1`` … ``layer4`` form one flat,
indexable sequence (``model.blocks[i]``; 16 for ResNet-50, 33 for ResNet-101) and
``model(x, keep_mask)`` runs block ``i`` only on the rows that keep it (``SkippableResNet``'s
shared runner); a skipped first block of a stage applies its ``downsample`` (1x1 conv + BN), so
shapes fit. Module and parameter names are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer2.0.downsample.0``, ``fc``), so its state dicts load unchanged.

Names: ``build_torchvision_resnet("resnet50")``; where one name must choose between the families
(configs, ``build_backbone``) torchvision networks are spelled ``"tv_resnet50"``, because
``"resnet50"`` and ``"resnet152"`` are also valid CIFAR depths (6n+2).

Pretrained weights are named as in torchvision (``"IMAGENET1K_V2"``, ``"DEFAULT"``, the enum
``ResNet50_Weights.IMAGENET1K_V2``) or given as a local ``.pth`` file; downloads go through torch
hub's cache (``torch.hub.get_dir()/checkpoints``), so a file placed there loads offline.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

import torch
import torch.nn as nn

from backbone.errors import CheckpointError, ConfigError
from backbone.models.blocks import ResidualBlock
from backbone.models.fused import conv_bn
from backbone.models.masked import memory_format_of
from backbone.models.resnet import SkippableResNet, _normalization, build_resnet


class TorchvisionBlock(ResidualBlock):
    """What both block kinds share (see backbone.models.blocks): ``downsample`` is None (identity
    shortcut) or 1x1 conv + BN; subclasses define the layers."""

    expansion = 1
    downsample: nn.Module | None

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        """What a row whose keep bit is clear gets: the shortcut alone (identity or downsample)."""
        return x if self.downsample is None else conv_bn(self.downsample[0], self.downsample[1], x)


class TorchvisionBasicBlock(TorchvisionBlock):
    """torchvision's BasicBlock: two 3x3 convolutions (ResNet-18/34)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.downsamples = downsample is not None
        self.stride = stride

    def before_last_conv(self, x: torch.Tensor) -> torch.Tensor:
        return conv_bn(self.conv1, self.bn1, x, relu=True)

    def last_conv_bn(self) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
        return self.conv2, self.bn2


class TorchvisionBottleneck(TorchvisionBlock):
    """torchvision's Bottleneck, 1x1 → 3x3 → 1x1 (ResNet-50/101/152; v1.5: the stride sits on the 3x3)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample
        self.downsamples = downsample is not None
        self.stride = stride

    def before_last_conv(self, x: torch.Tensor) -> torch.Tensor:
        return conv_bn(self.conv2, self.bn2, conv_bn(self.conv1, self.bn1, x, relu=True), relu=True)

    def last_conv_bn(self) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
        return self.conv3, self.bn3


#: name: (block class, blocks per stage), as in torchvision.models.resnet.
ARCHS: dict[str, tuple[type[TorchvisionBlock], tuple[int, int, int, int]]] = {
    "resnet18": (TorchvisionBasicBlock, (2, 2, 2, 2)),
    "resnet34": (TorchvisionBasicBlock, (3, 4, 6, 3)),
    "resnet50": (TorchvisionBottleneck, (3, 4, 6, 3)),
    "resnet101": (TorchvisionBottleneck, (3, 4, 23, 3)),
    "resnet152": (TorchvisionBottleneck, (3, 8, 36, 3)),
}
PREFIX = "tv_"


def parse_torchvision_name(name: str) -> str:
    """``"resnet50"``, ``"tv_resnet50"``, ``"ResNet-50"`` → ``"resnet50"``; ConfigError otherwise."""
    match = re.fullmatch(r"(?:tv_)?resnet[-_]?(\d+)", str(name).strip().lower())
    if not match or f"resnet{match.group(1)}" not in ARCHS:
        raise ConfigError(f"unknown torchvision ResNet {name!r}: expected one of "
                          f"{', '.join(PREFIX + n for n in ARCHS)} (or without the 'tv_' prefix)")
    return f"resnet{match.group(1)}"


def is_torchvision_name(arch: str | int) -> bool:
    """Whether an architecture name means a torchvision ResNet (``"tv_resnet50"``)."""
    return isinstance(arch, str) and arch.strip().lower().startswith(PREFIX)


class TorchvisionResNet(SkippableResNet):
    """An ImageNet ResNet with torchvision's layout: stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool),
    four stages of blocks, global average pool, ``fc``. Input: uint8 or float in [0, 1]."""

    #: The resolution the family is usually run at (FLOPs and benchmarks default to it).
    default_image_size = 224

    def __init__(self, name: str, num_classes: int = 1000, normalization: str | Sequence = "imagenet"):
        super().__init__()
        name = parse_torchvision_name(name)
        if num_classes < 1:
            raise ConfigError(f"num_classes must be positive, got {num_classes}")
        try:
            mean, std = _normalization(normalization)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        block_cls, layers = ARCHS[name]
        self.arch = {"family": "torchvision", "name": name, "num_classes": num_classes,
                     "normalization": [list(mean), list(std)]}
        # (x - mean) / std as one scale-and-shift (uint8 input folds in the /255), as CifarResNet;
        # not persistent, so torchvision state dicts (which lack them) load strictly.
        mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        self.register_buffer("input_shift", -mean_t / std_t, persistent=False)
        self.register_buffer("input_scale", 1 / std_t, persistent=False)
        self.register_buffer("input_scale_uint8", 1 / (255 * std_t), persistent=False)

        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_planes, blocks = 64, []
        for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), layers), start=1):
            stride = 1 if stage == 1 else 2
            out_planes = planes * block_cls.expansion
            downsample = None
            if stride != 1 or in_planes != out_planes:  # also ResNet-50's layer1.0: 64 -> 256 channels
                downsample = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                                           nn.BatchNorm2d(out_planes))
            layer = [block_cls(in_planes, planes, stride, downsample)]
            layer += [block_cls(out_planes, planes) for _ in range(count - 1)]
            self.add_module(f"layer{stage}", nn.Sequential(*layer))
            blocks += layer
            in_planes = out_planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        self.feature_dim = in_planes
        # A tuple, not a ModuleList: the blocks are registered under layer1..4 already.
        self._blocks = tuple(blocks)
        for m in self.modules():  # torchvision's initialisation (zero_init_residual=False)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # channels_last, as CifarResNet: faster convolutions on CPUs (oneDNN) and GPUs.
        self.to(memory_format=torch.channels_last)

    @property
    def depth(self) -> int:
        return int(self.arch["name"].removeprefix("resnet"))

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the input (uint8 or float in [0, 1]), then conv1, bn1, ReLU and max-pool."""
        x = x.contiguous(memory_format=memory_format_of(self.conv1.weight))
        scale = self.input_scale_uint8 if x.dtype == torch.uint8 else self.input_scale
        x = torch.addcmul(self.input_shift, x.float(), scale)
        return self.maxpool(conv_bn(self.conv1, self.bn1, x, relu=True))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(x), 1)


def build_torchvision_resnet(
    name: str,
    num_classes: int = 1000,
    weights: object = None,
    normalization: str | Sequence = "imagenet",
    progress: bool = True,
    new_head: bool = False,
) -> TorchvisionResNet:
    """A skippable torchvision ResNet: ``build_torchvision_resnet("resnet50", weights="DEFAULT")``.

    ``name``: resnet18/34/50/101/152 (``tv_`` prefix allowed). ``weights``: None (random init),
    a torchvision weights name (``"IMAGENET1K_V2"``, ``"DEFAULT"``, ``"ResNet50_Weights.IMAGENET1K_V1"``),
    the enum itself, or the path of a local checkpoint/state dict (a torchvision ``.pth`` or
    ours). ``normalization``: input statistics (``backbone.models.resnet.NORMALIZATION`` name or
    ``[mean, std]``). ``progress``: show a progress bar while downloading. ``new_head``: weights
    with another number of classes (ImageNet's 1000 for a 10-class task) are welcome: they load
    into a network of their own class count, whose ``fc`` is then :func:`replace_head`-ed by a
    fresh ``Linear(feature_dim, num_classes)``; without it such weights are a ``ConfigError``.
    """
    model = TorchvisionResNet(name, num_classes, normalization)
    if weights is None:
        return model
    from backbone.models.weights import load_weights  # weights imports this module

    if _is_file(weights):
        source = Path(weights)
        classes = weights_num_classes(name, weights) if new_head else num_classes
    else:
        enum_value = resolve_weights(model.arch["name"], weights)
        classes = len(enum_value.meta["categories"])
        if classes != num_classes and not new_head:
            raise ConfigError(f"weights {enum_value} have {classes} classes but num_classes={num_classes}: build with "
                              f"num_classes={classes}, then replace model.fc for another number of classes "
                              "(new_head=True does both)")
        source = fetch_weights(enum_value, progress)
    if classes == num_classes:
        return load_weights(model, source)
    pretrained = load_weights(TorchvisionResNet(name, classes, normalization), source)
    return replace_head(pretrained, num_classes)


def weights_num_classes(name: str, weights: object) -> int:
    """How many classes the classifier of ``weights`` (a name, an enum or a file) predicts."""
    if _is_file(weights):
        from backbone.models.weights import infer_arch, load_checkpoint

        return infer_arch(load_checkpoint(weights))["num_classes"]  # a file says it only in fc's rows
    return len(resolve_weights(name, weights).meta["categories"])


def replace_head(model: TorchvisionResNet, num_classes: int) -> TorchvisionResNet:
    """``model`` with a fresh classifier ``fc = Linear(feature_dim, num_classes)`` (PyTorch's
    default initialisation, on ``fc``'s device) and ``arch["num_classes"]`` updated, so checkpoints
    of it rebuild with ``model_from_arch``; the other layers keep their weights."""
    if num_classes < 1:
        raise ConfigError(f"num_classes must be positive, got {num_classes}")
    old = model.fc
    model.fc = nn.Linear(model.feature_dim, num_classes).to(old.weight.device)
    model.arch["num_classes"] = num_classes
    return model


def _is_file(weights: object) -> bool:
    return isinstance(weights, os.PathLike) or (isinstance(weights, str) and _looks_like_a_file(weights))


def _looks_like_a_file(weights: str) -> bool:
    # "ResNet50_Weights.IMAGENET1K_V2" has a dot too, so a suffix alone does not make a path.
    return os.path.isfile(weights) or os.sep in weights or weights.lower().endswith((".pth", ".pt", ".th", ".tar", ".bin"))


def resolve_weights(name: str, weights: object):
    """torchvision's weights enum value that ``weights`` (a name, ``"DEFAULT"`` or an enum) means."""
    from torchvision.models import WeightsEnum, get_model_weights

    enum_cls = get_model_weights(parse_torchvision_name(name))
    available = ", ".join([w.name for w in enum_cls] + ["DEFAULT"])
    if isinstance(weights, WeightsEnum):
        if not isinstance(weights, enum_cls):
            raise ConfigError(f"weights {weights} are for another network, not {name}: use {enum_cls.__name__}.{{{available}}}")
        return weights
    if not isinstance(weights, str):
        raise ConfigError(f"weights must be a name ({available}), a {enum_cls.__name__} or a file path, "
                          f"got {type(weights).__name__}")
    key = weights.strip().removeprefix(enum_cls.__name__ + ".")
    if key.upper() == "DEFAULT":
        return enum_cls.DEFAULT
    try:
        return enum_cls[key.upper()]
    except KeyError:
        raise ConfigError(f"unknown weights {weights!r} for {name}: expected one of {available} "
                          f"(or a .pth file path)") from None


def weights_cache_path(enum_value) -> Path:
    """Where torch hub keeps (and looks for) the file of a weights enum value."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(enum_value.url).path)


def fetch_weights(enum_value, progress: bool = True) -> Path:
    """The file of a weights enum value in torch hub's cache, downloaded into it first if missing
    (hash-checked, as torchvision does). Offline, one ``CheckpointError`` says which file to put where."""
    path = weights_cache_path(enum_value)
    if not path.is_file():
        match = torch.hub.HASH_REGEX.search(path.name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(enum_value.url, str(path), match.group(1) if match else None, progress=progress)
        except (OSError, RuntimeError) as err:  # URLError is an OSError; a hash mismatch a RuntimeError
            reason = getattr(err, "reason", None) or err
            raise CheckpointError(
                f"cannot download weights {enum_value} from {enum_value.url} ({reason}). Without internet, fetch "
                f"{path.name} elsewhere and put it in {path.parent}/ (torch hub's cache, "
                "torch.hub.get_dir()/checkpoints; TORCH_HOME moves it): it then loads without network"
            ) from err
    return path


def build_backbone(arch: str | int, num_classes: int, **kwargs) -> SkippableResNet:
    """Either family by name: ``"tv_resnet50"`` → :func:`build_torchvision_resnet` (``weights``,
    ``normalization``, ``progress``, ``new_head``), anything else (``"resnet56"``, ``56``) →
    ``build_resnet`` (``shortcut``, ``width``, ``normalization``). Each keeps its own defaults."""
    if is_torchvision_name(arch):
        allowed, build = {"weights", "normalization", "progress", "new_head"}, build_torchvision_resnet
    else:
        allowed, build = {"shortcut", "width", "normalization"}, build_resnet
    wrong = sorted(set(kwargs) - allowed)
    if wrong:
        family = "torchvision ResNets" if build is build_torchvision_resnet else "CIFAR ResNets"
        raise ConfigError(f"{', '.join(wrong)} do not apply to {family} ({arch!r}); they take {', '.join(sorted(allowed))}")
    return build(arch, num_classes, **kwargs)
