"""Checkpoints: our own format, written atomically, and import of public CIFAR-ResNet and torchvision weights.

Our checkpoint is a plain dict that ``torch.load(..., weights_only=True)`` can read::

    {"format": "dyndepth", "version": 1, "arch": model.arch, "model": model.state_dict(), **extra}

``load_weights`` also takes the layouts public CIFAR ResNets are commonly published in (a bare
state dict or one under "state_dict"/"model"; "module." prefixes; a "linear" classifier;
"downsample" shortcuts), torchvision ResNet state dicts (``resnet50-*.pth``: keys as they are,
into a ``TorchvisionResNet``), and explains a mismatch in terms of the architecture (depth,
classes, family), not of key lists.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import warnings
from collections import Counter, OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from backbone.errors import CheckpointError, DyndepthError
from backbone.files import write_atomically
from backbone.models.resnet import CifarResNet, SkippableResNet
from backbone.models.torchvision_resnet import ARCHS as TV_ARCHS
from backbone.models.torchvision_resnet import TorchvisionResNet

FORMAT = "dyndepth"
VERSION = 1
ARCH_FIELDS = ("depth", "num_classes", "shortcut", "width")  # a CIFAR ResNet's arch
TV_ARCH_FIELDS = ("name", "num_classes")  # a torchvision ResNet's, with "family": "torchvision"

# Exact types, not isinstance: numpy.float64 subclasses float but pickles as a numpy global,
# which weights_only loading refuses.
_PLAIN = (str, bytes, bytearray, int, float, bool, complex, type(None),
          torch.dtype, torch.device, torch.Size)
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile wrappers
_RENAMES = (
    (re.compile(r"^linear\."), "fc."),
    (re.compile(r"^(layer\d+\.\d+)\.downsample\."), r"\1.shortcut."),
)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, **extra: Any) -> Path:
    """Write ``model`` and ``extra`` (epoch, metrics, optimizer/RNG state ...) to ``path``.

    ``extra`` may hold only tensors, dicts, lists, tuples and plain scalars, so that the file
    loads with ``weights_only=True``. The file is written under a temporary name and renamed into
    place: a crash or a full disk never damages an existing checkpoint at ``path``.
    """
    model = _unwrap(model)
    if not isinstance(getattr(model, "arch", None), dict):
        raise TypeError(f"save_checkpoint needs a skippable ResNet (with .arch), got {type(model).__name__}")
    reserved = sorted(set(extra) & {"format", "version", "arch"})
    if reserved:
        raise ValueError(f"extra fields {reserved} are reserved by the checkpoint format")
    for key, value in extra.items():
        _check_plain(value, key)
    payload = {"format": FORMAT, "version": VERSION, "arch": model.arch, "model": model.state_dict()}
    payload.update(extra)

    # Serialised in memory first: torch's zip writer hides why a file write failed ("unexpected
    # pos ..."), a plain write reports it ("No space left on device").
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return write_atomically(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint onto the CPU, never unpickling anything but tensors and plain data."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is a directory, not a file")
    try:
        with path.open("rb") as f:
            head = f.read(4)
        if not head:
            raise CheckpointError(f"checkpoint file {path} is empty")
        # torch.save writes a zip archive ("PK..."); legacy files and raw pickles start with 0x80.
        if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
            raise CheckpointError(f"{path} is not a PyTorch checkpoint (unrecognised file format)")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))  # what the weights-only unpickler refused
        if not found:
            detail = str(err).split(". ")[0]
            raise CheckpointError(f"checkpoint file {path} is truncated or corrupt ({detail})") from err
        raise CheckpointError(
            f"{path} is not a plain-tensor checkpoint: it needs Python objects ({found.group(1)}) "
            "and we refuse to unpickle them because that "
            "can run arbitrary code; if you trust its source, load it yourself with "
            "torch.load(weights_only=False) and pass its state dict to load_weights"
        ) from err
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, IndexError) as err:
        detail = str(err).split(". ")[0] or type(err).__name__  # torch's messages run long
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupt ({detail})") from err
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    if checkpoint.get("format") == FORMAT and checkpoint.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has dyndepth checkpoint format version {checkpoint['version']}; "
                              f"this dyndepth reads versions up to {VERSION}")
    return dict(checkpoint)


def load_weights(model: nn.Module, source: str | os.PathLike | Mapping, strict: bool = True) -> nn.Module:
    """Load a checkpoint file, or an already loaded checkpoint/state dict, into ``model``.

    Takes our checkpoints, the usual public CIFAR-ResNet layouts and torchvision ResNet state
    dicts (see the module docstring).
    ``strict=False`` tolerates missing and unexpected keys, never shape mismatches. Raises
    ``CheckpointError`` naming what differs (depth, classes, shortcut, width, keys, shapes).
    Returns ``model``.
    """
    if isinstance(source, Mapping):
        _load_into(_unwrap(model), source, "the given checkpoint", strict)
    else:
        _load_into(_unwrap(model), load_checkpoint(source), str(source), strict)
    return model


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> SkippableResNet:
    """Build the network described by a dyndepth checkpoint's ``arch`` (either family) and load its weights."""
    checkpoint = load_checkpoint(path)
    if checkpoint.get("format") != FORMAT:
        try:
            found = infer_arch(checkpoint)
            module = "torchvision_resnet" if _family(found) == "torchvision" else "resnet"
            call = f"{module}.{_build_call(found)}"
        except CheckpointError:
            call = "resnet.build_resnet(...) (or torchvision_resnet.build_torchvision_resnet(...))"
        raise CheckpointError(
            f"{path} is not a dyndepth checkpoint, so it does not say which network to build; build "
            f"the model with backbone.models.{call} and call backbone.models.weights.load_weights(model, path)"
        )
    arch = checkpoint.get("arch")
    try:
        model = model_from_arch(arch)
    except (TypeError, ValueError, KeyError, DyndepthError) as err:
        raise CheckpointError(f"{path} has an invalid 'arch' entry {arch!r}: {err}") from err
    _load_into(model, checkpoint, str(path), strict=True)
    return model.to(map_location)


