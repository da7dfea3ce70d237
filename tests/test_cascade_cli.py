"""experiments.cascade on a finished study: cascades of the comparison's own networks, the
envelope's missing subsets, and another run's networks (--with-run) with averaged answers."""

import json
import shutil

import pytest
import torch

from backbone.models.weights import load_model
from experiments.deployed_cascade import load_cascade
from tiny_study import run


def test_cascade_cli_scores_cascades_of_the_comparisons_own_networks(study, tmp_path):
    work = tmp_path  # a copy: the study is shared, and this writes its metrics
    shutil.copytree(study[0] / "runs" / "tiny", work / "runs" / "tiny")
    result = run("--run", "runs/tiny", "--budgets", "0.5", "0.9", "--json", cwd=work, module="experiments.cascade")
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    networks = {n["name"]: n for n in out["networks"]}
    assert networks["full backbone"]["flops_ratio"] == 1.0 and any(n.startswith("subset_k") for n in networks)
    # The comparison's fine-tuned last stages are networks of the study too (static points of the envelope).
    cheapest = min((n for n in networks if n.startswith("subset_")), key=lambda n: networks[n]["flops_ratio"])
    assert {"full backbone + fine-tuning", f"full backbone, focused on {cheapest}"} <= set(networks)
    assert out["cascades"] and out["difficulty_groups"].startswith("the dataset's difficulty levels")
    for c in out["cascades"]:
        assert networks[c["small"]]["flops_ratio"] <= c["budget"]  # chosen among the networks that fit
        # FLOPs: each network of the chain times the share of images that reached it.
        reached = [sum(c["answered_by"][i:]) for i in range(len(c["chain"]))]
        assert c["flops_ratio"] == pytest.approx(sum(networks[n]["flops_ratio"] * r for n, r in zip(c["chain"], reached)))
        assert c["static"]["single"]["flops_ratio"] <= c["flops_ratio"] + 1e-9
        assert c["static"]["mixture"]["accuracy"] >= c["static"]["single"]["accuracy"]
        assert c["gain_over_static"] == pytest.approx(c["accuracy"] - c["static"]["mixture"]["accuracy"])
        assert 0 <= c["gain_standard_error"] < 0.1  # paired over the 120 test images
        assert sum(c["adaptivity"]["blocks_histogram"]) == 120
    assert json.loads((work / "runs" / "tiny" / "metrics.json").read_text())["cascade"]["cascades"] == out["cascades"]


def test_cascade_cli_fine_tunes_the_subsets_its_envelope_lacks(study, tmp_path):
    work, _ = study
    run_dir = tmp_path / "runs" / "tiny"
    shutil.copytree(work / "runs" / "tiny", run_dir)
    plain = sorted((p for p in (run_dir / "baselines").glob("subset_k*.pt") if "focused" not in p.stem),
                   key=lambda p: int(p.stem.removeprefix("subset_k")))
    dearest = plain[-1].stem  # not the first stage, whose unsure images the focused networks learn
    (run_dir / "baselines" / f"{dearest}.pt").unlink()
    shutil.rmtree(run_dir / "baselines" / f"checkpoints_{dearest}")
    scored = run("--run", "runs/tiny", "--budgets", "0.6", cwd=tmp_path, module="experiments.cascade")
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert f"the static envelope lacks the fine-tuned {dearest}" in scored.stdout
    trained = run("--run", "runs/tiny", "--budgets", "0.6", "--train-missing", "--json", cwd=tmp_path,
                  module="experiments.cascade")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (run_dir / "baselines" / f"{dearest}.pt").exists()
    rows = json.loads(trained.stdout)["cascades"]
    assert rows and all(r["envelope_lacks"] == [] for r in rows)
    assert dearest in {n["name"] for n in json.loads(trained.stdout)["networks"]}


def test_cascade_cli_takes_another_runs_networks_and_averaged_answers(study, tmp_path):
    work, _ = study
    for name in ("tiny", "other"):
        shutil.copytree(work / "runs" / "tiny", tmp_path / "runs" / name)
    config = tmp_path / "runs" / "other" / "config.yaml"
    config.write_text(config.read_text().replace("name: tiny", "name: other"))
    done = run("--run", "runs/tiny", "--with-run", "runs/other", "--average", "--budgets", "0.6", "0.9", "--json",
               cwd=tmp_path, module="experiments.cascade")
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    networks = {n["name"]: n for n in out["networks"]}
    # The other run's networks join the envelope, FLOPs in this run's units, files found from this run.
    assert networks["other: full backbone"]["flops_ratio"] == pytest.approx(1.0)
    assert {n.removeprefix("other: ") for n in networks if n.startswith("other: ")} == {
        n for n in networks if not n.startswith("other: ")}
    for n in networks.values():
        assert (tmp_path / "runs" / "tiny" / n["file"]).exists(), n
    load_model(tmp_path / "runs" / "tiny" / networks["other: full backbone + fine-tuning"]["file"])
    assert out["cascades"] and all(isinstance(c["averaged"], bool) for c in out["cascades"])
    assert out["selected_on"] == "held-out" and out["test_images"] == 120
    # Every network of the other run a candidate last stage, chosen on half the test images, scored on the rest.
    done = run("--run", "runs/tiny", "--with-run", "runs/other", "--every-other-last", "--select-on-test", "0.5",
               "--budgets", "0.6", "0.9", "--json", cwd=tmp_path, module="experiments.cascade")
    assert done.returncode == 0, done.stderr[-3000:]
    split = json.loads(done.stdout)
    assert split["selected_on"] == "test" and split["held_out_images"] == split["test_images"] == 60
    assert split["cascades"] and all(sum(c["adaptivity"]["blocks_histogram"]) == 60 for c in split["cascades"])
    scored = {n["name"]: n["accuracy"] for n in split["networks"]}  # the envelope on the same 60 images
    assert all(c["static"]["single"]["accuracy"] == scored[c["static"]["single"]["name"]] for c in split["cascades"])
    # The chosen cascade loads as one model, its networks from both runs.
    row, cascade, flops, _ = load_cascade(tmp_path / "runs" / "tiny", 0.9, "cpu")
    assert len(flops) == len(row["chain"]) and cascade(torch.zeros(3, 3, 32, 32, dtype=torch.uint8)).shape == (3, 4)
    assert "--every-other-last offers --with-run's networks" in run(
        "--run", "runs/tiny", "--every-other-last", cwd=tmp_path, module="experiments.cascade").stderr
    assert "--select-on-test must be a share" in run(
        "--run", "runs/tiny", "--select-on-test", "1", cwd=tmp_path, module="experiments.cascade").stderr
    # Another run on other data is refused with one clear message.
    config.write_text(config.read_text().replace("test_size: 120", "test_size: 100"))
    refused = run("--run", "runs/tiny", "--with-run", "runs/other", cwd=tmp_path, module="experiments.cascade")
    assert refused.returncode == 2 and "was trained on other data than runs/tiny" in refused.stderr
