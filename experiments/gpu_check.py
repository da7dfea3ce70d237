"""All GPU checks in one go: ``python -m experiments.gpu_check [--out DIR]`` (under 8 minutes on one GPU).

For the machine that has a GPU only now and then: installs nothing beyond the project, asserts
what must hold, and ends with one summary (also in ``DIR/gpu_check.json``) to paste into
``docs/results.md``. Exit status 0 only when every check passed; 1 with the failures listed.

1. a tiny pretraining of the quickstart preset on CUDA (amp, channels_last, stochastic depth),
   rerun with --resume; no host synchronisation per training step;
2. correctness on its backbone: the masked forward on CUDA against each row run alone and
   against the CPU, fp32 against the amp dtype (bf16, or fp16 where bf16 is not native), the
   device data path against the CPU one; per-rung classifiers (path heads) likewise;
3. exact resume on CUDA under deterministic algorithms (``use_deterministic_training``);
4. compiled training with stochastic depth (``pretrain.compile``: the masked forward's blocks);
5. the distributed path with world size 1 (``torchrun --nproc_per_node=1``, NCCL);
6. ``experiments.benchmark --quick`` on CUDA (fp32, bf16, bf16 + compiled blocks): efficiency
   (saved time / saved FLOPs) at least ``MIN_EFFICIENCY`` at batch 1024.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable

# cuBLAS reads this when it starts (before any CUDA matmul): deterministic kernels for check 3.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

from backbone.data.batching import BatchLoader  # noqa: E402
from backbone.data.datasets import make_synthetic  # noqa: E402
from backbone.models.resnet import build_resnet  # noqa: E402
from backbone.training.interrupt import Interrupted, clear_stop, request_stop  # noqa: E402
from backbone.training.loop import TrainConfig, amp_dtype, train  # noqa: E402
from experiments.common import write_json  # noqa: E402

MIN_EFFICIENCY = 0.8
ROOT = Path(__file__).resolve().parents[1]


class CheckFailed(AssertionError):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def quickstart(out: Path, name: str, *extra: str):
    from experiments.config import load_config

    return load_config("quickstart", [f"output_dir={out}", f"name={name}", "device=cuda", "pretrain.epochs=3",
                                      "pretrain.warmup_epochs=0", *extra])


def tiny_pretrain(out: Path) -> dict:
    from experiments.pretrain import load_backbone, run_pretrain

    cfg = quickstart(out, "gpu_pretrain")
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    metrics = run_pretrain(cfg, cfg.run_dir, resume=True)
    again = run_pretrain(cfg, cfg.run_dir, resume=True)  # finished: skipped, same metrics
    check(again["test_accuracy"] == metrics["test_accuracy"], "--resume of a finished pretraining changed its metrics")
    check(metrics["test_accuracy"] > 0.3, f"tiny pretraining reached only {metrics['test_accuracy']:.3f} test accuracy")
    return {"wall_s": time.perf_counter() - tic, "test_accuracy": metrics["test_accuracy"],
            "train_time_s": metrics["train_time_s"], "backbone": load_backbone(cfg.run_dir, "cuda")}


def host_syncs_per_step(device: torch.device) -> dict:
    """Host-GPU synchronisations of training with stochastic depth (masks drawn on the host), in
    runs of 16 and 32 steps: the per-step path must have none (the epoch ends have a few)."""
    data = make_synthetic(512, num_classes=4, seed=1)
    counts = {}
    for steps in (16, 32):
        model = build_resnet(20, num_classes=4, width=8).to(device)
        cfg = TrainConfig(epochs=1, batch_size=512 // steps, lr=0.05, stochastic_depth=0.3, checkpoint_every_s=0)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train(model, data, None, cfg)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts[steps] = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
    extra = len(counts[32]) - len(counts[16])
    check(extra <= 0, f"{extra} more host synchronisations in 32 steps than in 16: {counts[32][:3]}")
    return {"syncs_16_steps": len(counts[16]), "syncs_32_steps": len(counts[32])}


def masked_forward(backbone: torch.nn.Module, device: torch.device) -> dict:
    """The batched masked forward equals each row run alone (fp32, TF32 off) and the CPU result;
    the amp dtype agrees with fp32 on the trained backbone's predictions."""
    model = backbone.to(device).eval()
    gen = torch.Generator().manual_seed(0)
    x = make_synthetic(64, num_classes=model.num_classes, seed=7).images
    mask = torch.rand(64, model.num_blocks, generator=gen) < 0.5
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    on_cpu = copy.deepcopy(model).cpu()  # outside inference mode: inference tensors have no version counter
    try:
        with torch.inference_mode():
            batched = model(x.to(device), mask.to(device)).cpu()
            rows = torch.cat([model(x[i : i + 1].to(device), mask[i : i + 1].to(device)).cpu() for i in range(64)])
            cpu = on_cpu(x, mask)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    dtype = amp_dtype(device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype):
        low = model(x.to(device), mask.to(device)).float().cpu()
    result = {
        "max_abs_diff_masked_vs_per_row": (batched - rows).abs().max().item(),
        "max_abs_diff_cuda_vs_cpu": (batched - cpu).abs().max().item(),
        "amp_dtype": str(dtype).replace("torch.", ""),
        "max_abs_diff_amp_vs_fp32": (low - batched).abs().max().item(),
        "amp_top1_agreement": (low.argmax(1) == batched.argmax(1)).float().mean().item(),
    }
    check(result["max_abs_diff_masked_vs_per_row"] < 1e-4, f"masked forward differs from per-row: {result}")
    check(result["max_abs_diff_cuda_vs_cpu"] < 1e-3, f"CUDA masked forward differs from the CPU: {result}")
    check(result["amp_top1_agreement"] >= 0.95, f"{result['amp_dtype']} disagrees with fp32: {result}")
    result.update(path_heads_forward(model, x, dtype, device))
    return result