def model_from_arch(arch: Mapping) -> SkippableResNet:
    """The network (fresh weights) that a ``model.arch`` dict of either family describes."""
    if arch.get("family") == "torchvision":
        model = TorchvisionResNet(arch["name"], arch["num_classes"], arch.get("normalization", "imagenet"))
    else:
        model = CifarResNet(**{k: arch[k] for k in (*ARCH_FIELDS, "normalization") if k in arch})
    # Per-path classifiers of a jointly fine-tuned ladder pair (finetune.path_heads): placeholders
    # here, their masks and weights come with the checkpoint's state dict.
    return model.attach_path_heads(int(arch["path_heads"])) if arch.get("path_heads") else model


def infer_arch(state_dict: Mapping) -> dict:
    """What a state dict (any accepted layout) is: a CIFAR ResNet's depth, num_classes, shortcut and
    width, or a torchvision ResNet's ``{"family": "torchvision", "name", "num_classes"}``."""
    state = _canonical_keys(_split(state_dict, "state dict")[0], "state dict")
    hints = _arch_hints(state, _state_family(state))
    unknown = [k for k in _fields(hints) if hints[k] is None]
    if unknown:
        raise CheckpointError(f"cannot infer {', '.join(unknown)}: the state dict has no conv1.weight, "
                              "layer1.<i>.* or fc/linear.weight keys matching a known layout, so it is not "
                              "a CIFAR ResNet or a torchvision ResNet")
    return hints


