"""Does skipping blocks save wall-clock time? ``python -m experiments.benchmark [options]``.

For every architecture, batch size, keep rate and kind of mask, times the masked forward against
the full forward in the same process (interleaved repeats, warm-up, medians; a time ratio is the
median over rounds of the ratio within a round), so the ratios hold on a noisy machine. One
record per case:

- ``time_fraction`` = time masked / time full (the issue target: <= 0.40 at keep rate 0.25,
  ResNet-56, batch 256, CPU);
- ``flops_ratio`` = FLOPs full / FLOPs masked and ``time_ratio`` = time full / time masked;
- ``efficiency`` = time_ratio / flops_ratio: 1.0 means every saved FLOP is saved time;
- ``runner_efficiency``: the share of the full forward's time its kept blocks take (per-block
  times, plus stem, head and the shortcuts that skipped downsampling blocks still run) over the
  masked/full time: 1.0 means skipping costs nothing beyond the work that runs. It differs from
  ``efficiency`` where a mask keeps blocks that are slower per FLOP than the average (stage 1);
- ``efficiency_cap`` = 1 / (``kept_time_share`` · flops_ratio), ≈ efficiency / runner_efficiency:
  what a runner skipping at no cost would reach (``cap``; under 0.9 no runner reaches 0.9). The
  table ends with how many cases fall under 0.9 and how many of those are so capped.

Mask kinds: ``random`` (every block kept independently with the keep rate, per image) and
``patterns`` (4 fixed masks with exactly that share of blocks, rows assigned at random: what a
trained policy tends to produce). Batches smaller than 16 run as a stream of calls, each with its
own masks, so batch 1 measures the mask kind rather than one draw. Peak memory: see
``backbone.models.cost.peak_memory_mb`` (the most memory a call holds at once above what was
allocated before it; on CPUs malloc's allocated bytes, read after every operator).
Beside each efficiency: how many distinct row counts each block ran with, the time outside
convolutions (index work: gathers and scatters; other: BatchNorm, ReLU, adds, ...) and the
minor page faults per forward (``backbone.cpu_allocator``: memory handed back to the kernel and
faulted in again, the cause of the unstable efficiencies on an AMD EPYC, see docs/results.md).

``--max-ranges 0`` turns off the inference path that runs a block on contiguous slices of the
rows sorted by mask (every split block then gathers and scatters, as before 2026-12-06, session 3).

ImageNet scale: ``--arch tv_resnet50 --bench skipping`` runs torchvision's ResNet-50 (16 blocks)
at 224 px, the family's size (``--image-size`` overrides it), at batch 1 and 32 unless ``--batch``
says otherwise; the other benches use the CIFAR archs of ``--arch`` and are skipped without one.

``--bench cascade --run DIR [--budget B]`` times the confidence cascade that ``experiments.cascade``
chose for the budget nearest B in DIR against the full backbone, on the run's test images (a
stream at batch 1 and one batch of 256; each stage runs on the rows still unanswered).

``--bench layout`` times the default channels_last layout against NCHW (forward and a training
step). ``--bench shortcut`` measures what the oneDNN AVX2 workaround (``backbone.models.resnet.PointwiseConv``)
costs a narrow option-B network against the plain strided convolution (whose weight gradient is
only timed where it is safe: on CPUs whose ATen capability is AVX-512). ``--bench env`` measures the batched VecEnv's env-steps/s against the masked backbone alone and
against SB3's ``DummyVecEnv`` of single environments (see ``bench_env``).
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from backbone.cpu_allocator import allocator_setting
from backbone.models.cost import median_times, peak_memory_mb
from backbone.data.datasets import make_synthetic
from backbone.errors import ConfigError
from backbone.models import fused, masked
from backbone.models.resnet import build_resnet
from backbone.models.torchvision_resnet import is_torchvision_name, parse_torchvision_name
from backbone.training.loop import resolve_device
from experiments.bench_skipping import _mib, bench_skipping, device_name, print_table
from experiments.common import write_json



def bench_env(arch: str, num_envs: int, keep_rate: float, device, warmup: int, repeats: int, seed: int = 0) -> dict:
    """Env-steps/s of the batched VecEnv vs the masked backbone alone vs a DummyVecEnv of single envs.

    Targets: VecEnv ≥ 0.8 × the backbone alone (its ceiling), and VecEnv ÷ DummyVecEnv close to
    the device's batch-vs-batch-1 inference ratio (what batching can give at most).
    """
    from stable_baselines3.common.vec_env import DummyVecEnv

    from envs.block_skip import BlockSkipEnv, SkipTask
    from envs.vec import BlockSkipVecEnv

    model = build_resnet(arch, num_classes=10)
    dataset = make_synthetic(4 * num_envs, num_classes=10, seed=seed)
    task = SkipTask(model, dataset, device=device)
    gen = torch.Generator().manual_seed(seed)
    actions = (torch.rand(num_envs, task.num_blocks, generator=gen) < keep_rate).numpy().astype("int8")
    images = dataset.images[:num_envs].to(device)
    mask = torch.as_tensor(actions, device=device).bool()
    vec = BlockSkipVecEnv(task, num_envs)
    dummy = DummyVecEnv([lambda: BlockSkipEnv(task=task) for _ in range(num_envs)])
    vec.reset(), dummy.reset()
    one = images[:1]
    with torch.inference_mode():
        times = median_times({
            "backbone": lambda: task.backbone(images, mask),
            "vec": lambda: vec.step(actions),
            "dummy": lambda: dummy.step(actions),
            "backbone_batch1": lambda: task.backbone(one, mask[:1]),
        }, device, warmup, repeats)
        memory = {k: peak_memory_mb(fn, device) for k, fn in
                  (("backbone", lambda: task.backbone(images, mask)), ("vec", lambda: vec.step(actions)),
                   ("dummy", lambda: dummy.step(actions)))}
    steps = {k: num_envs / times[k] for k in ("backbone", "vec", "dummy")}
    return {
        "bench": "env", "device": device_name(device), "arch": arch, "batch": num_envs, "keep_rate": keep_rate,
        "mask_kind": "random", "backbone_img_per_s": steps["backbone"], "vec_steps_per_s": steps["vec"],
        "dummy_steps_per_s": steps["dummy"], "vec_vs_backbone": steps["vec"] / steps["backbone"],
        "vec_vs_dummy": steps["vec"] / steps["dummy"],
        "batch_vs_batch1_inference": steps["backbone"] / (1 / times["backbone_batch1"]),
        **{f"peak_memory_{k}_mb": v for k, v in memory.items()},
    }


def print_env_table(records: list[dict]) -> None:
    print(f"{'arch':<10}{'envs':>6}{'keep':>6}{'backbone img/s':>16}{'VecEnv steps/s':>16}{'Dummy steps/s':>15}"
          f"{'Vec/backbone':>14}{'Vec/Dummy':>11}{'batch/batch-1':>15}")
    for r in records:
        print(f"{r['arch']:<10}{r['batch']:>6}{r['keep_rate']:>6.2f}{r['backbone_img_per_s']:>16.0f}{r['vec_steps_per_s']:>16.0f}"
              f"{r['dummy_steps_per_s']:>15.0f}{r['vec_vs_backbone']:>14.2f}{r['vec_vs_dummy']:>11.2f}{r['batch_vs_batch1_inference']:>15.2f}")
        print(f"peak memory (MiB): backbone {_mib(r['peak_memory_backbone_mb'])}, VecEnv step {_mib(r['peak_memory_vec_mb'])}, "
              f"DummyVecEnv step {_mib(r['peak_memory_dummy_mb'])}")


def bench_train(arch: str, batch: int, device, steps: int, seed: int = 0) -> dict:
    """Training images/s with the project's data path (uint8 dataset on the device, batches cut,
    augmented and normalised there) vs the same steps on one batch already prepared on the device.
    Target: ratio ≥ 0.8, i.e. the data path is never the bottleneck."""
    from backbone.data.batching import BatchLoader
    from backbone.training.loop import TrainConfig, build_optimizer

    dataset = make_synthetic(batch * (steps + 2), num_classes=10, seed=seed)
    model = build_resnet(arch, num_classes=10).to(device)
    optimizer = build_optimizer(model, TrainConfig())
    loader = BatchLoader(dataset, batch, device=device, shuffle=True, augment=True, drop_last=True, seed=seed)
    ready_images, ready_labels = next(iter(loader.epoch_batches(0)))

    def step(images, labels) -> None:
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def with_data_path() -> None:
        for i, (images, labels) in enumerate(loader.epoch_batches(1)):
            if i == steps:
                break
            step(images, labels)

    def on_device() -> None:
        for _ in range(steps):
            step(ready_images, ready_labels)

    times = median_times({"data_path": with_data_path, "on_device": on_device}, device, warmup=1, repeats=3)
    memory = {k: peak_memory_mb(fn, device) for k, fn in (("data_path", with_data_path), ("on_device", on_device))}
    return {
        "bench": "train", "device": device_name(device), "arch": arch, "batch": batch,
        "data_path_img_per_s": steps * batch / times["data_path"], "on_device_img_per_s": steps * batch / times["on_device"],
        "ratio": times["on_device"] / times["data_path"],
        "peak_memory_data_path_mb": memory["data_path"], "peak_memory_on_device_mb": memory["on_device"],
    }


def bench_layout(arch: str, batches, device, warmup: int, repeats: int, train_batch: int = 128) -> list[dict]:
    """The default channels_last layout against NCHW, same weights, one process: forward at each
    batch size and one training step (why the models are channels_last by default)."""
    import copy

    records = []
    nhwc = build_resnet(arch, num_classes=100).to(device)
    nchw = copy.deepcopy(nhwc).to(memory_format=torch.contiguous_format)
    for batch in batches:
        x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8).to(device)
        with torch.inference_mode():
            nhwc.eval(), nchw.eval()
            times = median_times({"nchw": lambda: nchw(x), "nhwc": lambda: nhwc(x)}, device, warmup, repeats)
        records.append({"case": f"forward batch {batch}", **times})
    x = torch.randint(0, 256, (train_batch, 3, 32, 32), dtype=torch.uint8).to(device)
    y = torch.randint(0, 100, (train_batch,)).to(device)
    nhwc.train(), nchw.train()
    steps = {k: (lambda m=m: torch.nn.functional.cross_entropy(m(x), y).backward()) for k, m in (("nchw", nchw), ("nhwc", nhwc))}
    records.append({"case": f"training step batch {train_batch}", **median_times(steps, device, 1, 3)})
    return [{"bench": "layout", "device": device_name(device), "arch": arch, "case": r["case"],
             "nchw_ms": r["nchw"] * 1e3, "nhwc_ms": r["nhwc"] * 1e3, "speedup": r["nchw"] / r["nhwc"]} for r in records]


def bench_shortcut(device, warmup: int, repeats: int, width: int = 6, batch: int = 128) -> list[dict]:
    """Option-B ResNet-20 of ``width`` < 8: the workaround's subsampled 1x1 shortcut against the
    plain strided ``nn.Conv2d`` with the same weights (forward at ``batch``; a training step too
    where oneDNN's faulty AVX2 kernel is not the one that would run)."""
    import copy

    from backbone.models.resnet import PointwiseConv

    safe_native = device.type != "cpu" or onednn_runs_avx512()
    fixed = build_resnet(20, num_classes=100, shortcut="B", width=width).to(device)
    native = copy.deepcopy(fixed)
    for block in native.blocks:
        if block.downsamples and isinstance(block.shortcut[0], PointwiseConv):
            old = block.shortcut[0]
            plain = torch.nn.Conv2d(old.in_channels, old.out_channels, 1, stride=old.stride, bias=False)
            plain.weight = old.weight
            block.shortcut[0] = plain
    x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8).to(device)
    y = torch.randint(0, 100, (batch,)).to(device)
    with torch.inference_mode():
        fixed.eval(), native.eval()
        times = median_times({"native": lambda: native(x), "workaround": lambda: fixed(x)}, device, warmup, repeats)
    records = [{"case": f"forward batch {batch}", **times}]
    if safe_native:
        fixed.train(), native.train()
        steps = {k: (lambda m=m: torch.nn.functional.cross_entropy(m(x), y).backward())
                 for k, m in (("native", native), ("workaround", fixed))}
        records.append({"case": f"training step batch {batch}", **median_times(steps, device, 1, repeats)})
    return [{"bench": "shortcut", "device": device_name(device), "arch": f"resnet20 B width {width}", "case": r["case"],
             "native_ms": r["native"] * 1e3, "workaround_ms": r["workaround"] * 1e3,
             "slowdown": r["workaround"] / r["native"], "native_backward_timed": safe_native} for r in records]