def path_heads_forward(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype, device: torch.device) -> dict:
    """A ladder pair's per-rung classifiers (finetune.refit_heads) on CUDA: rows of four paths,
    batched against each row alone and against the CPU, and under autocast."""
    L = model.num_blocks
    ladder = torch.stack([torch.arange(L) < k for k in (L // 4 + 1, L // 2 + 1, 3 * L // 4 + 1, L)])
    heads = copy.deepcopy(model).attach_path_heads(ladder)
    with torch.no_grad():
        heads.path_heads.weight.add_(0.1 * torch.randn_like(heads.path_heads.weight))
    masks = ladder[torch.randint(0, 4, (len(x),), generator=torch.Generator().manual_seed(1))].to(device)
    on_cpu = copy.deepcopy(heads).cpu()
    with torch.inference_mode():
        batched = heads(x.to(device), masks).cpu()
        rows = torch.cat([heads(x[i : i + 1].to(device), masks[i : i + 1]).cpu() for i in range(len(x))])
        cpu = on_cpu(x, masks.cpu())
        with torch.autocast(device.type, dtype=dtype):
            low = heads(x.to(device), masks).float().cpu()
    result = {"path_heads_max_abs_diff_batched_vs_per_row": (batched - rows).abs().max().item(),
              "path_heads_max_abs_diff_cuda_vs_cpu": (batched - cpu).abs().max().item(),
              "path_heads_amp_top1_agreement": (low.argmax(1) == batched.argmax(1)).float().mean().item()}
    check(result["path_heads_max_abs_diff_batched_vs_per_row"] < 1e-3, f"path heads: batched differs from per-row: {result}")
    check(result["path_heads_max_abs_diff_cuda_vs_cpu"] < 1e-3, f"path heads: CUDA differs from the CPU: {result}")
    check(result["path_heads_amp_top1_agreement"] >= 0.95, f"path heads: amp disagrees with fp32: {result}")
    return result


def data_path(device: torch.device) -> dict:
    data = make_synthetic(256, num_classes=4, seed=1)
    cpu = list(BatchLoader(data, 32, augment=True, seed=5).epoch_batches(2))
    gpu = list(BatchLoader(data, 32, augment=True, seed=5, device=device).epoch_batches(2))
    same = all(torch.equal(a.cpu(), b) and torch.equal(la.cpu(), lb) for (a, la), (b, lb) in zip(gpu, cpu))
    check(same, "the CUDA data path (crops, flips, order) differs from the CPU one")
    return {"matches_cpu": same}


def exact_resume(device: torch.device, out: Path) -> dict:
    """Stopped mid-epoch and resumed equals uninterrupted, bit for bit, with deterministic
    kernels (fp32 and amp); a kernel without a deterministic version warns and turns the
    requirement into a tolerance of 1e-3."""
    from backbone.training.recipe import use_deterministic_training

    data, val = make_synthetic(256, num_classes=4, seed=3), make_synthetic(64, num_classes=4, seed=4)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, stochastic_depth=0.3, augment=True, checkpoint_every_s=0)
    use_deterministic_training()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.manual_seed(1)
            straight = build_resnet(8, num_classes=4, width=8).to(device)
            train(straight, data, val, cfg, checkpoint_dir=out / "straight", seed=5)
            steps = []

            def stop_at_step_11(*_):
                steps.append(1)
                if len(steps) == 11:
                    request_stop("SIGINT")

            torch.manual_seed(1)
            stopped = build_resnet(8, num_classes=4, width=8).to(device)
            try:
                train(stopped, data, val, cfg, checkpoint_dir=out / "stopped", seed=5, after_step=stop_at_step_11)
                raise CheckFailed("the stop request did not stop training")
            except Interrupted:
                pass
            finally:
                clear_stop()
            resumed = build_resnet(8, num_classes=4, width=8).to(device)
            train(resumed, data, val, cfg, checkpoint_dir=out / "stopped", seed=5, resume=True)
    finally:
        torch.use_deterministic_algorithms(False)
    nondeterministic = sorted({str(w.message).splitlines()[0][:120] for w in caught if "deterministic" in str(w.message)})
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))
    tolerance = 1e-3 if nondeterministic else 0.0
    check(diff <= tolerance, f"resumed run differs from the uninterrupted one by {diff:.3g} (allowed {tolerance})")
    return {"max_abs_diff": diff, "tolerance": tolerance, "nondeterministic_ops": nondeterministic}