def _load_into(model: SkippableResNet, checkpoint: Mapping, name: str, strict: bool) -> None:
    state, declared = _split(checkpoint, name)
    family = _family(model.arch)
    # Our CIFAR spelling renames "downsample" to "shortcut"; torchvision keys stay as they are.
    state = _canonical_keys(state, name, cifar=family == "cifar")
    source_arch = declared if declared is not None else _arch_hints(state, _state_family(state) or family)
    expected = model.state_dict()
    for key, value in expected.items():
        # Checkpoints older than PyTorch 0.4.1 lack the BN counter; it does not affect outputs.
        bn = key.removesuffix("num_batches_tracked")
        if bn != key and key not in state and bn + "running_mean" in state:
            state[key] = value
    norm = (declared or {}).get("normalization")
    if norm is not None and not torch.allclose(torch.tensor(norm), torch.tensor(model.arch["normalization"])):
        warnings.warn(f"{name} was trained with input normalization {norm} but the model "
                      f"normalises with {model.arch['normalization']}", stacklevel=3)

    arch_diffs = _arch_differences(source_arch, model.arch)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} is {tuple(state[k].shape) if torch.is_tensor(state[k]) else type(state[k]).__name__} "
        f"in the checkpoint but {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in state and not (torch.is_tensor(state[k]) and state[k].shape == v.shape)
    ]
    if strict and arch_diffs:
        problems = arch_diffs  # the architecture explains the key and shape lists: leave them out
    else:
        problems = [f"missing keys {_few(missing)}"] if strict and missing else []
        problems += [f"unexpected keys {_few(unexpected)}"] if strict and unexpected else []
        problems += [f"shape mismatches: {_few(shapes)}"] if shapes else []
        problems = arch_diffs + problems if problems else []
    if problems:
        message = f"{name} does not fit the model: {'; '.join(problems)}"
        if arch_diffs and all(source_arch.get(k) is not None for k in _fields(source_arch)):
            message += f". A matching model is {_build_call(source_arch)}"
        raise CheckpointError(message)
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as err:  # not expected after the checks above; keep the error type
        raise CheckpointError(f"{name} could not be loaded into the model: {err}") from err


def _split(checkpoint: Mapping, name: str) -> tuple[dict, dict | None]:
    """The state dict inside ``checkpoint`` and, for our format, the declared ``arch``."""
    if checkpoint.get("format") == FORMAT:
        if not all(isinstance(checkpoint.get(k), Mapping) for k in ("model", "arch")):
            raise CheckpointError(f"{name} is a dyndepth checkpoint without a 'model' or 'arch' dict")
        return dict(checkpoint["model"]), dict(checkpoint["arch"])
    for key in ("state_dict", "model"):
        if isinstance(checkpoint.get(key), Mapping):
            return dict(checkpoint[key]), None
    if checkpoint and all(torch.is_tensor(v) for v in checkpoint.values()):
        return dict(checkpoint), None
    raise CheckpointError(f"{name} holds no state dict: expected tensors at the top level or under "
                          f"'state_dict' or 'model', found keys {_few(list(checkpoint))}")


def _canonical_keys(state: dict, name: str, cifar: bool = True) -> dict:
    """Our spelling of public keys: no wrapper prefix; for CIFAR models also linear -> fc and
    downsample -> shortcut."""
    renamed = {}
    for key, value in state.items():
        new = str(key)
        while new.startswith(_PREFIXES):
            new = new.split(".", 1)[1]
        for pattern, replacement in _RENAMES if cifar else ():
            new = pattern.sub(replacement, new)
        if new in renamed:
            raise CheckpointError(f"{name} has two keys that both mean {new!r} (e.g. 'fc.' and 'linear.')")
        renamed[new] = value
    return renamed


def _family(arch: Mapping) -> str:
    return "torchvision" if arch.get("family") == "torchvision" else "cifar"


def _fields(arch: Mapping) -> tuple[str, ...]:
    return TV_ARCH_FIELDS if _family(arch) == "torchvision" else ARCH_FIELDS


def _state_family(state: Mapping) -> str | None:
    """"torchvision" (a fourth stage, or a 7x7 first convolution), "cifar" or None (unknown)."""
    conv1 = state.get("conv1.weight")
    if any(k.startswith("layer4.") for k in state) or (torch.is_tensor(conv1) and conv1.dim() == 4 and conv1.shape[-1] == 7):
        return "torchvision"
    return "cifar" if any(k.startswith("layer1.") for k in state) else None


def _arch_hints(state: Mapping, family: str | None = "cifar") -> dict:
    """What the weights reveal about the architecture; None where they do not say."""
    def rows(key: str, ndim: int) -> int | None:
        value = state.get(key)
        return value.shape[0] if torch.is_tensor(value) and value.dim() == ndim else None

    if family == "torchvision":
        counts = tuple(1 + max((int(m.group(1)) for k in state if (m := re.match(rf"layer{s}\.(\d+)\.", k))), default=-1)
                       for s in (1, 2, 3, 4))
        expansion = 4 if any(re.match(r"layer1\.\d+\.conv3\.", k) for k in state) else 1
        name = next((n for n, (block, layers) in TV_ARCHS.items()
                     if layers == counts and block.expansion == expansion), None)
        return {"family": "torchvision", "name": name, "num_classes": rows("fc.weight", 2)}
    indices = [int(m.group(1)) for k in state if (m := re.match(r"layer1\.(\d+)\.", k))]
    blocks = max(indices) + 1 if indices else None
    conv_shortcut = any(re.match(r"layer\d+\.\d+\.shortcut\.", k) for k in state)
    return {
        "depth": 6 * blocks + 2 if blocks else None,
        "num_classes": rows("fc.weight", 2),
        # Option A has no parameters: a net with blocks but no shortcut keys is option A.
        "shortcut": "B" if conv_shortcut else ("A" if blocks else None),
        "width": rows("conv1.weight", 4),
    }