def bench_pair(run_dir: Path, repeats: int, stream: int = 64, batch: int = 256, tag: str = "policy") -> list[dict]:
    """The trained dynamic model of a run (policy ``tag`` + masked backbone, as ``experiments.evaluate``
    loads it) against its full backbone, on the run's test images: a stream of ``stream``
    different images at batch 1 and one batch of ``batch``; efficiency includes the policy's FLOPs."""
    from agents.evaluation import pair_latency, policy_flops
    from agents.rl import make_skip_task
    from backbone.data.datasets import load_splits
    from experiments.evaluate import load_final_pair

    cfg, name, model, ladder, pair, device = load_final_pair(run_dir, tag)
    test = load_splits(cfg.data).test
    extra = policy_flops(model, make_skip_task(cfg.policy, pair.backbone, test.subset(range(8)), device, ladder), cfg.policy.env)
    rows = pair_latency(pair, test, batch, stream, repeats, device, extra, breakdown=True)
    return [{"bench": "pair", "run": str(run_dir), "model": name, "device": device_name(device), **r} for r in rows]


def bench_cascade(run_dir: Path, budget: float, repeats: int, device, stream: int = 64, batch: int = 256) -> list[dict]:
    """The cascade ``experiments.cascade`` chose for ``budget`` in ``run_dir`` against the run's
    full backbone, on the run's test images (``agents.cascade.cascade_latency``)."""
    from agents.cascade import cascade_latency
    from backbone.data.datasets import load_splits
    from experiments.deployed_cascade import load_cascade
    from experiments.pretrain import load_backbone

    row, cascade, flops, cfg = load_cascade(run_dir, budget, device)
    full = load_backbone(run_dir, device).eval()
    test = load_splits(cfg.data).test
    rows = cascade_latency(cascade, full, test.images, flops, batch, stream, repeats, device)
    return [{"bench": "cascade", "run": str(run_dir), "budget": row["budget"], "chain": row["chain"],
             "device": device_name(device), **r} for r in rows]


