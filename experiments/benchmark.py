"""Does skipping blocks save wall-clock time? ``python -m experiments.benchmark [options]``.

For every architecture, batch size, keep rate and kind of mask, times the masked forward against
the full forward in the same process (interleaved repeats, warm-up, medians), so the ratios
hold on a noisy machine. One record per case:

- ``time_fraction`` = time masked / time full (the issue target: <= 0.40 at keep rate 0.25,
  ResNet-56, batch 256, CPU);
- ``flops_ratio`` = FLOPs full / FLOPs masked and ``time_ratio`` = time full / time masked;
- ``efficiency`` = time_ratio / flops_ratio: 1.0 means every saved FLOP is saved time.

Mask kinds: ``random`` (every block kept independently with the keep rate, per image) and
``patterns`` (4 fixed masks with exactly that share of blocks, rows assigned at random: what a
trained policy tends to produce).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from backbone.cost import measure_backbone_cost
from backbone.errors import ConfigError
from backbone.resnet import build_resnet
from backbone.train import resolve_device
from experiments.common import write_json


def make_masks(kind: str, batch: int, num_blocks: int, keep_rate: float, gen: torch.Generator) -> torch.Tensor:
    """A (batch, num_blocks) bool keep mask of the given kind and keep rate."""
    if kind == "random":
        return torch.rand(batch, num_blocks, generator=gen) < keep_rate
    if kind == "patterns":
        kept = max(1, round(keep_rate * num_blocks))
        patterns = torch.zeros(4, num_blocks, dtype=torch.bool)
        for p in patterns:
            p[torch.randperm(num_blocks, generator=gen)[:kept]] = True
        return patterns[torch.randint(0, 4, (batch,), generator=gen)]
    raise ConfigError(f"unknown mask kind {kind!r}: use random or patterns")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cases(fns: dict, device: torch.device, warmup: int, repeats: int) -> dict:
    """Median seconds per call of each function; calls are interleaved so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            tic = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - tic)
    return {name: statistics.median(values) for name, values in samples.items()}


def bench_skipping(arch: str, batch: int, keep_rates, mask_kinds, device, warmup: int, repeats: int, seed: int = 0):
    model = build_resnet(arch, num_classes=100).to(device).eval()
    cost = measure_backbone_cost(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=gen).to(device)
    masks = {(k, p): make_masks(k, batch, model.num_blocks, p, gen).to(device) for k in mask_kinds for p in keep_rates}
    fns = {"full": lambda: model(x)}
    for key, mask in masks.items():
        fns[key] = lambda mask=mask: model(x, mask)
    with torch.inference_mode():
        times = time_cases(fns, device, warmup, repeats)
    records = []
    for (kind, keep_rate), mask in masks.items():
        flops_ratio = cost.full_flops / cost.mask_flops(mask.cpu()).mean().item()
        time_ratio = times["full"] / times[(kind, keep_rate)]
        records.append({
            "bench": "skipping",
            "device": device_name(device),
            "arch": arch,
            "batch": batch,
            "keep_rate": keep_rate,
            "mask_kind": kind,
            "blocks_kept": mask.float().mean().item(),
            "time_full_ms": times["full"] * 1e3,
            "time_masked_ms": times[(kind, keep_rate)] * 1e3,
            "time_fraction": 1 / time_ratio,
            "flops_ratio": flops_ratio,
            "time_ratio": time_ratio,
            "efficiency": time_ratio / flops_ratio,
        })
    return records


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def print_table(records: list[dict]) -> None:
    header = f"{'arch':<10}{'batch':>6}{'mask':>10}{'keep':>6}{'full ms':>10}{'masked ms':>11}{'time frac':>10}{'FLOPs ratio':>12}{'time ratio':>11}{'efficiency':>11}"
    print(header)
    print("-" * len(header))
    for r in records:
        print(
            f"{r['arch']:<10}{r['batch']:>6}{r['mask_kind']:>10}{r['keep_rate']:>6.2f}{r['time_full_ms']:>10.1f}"
            f"{r['time_masked_ms']:>11.1f}{r['time_fraction']:>10.3f}{r['flops_ratio']:>12.2f}"
            f"{r['time_ratio']:>11.2f}{r['efficiency']:>11.2f}"
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--arch", nargs="+", default=["resnet56", "resnet110"])
    parser.add_argument("--batch", nargs="+", type=int, default=None, help="default: 1 256 (and 1024 on CUDA)")
    parser.add_argument("--keep", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    parser.add_argument("--masks", nargs="+", default=["random", "patterns"])
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per case (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="ResNet-56 only, fewer repeats")
    parser.add_argument("--json", type=Path, default=None, help="write the records to this file")
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
        if any(not 0 < p <= 1 for p in args.keep) or any(b < 1 for b in args.batch or [1]):
            raise ConfigError("keep rates must be in (0, 1] and batch sizes >= 1")
    except ConfigError as exc:
        parser.error(str(exc))
    archs = ["resnet56"] if args.quick else args.arch
    batches = args.batch or ([1, 256, 1024] if device.type == "cuda" else [1, 256])
    records = []
    for arch in archs:
        for batch in batches:
            repeats = args.repeats or (20 if batch == 1 else 5) // (2 if args.quick else 1)
            records += bench_skipping(arch, batch, args.keep, args.masks, device, args.warmup, max(repeats, 3))
            print(f"done: {arch} batch {batch}", flush=True)
    print_table(records)
    if args.json:
        write_json(args.json, {"records": records, "torch": torch.__version__})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