def compiled_training(out: Path) -> dict:
    """``pretrain.compile`` with stochastic depth compiles the blocks the masked forward runs."""
    import torch._dynamo

    from experiments.pretrain import run_pretrain

    cfg = quickstart(out, "gpu_compiled", "pretrain.epochs=1", "pretrain.compile=true")
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    torch._dynamo.utils.counters.clear()
    tic = time.perf_counter()
    metrics = run_pretrain(cfg, cfg.run_dir)
    frames = int(torch._dynamo.utils.counters["frames"]["ok"])
    check(frames > 0, "pretrain.compile with stochastic depth compiled nothing")
    check(metrics["history"][-1]["train_loss"] == metrics["history"][-1]["train_loss"], "compiled training: NaN loss")
    return {"compiled_frames": frames, "wall_s": time.perf_counter() - tic, "test_accuracy": metrics["test_accuracy"]}


def ddp_world_size_1(out: Path, single_accuracy: float) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
               "experiments.pretrain", "--config", "quickstart", "--set", f"output_dir={out}", "--set", "name=gpu_ddp1",
               "--set", "device=cuda", "--set", "pretrain.epochs=3", "--set", "pretrain.warmup_epochs=0"]
    tic = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    check(result.returncode == 0, f"torchrun --nproc_per_node=1 failed ({result.returncode}): {result.stderr[-1500:]}")
    check("torchrun world size 1" in result.stdout, "the torchrun run did not take the distributed path")
    metrics = json.loads((out / "gpu_ddp1" / "metrics.json").read_text())["pretrain"]
    gap = abs(metrics["test_accuracy"] - single_accuracy)
    check(gap <= 0.05, f"world size 1 through the distributed path: test accuracy {metrics['test_accuracy']:.3f} vs "
                       f"{single_accuracy:.3f} without it")
    return {"wall_s": time.perf_counter() - tic, "test_accuracy": metrics["test_accuracy"], "accuracy_gap": gap}


