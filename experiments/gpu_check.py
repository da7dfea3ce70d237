"""All GPU checks in one go: ``python -m experiments.gpu_check [--out DIR]`` (under 8 minutes on one GPU).

For the machine that has a GPU only now and then: installs nothing beyond the project, and ends
with one summary (also written to ``DIR/gpu_check.json``) to paste into ``docs/results.md``.

1. correctness: the masked forward on CUDA (fp32 and bf16 autocast) against the CPU result, and
   the device-side data path against the CPU one;
2. a tiny pretraining run of the quickstart preset on CUDA (bf16, channels_last), with --resume;
3. ``experiments.benchmark --quick`` on CUDA (skipping at batch 1/256/1024, VecEnv, training),
   in fp32, with bf16 autocast, and with bf16 plus compiled blocks (skipping only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from backbone.data.batching import BatchLoader
from backbone.data.datasets import make_synthetic
from backbone.models.resnet import build_resnet
from experiments.common import write_json


def check_masked_forward(device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_resnet("resnet56", num_classes=100).eval()
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    mask = torch.rand(64, model.num_blocks) < 0.5
    with torch.inference_mode():
        reference = model(x, mask)
        gpu = model.to(device)
        fp32 = gpu(x.to(device), mask.to(device)).cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = gpu(x.to(device), mask.to(device)).float().cpu()
    return {
        "max_abs_diff_fp32": (fp32 - reference).abs().max().item(),
        "max_abs_diff_bf16": (bf16 - reference).abs().max().item(),
        "bf16_top1_agreement": (bf16.argmax(1) == reference.argmax(1)).float().mean().item(),
    }


def check_data_path(device: torch.device) -> bool:
    data = make_synthetic(256, num_classes=4, seed=1)
    cpu = list(BatchLoader(data, 32, augment=True, seed=5).epoch_batches(2))
    gpu = list(BatchLoader(data, 32, augment=True, seed=5, device=device).epoch_batches(2))
    return all(torch.equal(a.cpu(), b) and torch.equal(la.cpu(), lb) for (a, la), (b, lb) in zip(gpu, cpu))


def tiny_pretrain(out: Path) -> dict:
    from experiments.config import load_config
    from experiments.pretrain import run_pretrain

    cfg = load_config("quickstart", [f"output_dir={out}", "name=gpu_pretrain", "device=cuda", "pretrain.epochs=3", "pretrain.warmup_epochs=0"])
    tic = time.perf_counter()
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    metrics = run_pretrain(cfg, cfg.run_dir, resume=True)
    return {"wall_s": time.perf_counter() - tic, "test_accuracy": metrics["test_accuracy"],
            "train_time_s": metrics["train_time_s"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="where results and the tiny run go")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA device: this script checks the GPU paths (CPU figures: python -m experiments.benchmark)",
              file=sys.stderr)
        return 2
    from experiments.benchmark import main as benchmark

    device = torch.device("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}
    summary["masked_forward"] = check_masked_forward(device)
    summary["data_path_matches_cpu"] = check_data_path(device)
    summary["tiny_pretrain"] = tiny_pretrain(args.out)
    for name, extra in (("fp32", []), ("bf16", ["--amp"]), ("bf16_compiled", ["--amp", "--compile", "--bench", "skipping"])):
        path = args.out / f"benchmark_{name}.json"
        benchmark(["--device", "cuda", "--quick", "--json", str(path), *extra])
        summary[f"benchmark_{name}"] = json.loads(path.read_text())["records"]
    write_json(args.out / "gpu_check.json", summary)

    print("\n==== GPU check summary ====")
    print(f"device: {summary['device']}, torch {summary['torch']}")
    print(f"masked forward vs CPU: {summary['masked_forward']}")
    print(f"device data path equals CPU: {summary['data_path_matches_cpu']}")
    print(f"tiny pretrain: {summary['tiny_pretrain']}")
    for name in ("fp32", "bf16", "bf16_compiled"):
        for r in summary[f"benchmark_{name}"]:
            if r["bench"] == "skipping":
                print(f"{name} {r['arch']} batch {r['batch']:>5} {r['mask_kind']:>8} keep {r['keep_rate']:.2f}: "
                      f"time fraction {r['time_fraction']:.3f}, efficiency {r['efficiency']:.2f}, "
                      f"peak {r['peak_memory_masked_mb']:.0f} MiB")
            else:
                print(f"{name} {r}")
    print(f"written: {args.out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
