"""The skipping benchmark's cases: masked vs full forward of a backbone, and where the masked
forward's time goes (convolutions, index work, page faults, per-block time shares). The CLI is
``experiments.benchmark``; see its docstring for the definitions of the recorded ratios."""

from __future__ import annotations

import platform
import resource

import torch

from backbone.cpu_allocator import allocator_setting
from backbone.errors import ConfigError
from backbone.models import fused, masked
from backbone.models.cost import measure_backbone_cost, median_ratio, median_times, peak_memory_mb, time_per_block
from backbone.models.torchvision_resnet import build_backbone, is_torchvision_name


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


#: Images per timed call at least: small batches run as a stream of calls, each with its own
#: masks (at batch 1 one image's mask decides which blocks run, so one draw would measure one
#: mask's luck, not the mask kind).
IMAGES_PER_CALL = 16


def bench_skipping(arch: str, batch: int, keep_rates, mask_kinds, device, warmup: int, repeats: int, seed: int = 0,
                   amp: bool = False, compile_blocks: bool = False, image_size: int | None = None):
    """Masked vs full forward of ``arch`` (a CIFAR ResNet, 100 classes, or ``tv_resnet50`` …, 1000
    classes) on ``image_size`` pixels (default: the family's, 32 or 224)."""
    num_classes = 1000 if is_torchvision_name(arch) else 100
    model = build_backbone(arch, num_classes).to(device).eval().compile_blocks(compile_blocks)
    image_size = image_size or getattr(model, "default_image_size", 32)
    cost = measure_backbone_cost(model, image_size)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, generator=gen).to(device)
    calls = max(1, IMAGES_PER_CALL // batch)
    masks = {
        (k, p): make_masks(k, batch * calls, model.num_blocks, p, gen).to(device).split(batch)
        for k in mask_kinds for p in keep_rates
    }
    fns = {"full": lambda: [model(x) for _ in range(calls)]}
    for key, stream in masks.items():
        fns[key] = lambda stream=stream: [model(x, mask) for mask in stream]
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        rounds: dict[str, list[float]] = {}
        times = median_times(fns, device, warmup, repeats, samples=rounds)
        faults = {name: page_faults_per_call(fn, calls) for name, fn in fns.items()}  # the state the timing saw
        memory = {name: peak_memory_mb(fn, device) for name, fn in fns.items()}
        where = {key: time_by_op_kind(fns[key]) for key in masks}
        block_times = time_per_block(model, x, device, repeats)
    records = []
    for (kind, keep_rate), stream in masks.items():
        mask = torch.cat(stream).cpu()
        split = where[(kind, keep_rate)]
        masked_ms = times[(kind, keep_rate)] * 1e3 / calls
        flops_ratio = cost.full_flops / cost.mask_flops(mask).mean().item()
        # Full ÷ masked within each round (adjacent in time), then the median: a machine whose
        # speed drifts by 5-10% between rounds (seen on the 2-core VMs) moves both alike.
        time_ratio = median_ratio(rounds["full"], rounds[(kind, keep_rate)])
        records.append({
            "bench": "skipping",
            "device": device_name(device),
            "arch": arch,
            "image_size": image_size,
            "batch": batch,
            "keep_rate": keep_rate,
            "mask_kind": kind,
            "dtype": "bf16" if amp else "fp32",
            "compiled": compile_blocks,
            "cpu_allocator": allocator_setting(),
            "max_ranges": masked.MAX_RANGES,
            "post_ops": fused.POST_OPS,  # convolutions with their BN, ReLU and sum fused (oneDNN, CPU)  # blocks on slices of the sorted rows (0: gathers only)
            "blocks_kept": mask.float().mean().item(),
            "distinct_masks": len(torch.unique(mask, dim=0)),
            "time_full_ms": times["full"] * 1e3 / calls,
            "time_masked_ms": times[(kind, keep_rate)] * 1e3 / calls,
            "time_fraction": 1 / time_ratio,
            "flops_ratio": flops_ratio,
            "time_ratio": time_ratio,
            "efficiency": time_ratio / flops_ratio,
            # The same saving judged by time instead of FLOPs: the share of the full forward's
            # time that the kept blocks take there (each block's share times the share of rows
            # that keep it; stem and head always), over the masked time's share. A block's time per FLOP differs by
            # stage (a 32x32 stage-1 block is ~1.4x slower per FLOP than an 8x8 one here), so this
            # one isolates the skipping machinery: gathers, scatters and per-call overheads.
            "kept_time_share": block_times.share(mask),
            "runner_efficiency": times["full"] * 1e3 / calls * block_times.share(mask) / masked_ms,
            # The efficiency a runner that skips at no cost would reach (about efficiency / runner
            # efficiency): the kept layers' share of the full forward's time against their share of
            # its FLOPs. Under 0.9, no runner can meet 0.9 there: the model's unskippable layers
            # (stem, head, pads) and its stage-1 blocks cost more time per FLOP than the rest.
            "efficiency_cap": 1 / block_times.share(mask) / flops_ratio,
            "peak_memory_full_mb": memory["full"],
            "peak_memory_masked_mb": memory[(kind, keep_rate)],
            # How many different row counts each block's convolutions ran with (a new count is a
            # new shape for oneDNN): over the blocks whose rows split, the mean and the maximum.
            **distinct_row_counts(stream),
            # Where the masked forward's time goes (profiler shares applied to the measured time).
            "conv_ms": split["conv"] * masked_ms,
            "index_ms": split["index"] * masked_ms,
            "other_ms": split["other"] * masked_ms,
            # Pages the kernel had to fault in (and zero) per forward: memory freed to the OS and
            # allocated again (backbone.cpu_allocator); 0 when freed memory stays in the process.
            "page_faults_full": faults["full"],
            "page_faults_masked": faults[(kind, keep_rate)],
        })
    return records


def distinct_row_counts(stream) -> dict:
    """Per block, the distinct numbers of kept rows over the calls of a stream of masks, counting
    only partial counts (0 and all rows need no gather and run the block's usual shape)."""
    counts = torch.stack([m.sum(0).cpu() for m in stream])  # (calls, blocks)
    sizes = torch.tensor([m.shape[0] for m in stream]).view(-1, 1)
    partial = (counts > 0) & (counts < sizes)
    per_block = [len(set(counts[partial[:, i], i].tolist())) for i in range(counts.shape[1])]
    return {"row_counts_per_block_mean": sum(per_block) / len(per_block), "row_counts_per_block_max": max(per_block)}


#: Operators that are index work of the masked runner (gathers, scatters, row lists).
INDEX_OPS = ("index_select", "index_copy", "nonzero", "index_put", "aten::index", "masked_select", "gather", "scatter")


def page_faults_per_call(fn, calls: int = 1) -> float:
    """Minor page faults of the whole process per forward during one ``fn()`` (Linux, macOS)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def time_by_op_kind(fn) -> dict[str, float]:
    """Shares of ``fn``'s operator time (torch.profiler, self CPU time of leaf operators) spent in
    convolutions, in index work (gathers and scatters of kept rows) and in everything else."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    totals = {"conv": 0.0, "index": 0.0, "other": 0.0}
    for event in prof.key_averages():
        name = event.key
        kind = "conv" if "conv" in name else "index" if any(op in name for op in INDEX_OPS) else "other"
        totals[kind] += event.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return {k: v / whole for k, v in totals.items()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


#: What docs/results.md and the issues hold the skipping machinery to.
TARGET_EFFICIENCY = 0.9


def print_table(records: list[dict]) -> None:
    header = (f"{'arch':<12}{'batch':>6}{'mask':>10}{'keep':>6}{'full ms':>10}{'masked ms':>11}{'time frac':>10}"
              f"{'FLOPs ratio':>12}{'time ratio':>11}{'efficiency':>11}{'peak MiB full/masked':>22}"
              f"{'runner eff':>11}{'cap':>6}{'rows/blk':>9}{'index ms':>9}{'other ms':>9}{'faults full/masked':>20}")
    print(header)
    print("-" * len(header))
    for r in records:
        print(
            f"{r['arch']:<12}{r['batch']:>6}{r['mask_kind']:>10}{r['keep_rate']:>6.2f}{r['time_full_ms']:>10.1f}"
            f"{r['time_masked_ms']:>11.1f}{r['time_fraction']:>10.3f}{r['flops_ratio']:>12.2f}"
            f"{r['time_ratio']:>11.2f}{r['efficiency']:>11.2f}{_mib(r['peak_memory_full_mb']):>11}/{_mib(r['peak_memory_masked_mb']):<10}"
            f"{r['runner_efficiency']:>11.2f}{r['efficiency_cap']:>6.2f}{r['row_counts_per_block_mean']:>9.1f}{r['index_ms']:>9.2f}{r['other_ms']:>9.2f}"
            f"{r['page_faults_full']:>11.0f}/{r['page_faults_masked']:<8.0f}"
        )
    short = [r for r in records if r["efficiency"] < TARGET_EFFICIENCY]
    print(f"{len(short)} of {len(records)} cases under an efficiency of {TARGET_EFFICIENCY}", end="")
    capped = sum(r["efficiency_cap"] < TARGET_EFFICIENCY for r in short)
    print(f": {capped} of them where even a runner at no cost stays under it (cap), "
          f"{len(short) - capped} where the runner's own cost decides" if short else "")



def _mib(value: float | None) -> str:
    # Peaks are a call's own allocations: well under 1 MiB for a CIFAR forward at batch 1.
    return "-" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.2f}"