def onednn_runs_avx512() -> bool:
    """Whether oneDNN's AVX-512 kernels run here: the CPU has them (ATen's capability) and no
    ``ONEDNN_MAX_CPU_ISA`` / ``DNNL_MAX_CPU_ISA`` caps oneDNN below them."""
    import os

    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    uncapped = cap == "ALL" or cap.startswith(("AVX512", "AVX10", "AMX"))
    return uncapped and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def cpu_info() -> dict:
    """CPU model and the ISA extensions that decide which oneDNN kernels run (lscpu on Linux), so
    that figures from different machines can be told apart."""
    info = {"machine": platform.machine(), "aten_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_avx512": onednn_runs_avx512(), "threads": torch.get_num_threads()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    info["model_name"] = fields.get("model name", platform.processor())
    info["avx2"] = "avx2" in flags
    info["avx512"] = sorted(f for f in flags if f.startswith("avx512"))
    info["amx"] = sorted(f for f in flags if f.startswith("amx"))
    return info


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
    parser.add_argument("--amp", action="store_true", help="skipping cases under bf16 autocast (CUDA)")
    parser.add_argument("--compile", action="store_true", help="skipping cases with torch.compile'd blocks (compile_blocks)")
    parser.add_argument("--max-ranges", type=int, default=None,
                        help="a block runs on slices of the sorted batch when its kept rows form at most this many "
                             "ranges (default: backbone.models.masked.MAX_RANGES; 0: always gather and scatter)")
    parser.add_argument("--no-post-ops", action="store_true",
                        help="convolutions without their fused BN-ReLU-sum post-ops (backbone.models.fused.POST_OPS off)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="skipping cases' input size (default: the family's, 32 CIFAR / 224 torchvision)")
    parser.add_argument("--json", type=Path, default=None, help="write the records to this file")
    parser.add_argument("--run", type=Path, default=None,
                        help="--bench pair / cascade: the run directory whose trained pair or chosen cascade to time")
    parser.add_argument("--budget", type=float, default=0.7, help="--bench cascade: the FLOPs budget whose cascade to time")
    parser.add_argument("--tag", default="policy", help="--bench pair: which of the run's policies (e.g. lam0.055)")
    parser.add_argument("--bench", nargs="+", default=["skipping", "env", "train", "layout", "shortcut"],
                        choices=["skipping", "env", "train", "layout", "shortcut", "pair", "cascade"],
                        help="skipping: masked vs full forward; env: VecEnv throughput; train: data path vs tensors "
                             "on the device; layout: channels_last vs NCHW; shortcut: the oneDNN AVX2 workaround's cost; "
                             "pair: a run's trained policy + masked backbone (--run); cascade: the confidence cascade "
                             "experiments.cascade chose for --budget in --run")
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
        if any(not 0 < p <= 1 for p in args.keep) or any(b < 1 for b in args.batch or [1]):
            raise ConfigError("keep rates must be in (0, 1] and batch sizes >= 1")
        if args.max_ranges is not None and args.max_ranges < 0:
            raise ConfigError(f"--max-ranges must be >= 0, got {args.max_ranges}")
        for arch in filter(is_torchvision_name, args.arch):
            parse_torchvision_name(arch)  # a bad name fails now, not after the first cases
        if "cascade" in args.bench and args.run is not None:
            from experiments.deployed_cascade import chosen_cascade

            chosen_cascade(args.run, args.budget)  # a run without cascades fails before any timing
    except ConfigError as exc:
        parser.error(str(exc))
    if args.max_ranges is not None:
        masked.MAX_RANGES = args.max_ranges
    if args.no_post_ops:
        fused.POST_OPS = False
    archs = ["resnet56"] if args.quick else args.arch
    batches = args.batch or ([1, 256, 1024] if device.type == "cuda" else [1, 256])
    records = []
    if "skipping" in args.bench:
        for arch in archs:
            imagenet = is_torchvision_name(arch)  # ~0.1-1 s per 224 px image on a CPU: fewer, smaller cases
            for batch in args.batch or ([1, 32] if imagenet else batches):
                repeats = args.repeats or (3 if imagenet else (20 if batch == 1 else 7) // (2 if args.quick else 1))
                records += bench_skipping(arch, batch, args.keep, args.masks, device, args.warmup, max(repeats, 3),
                                          amp=args.amp, compile_blocks=args.compile,
                                          image_size=args.image_size)
                print(f"done: {arch} batch {batch}", flush=True)
        print_table(records)
    # The other benches are about the CIFAR path (32 px data, the VecEnv, the oneDNN workaround).
    archs = [a for a in archs if not is_torchvision_name(a)]
    others = [b for b in args.bench if b not in ("skipping", "shortcut")]
    if others and not archs:
        print(f"skipped {', '.join(others)}: they need a CIFAR arch in --arch")
        args.bench = [b for b in args.bench if b not in others]
    if "env" in args.bench:
        env_records = [bench_env(archs[0], max(batches), 0.5, device, args.warmup, args.repeats or 5)]
        print()
        print_env_table(env_records)
        records += env_records
    if "train" in args.bench:
        r = bench_train(archs[0], 128, device, steps=3 if device.type == "cpu" else 20)
        print(f"\ntraining {r['arch']} batch {r['batch']}: {r['data_path_img_per_s']:.0f} img/s with the data path, "
              f"{r['on_device_img_per_s']:.0f} img/s on prepared tensors: ratio {r['ratio']:.2f}; peak memory "
              f"{_mib(r['peak_memory_data_path_mb'])} / {_mib(r['peak_memory_on_device_mb'])} MiB")
        records.append(r)
    if "layout" in args.bench:
        print()
        for r in bench_layout(archs[0], batches, device, args.warmup, args.repeats or 5):
            print(f"layout {r['arch']} {r['case']}: NCHW {r['nchw_ms']:.2f} ms, channels_last {r['nhwc_ms']:.2f} ms, "
                  f"speed-up {r['speedup']:.2f}x")
            records.append(r)
    if "shortcut" in args.bench:
        print()
        for r in bench_shortcut(device, args.warmup, args.repeats or 10):
            print(f"shortcut {r['arch']} {r['case']}: plain strided conv {r['native_ms']:.2f} ms, workaround "
                  f"{r['workaround_ms']:.2f} ms, slowdown {r['slowdown']:.2f}x")
            records.append(r)
    if "pair" in args.bench:
        if args.run is None:
            parser.error("--bench pair needs --run DIR (a run directory with a trained policy)")
        print()
        for r in bench_pair(args.run, args.repeats or 10, tag=args.tag):
            print(f"pair {r['model']} batch {r['batch']} ({r['images']} images, {r['distinct_masks']} masks): full "
                  f"{r['full_ms']:.2f} ms, dynamic {r['dynamic_ms']:.2f} ms per call; time ratio {r['time_ratio']:.2f}, "
                  f"FLOPs ratio {r['flops_ratio']:.2f}, efficiency {r['efficiency']:.2f}")
            print(f"  where it goes: masked backbone alone {r['masked_backbone_ms']:.2f} ms, policy {r['policy_ms']:.2f} ms; "
                  f"kept blocks' share of the full time {r['kept_time_share']:.3f} (cost model {r['cost_model_efficiency']:.2f}), "
                  f"runner {r['runner_efficiency']:.2f}")
            records.append(r)
    if "cascade" in args.bench:
        if args.run is None:
            parser.error("--bench cascade needs --run DIR (a run directory where experiments.cascade ran)")
        print()
        for r in bench_cascade(args.run, args.budget, args.repeats or 10, device):
            print(f"cascade {' > '.join(r['chain'])} (budget {r['budget']}) batch {r['batch']} ({r['images']} images, "
                  f"{100 * r['sent_on']:.0f}% sent on): full {r['full_ms']:.2f} ms, cascade {r['cascade_ms']:.2f} ms per call; "
                  f"time ratio {r['time_ratio']:.2f}, FLOPs ratio {r['flops_ratio']:.2f}, efficiency {r['efficiency']:.2f}")
            print(f"  where it goes: the first network alone {r['first_stage_ms']:.2f} ms per call, its own efficiency "
                  f"{r['first_stage_efficiency']:.2f}")
            records.append(r)
    if args.json:
        write_json(args.json, {"records": records, "torch": torch.__version__, "cpu": cpu_info(),
                               "cpu_allocator": allocator_setting()})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
