"""The benchmark CLI writes one record per case with the fields the speed issue asks for."""

import json

import pytest

from experiments import benchmark


def test_records_have_the_tracked_fields(tmp_path, capsys):
    out = tmp_path / "bench.json"
    benchmark.main(["--arch", "resnet8", "--batch", "1", "8", "--keep", "0.5", "--bench", "skipping", "train", "layout", "shortcut",
                    "--repeats", "1", "--warmup", "0", "--json", str(out)])
    written = json.loads(out.read_text())
    records = written["records"]
    # The CPU model and ISA are recorded, so figures from different machines can be told apart.
    assert {"model_name", "aten_capability", "avx2", "avx512", "amx"} <= set(written["cpu"])
    assert written["cpu_allocator"] in ("tuned", "system")
    skipping = [r for r in records if r["bench"] == "skipping"]
    assert {(r["batch"], r["mask_kind"]) for r in skipping} == {(1, "random"), (1, "patterns"), (8, "random"), (8, "patterns")}
    for r in skipping:
        for key in ("device", "arch", "batch", "keep_rate", "mask_kind", "flops_ratio", "time_ratio", "efficiency",
                    "cpu_allocator", "page_faults_full", "page_faults_masked", "row_counts_per_block_mean"):
            assert key in r, key
        # Where the masked time goes: convolutions, index work and the rest add up to the time.
        assert r["index_ms"] >= 0 and r["other_ms"] >= 0 and r["conv_ms"] > 0
        assert r["conv_ms"] + r["index_ms"] + r["other_ms"] == pytest.approx(r["time_masked_ms"])
        assert r["flops_ratio"] > 1 and r["efficiency"] == pytest.approx(r["time_ratio"] / r["flops_ratio"])
        # The cap splits the efficiency into the runner's share and the model's own time mix.
        assert 0 < r["kept_time_share"] < 1
        assert r["efficiency_cap"] == pytest.approx(1 / (r["kept_time_share"] * r["flops_ratio"]))
        assert r["peak_memory_full_mb"] is None or r["peak_memory_full_mb"] > 0
    # Batch 1 runs a stream of 16 images with their own masks; "patterns" has at most 4 masks.
    assert next(r for r in skipping if r["batch"] == 1 and r["mask_kind"] == "random")["distinct_masks"] > 4
    assert next(r for r in skipping if r["batch"] == 1 and r["mask_kind"] == "patterns")["distinct_masks"] <= 4
    assert any(r["bench"] == "train" and r["ratio"] > 0 for r in records)
    layout = [r for r in records if r["bench"] == "layout"]
    assert [r["case"] for r in layout] == ["forward batch 1", "forward batch 8", "training step batch 128"]
    assert all(r["speedup"] > 0 for r in layout)
    shortcut = [r for r in records if r["bench"] == "shortcut"]
    assert shortcut and all(r["slowdown"] > 0 for r in shortcut)
    printed = capsys.readouterr().out
    short = sum(r["efficiency"] < 0.9 for r in skipping)
    assert "efficiency" in printed and f"{short} of {len(skipping)} cases under an efficiency of 0.9" in printed


def test_bad_arguments_exit_with_a_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--keep", "1.5"])
    assert exit_info.value.code == 2 and "keep rates" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--max-ranges", "-1"])
    assert exit_info.value.code == 2 and "--max-ranges" in capsys.readouterr().err


def test_max_ranges_0_times_the_gather_path(tmp_path, monkeypatch):
    """``--max-ranges 0`` (recorded) sends every split block through gather and scatter; by
    default the benchmark's few-mask case runs every block on slices, with no gather."""
    from backbone.models import masked

    monkeypatch.setattr(masked, "MAX_RANGES", masked.MAX_RANGES)  # restored after the test
    gathers = {}
    take_rows = masked.take_rows
    monkeypatch.setattr(masked, "take_rows", lambda x, rows: gathers.__setitem__(ranges, gathers[ranges] + 1) or take_rows(x, rows))
    for ranges in ("0", str(masked.MAX_RANGES)):
        gathers[ranges] = 0
        out = tmp_path / f"bench{ranges}.json"
        benchmark.main(["--arch", "resnet20", "--batch", "64", "--keep", "0.5", "--masks", "patterns", "--bench", "skipping",
                        "--repeats", "1", "--warmup", "0", "--max-ranges", ranges, "--json", str(out)])
        (record,) = json.loads(out.read_text())["records"]
        assert record["max_ranges"] == int(ranges)
    assert gathers["0"] > 0 and gathers[str(masked.MAX_RANGES)] == 0


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_check_says_clearly_when_there_is_no_gpu(tmp_path, capsys):
    from experiments import gpu_check

    assert gpu_check.main(["--out", str(tmp_path / "gpu")]) == 2
    assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "gpu").exists()


def test_gpu_checks_masked_forward_and_path_heads_run_on_the_cpu(monkeypatch):
    """The GPU check's correctness part (check 2, path heads included) on the CPU with bf16
    autocast: the machine with a GPU is lent rarely, so its code must not wait for it to fail."""
    import torch

    from backbone.models.resnet import build_resnet
    from experiments import gpu_check

    torch.manual_seed(0)
    model = build_resnet(20, num_classes=10, width=8).eval()
    for block in model.blocks:  # blocks that are not the identity
        torch.nn.init.ones_(block.bn2.weight)
    monkeypatch.setattr(gpu_check, "amp_dtype", lambda device: torch.bfloat16)
    result = gpu_check.masked_forward(model, torch.device("cpu"))
    assert result["max_abs_diff_masked_vs_per_row"] < 1e-4 and result["path_heads_max_abs_diff_batched_vs_per_row"] < 1e-3
    assert result["amp_dtype"] == "bfloat16" and result["path_heads_amp_top1_agreement"] >= 0.95