def _arch_differences(source: Mapping, model: Mapping) -> list[str]:
    if _family(source) != _family(model):
        return [f"checkpoint holds {_describe(source)} but the model is {_describe(model)}"]
    heads, model_heads = source.get("path_heads") or 0, model.get("path_heads") or 0
    if heads != model_heads:
        return [f"checkpoint has {heads} per-path classifiers (finetune.path_heads) but the model has "
                f"{model_heads}: build the network from the file with backbone.models.weights.load_model"]
    if _family(model) == "torchvision":
        diffs = []
        if source.get("name") not in (None, model["name"]):
            diffs.append(f"checkpoint is a torchvision {source['name']} but the model a {model['name']}")
        if source.get("num_classes") not in (None, model["num_classes"]):
            diffs.append(f"checkpoint classifier has {source['num_classes']} classes but the model "
                         f"{model['num_classes']}")
        return diffs
    diffs = []
    depth, model_depth = source.get("depth"), model["depth"]
    if depth is not None and depth != model_depth:
        diffs.append(f"checkpoint has {(depth - 2) // 6} blocks per stage (ResNet-{depth}) but the "
                     f"model has {(model_depth - 2) // 6} (ResNet-{model_depth})")
    if source.get("num_classes") not in (None, model["num_classes"]):
        diffs.append(f"checkpoint classifier has {source['num_classes']} classes but the model "
                     f"{model['num_classes']}")
    if source.get("shortcut") not in (None, model["shortcut"]):
        kind = ("option-B shortcuts (1x1 conv)" if source["shortcut"] == "B"
                else "option-A shortcuts (no parameters)")
        diffs.append(f"checkpoint uses {kind} but the model was built with shortcut={model['shortcut']!r}")
    if source.get("width") not in (None, model["width"]):
        diffs.append(f"checkpoint has width {source['width']} (first-stage channels) but the model "
                     f"{model['width']}")
    return diffs


def _check_plain(value: Any, where: str) -> None:
    """Refuse, before writing, a value that weights_only loading could not read back."""
    if type(value) in (dict, OrderedDict, Counter):  # Counter: MultiStepLR milestones
        for key, item in value.items():
            _check_plain(key, f"{where} key")
            _check_plain(item, f"{where}[{key!r}]")
    elif type(value) in (list, tuple, set):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not (torch.is_tensor(value) or type(value) in _PLAIN):
        raise CheckpointError(
            f"checkpoint field {where} is a {type(value).__module__}.{type(value).__qualname__}; only "
            "tensors, dicts, lists, tuples and plain scalars load safely (convert it, e.g. with float())"
        )


def _unwrap(model: nn.Module) -> nn.Module:
    """The network inside DataParallel/DDP (``.module``) or torch.compile (``._orig_mod``)."""
    while True:
        inner = getattr(model, "module", None)
        inner = inner if isinstance(inner, nn.Module) else getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _describe(arch: Mapping) -> str:
    if _family(arch) == "torchvision":
        return f"a torchvision {arch.get('name') or 'ResNet'}"
    return f"a CIFAR ResNet-{arch['depth']}" if arch.get("depth") else "a CIFAR ResNet"


def _build_call(arch: Mapping) -> str:
    if _family(arch) == "torchvision":
        return f"build_torchvision_resnet({arch['name']!r}, num_classes={arch['num_classes']})"
    return (f"build_resnet({arch['depth']}, num_classes={arch['num_classes']}, "
            f"shortcut={arch['shortcut']!r}, width={arch['width']})")


def _few(items: list, limit: int = 5) -> str:
    shown = ", ".join(str(item) for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