def benchmarks(out: Path) -> dict:
    from experiments.benchmark import main as benchmark

    result, low = {}, []
    for name, extra in (("fp32", []), ("bf16", ["--amp"]), ("bf16_compiled", ["--amp", "--compile", "--bench", "skipping"])):
        path = out / f"benchmark_{name}.json"
        benchmark(["--device", "cuda", "--quick", "--json", str(path), *extra])
        result[name] = json.loads(path.read_text())["records"]
        low += [f"{name} {r['mask_kind']} keep {r['keep_rate']}: {r['efficiency']:.2f}" for r in result[name]
                if r["bench"] == "skipping" and r["batch"] == 1024 and r["efficiency"] < MIN_EFFICIENCY]
    check(not low, f"efficiency below {MIN_EFFICIENCY} at batch 1024: {'; '.join(low)}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="where results and the tiny runs go")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    if not torch.cuda.is_available():
        print("error: no CUDA device: this script checks the GPU paths (CPU figures: python -m experiments.benchmark)",
              file=sys.stderr)
        return 2
    device = torch.device("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "failures": {}}
    start = time.perf_counter()

    def run(name: str, fn: Callable[[], dict]):
        tic = time.perf_counter()
        try:
            summary[name] = fn()
            status = "PASS"
        except Exception as exc:  # every check runs; each failure is reported with its reason
            summary["failures"][name] = f"{type(exc).__name__}: {exc}"
            summary[name] = None
            status = "FAIL"
            if not isinstance(exc, CheckFailed):
                traceback.print_exc()
        print(f"[{status}] {name} ({time.perf_counter() - tic:.0f} s)", flush=True)
        return summary[name]

    pretrained = run("tiny_pretrain", lambda: tiny_pretrain(args.out))
    backbone = pretrained.pop("backbone") if pretrained else build_resnet(20, num_classes=10, width=8)
    run("host_syncs_per_step", lambda: host_syncs_per_step(device))
    run("masked_forward", lambda: masked_forward(backbone, device))
    run("data_path", lambda: data_path(device))
    run("exact_resume", lambda: exact_resume(device, args.out / "resume"))
    run("compiled_training", lambda: compiled_training(args.out))
    if pretrained:
        run("ddp_world_size_1", lambda: ddp_world_size_1(args.out, pretrained["test_accuracy"]))
    run("benchmarks", lambda: benchmarks(args.out))
    summary["wall_s"] = time.perf_counter() - start
    write_json(args.out / "gpu_check.json", summary)

    print("\n==== GPU check summary ====")
    print(f"device: {summary['device']}, torch {summary['torch']}, {summary['wall_s']:.0f} s")
    for name in ("tiny_pretrain", "host_syncs_per_step", "masked_forward", "data_path", "exact_resume",
                 "compiled_training", "ddp_world_size_1"):
        print(f"{name}: {summary.get(name)}")
    for name, records in (summary.get("benchmarks") or {}).items():
        for r in records:
            if r["bench"] == "skipping":
                print(f"{name} {r['arch']} batch {r['batch']:>5} {r['mask_kind']:>8} keep {r['keep_rate']:.2f}: "
                      f"time fraction {r['time_fraction']:.3f}, efficiency {r['efficiency']:.2f}, "
                      f"peak {r['peak_memory_masked_mb']:.0f} MiB")
            else:
                print(f"{name} {r}")
    print(f"written: {args.out / 'gpu_check.json'}")
    if summary["failures"]:
        print(f"\nFAILED {len(summary['failures'])} check(s):", file=sys.stderr)
        for name, reason in summary["failures"].items():
            print(f"  {name}: {reason}", file=sys.stderr)
        return 1
    print("all GPU checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
