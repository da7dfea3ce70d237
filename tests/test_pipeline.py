"""The whole study as a user runs it: experiments.run, then evaluate, on a tiny budget."""

import json
import math

import pytest

from backbone.models.weights import load_model
from experiments.evaluate import evaluate_run
from tiny_study import TINY, run


def test_every_stage_and_baseline_is_in_the_report(study):
    work, result = study
    run_dir = work / "runs" / "tiny"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"pretrain", "policy", "lam0.2", "finetune", "finetune_lam0.2", "compare", "evaluation"} <= set(metrics)
    compare = metrics["compare"]
    curves = compare["curves"]
    assert set(curves) == {"full backbone", "full backbone + fine-tuning", "RL policy", "RL policy + joint fine-tuning", "fixed subset",
                           "fixed subset + fine-tuning", "random dropping", "random dropping + fine-tuning",
                           "differentiable gates", "static ResNet (depth × width)",
                           "confidence cascade (fixed subsets, then the full backbone)"}
    # Built from the fine-tuned subsets, into the full backbone fine-tuned focused on the images the
    # cheapest of them is unsure of (a file of the run, as the plainly fine-tuned control is).
    focused = list((run_dir / "baselines").glob("full_focused_on_subset_*.pt"))
    assert (run_dir / "baselines" / "full.pt").exists() and len(focused) == 1
    # Every other fine-tuned subset is fine-tuned focused too, a point of the fine-tuned subset curve.
    cheapest = focused[0].stem.removeprefix("full_focused_on_")
    plain = {p.stem for p in (run_dir / "baselines").glob("subset_k*.pt") if "_focused_on_" not in p.stem}
    focused_subsets = {p.stem for p in (run_dir / "baselines").glob("subset_*_focused_on_*.pt")}
    assert cheapest in plain and focused_subsets == {f"{n}_focused_on_{cheapest}" for n in plain - {cheapest}} != set()
    assert {p["knob"].get("focused") for p in curves["fixed subset + fine-tuning"]} == focused_subsets | {None}
    for c in curves["confidence cascade (fixed subsets, then the full backbone)"]:
        assert c["knob"]["chain"][0].startswith("subset_k")
        assert c["knob"]["chain"][-1] == "full backbone, focused on " + focused[0].stem.removeprefix("full_focused_on_")
    assert len(curves["RL policy"]) == len(curves["RL policy + joint fine-tuning"]) == 2  # the main λ and 0.2
    assert len(curves["fixed subset"]) == 4  # every size k = 0..3, chosen exhaustively on held-out images
    assert compare["fixed_subset_search"]["search"] == "exhaustive"
    assert compare["headline"][0]["budget"] == 0.6 and compare["headline"][0]["winner"] in curves
    assert all(p["train_time_s"] is not None for name, pts in curves.items() for p in pts)
    static = curves["static ResNet (depth × width)"][0]
    assert static["knob"]["epochs"] == 2 and abs(static["flops_ratio"] - 0.6) <= 0.1
    assert compare["oracle"]["max_accuracy"] >= curves["fixed subset"][-1]["accuracy"]
    report = (run_dir / "report.md").read_text()
    for text in ("Accuracy at matched FLOPs", "Winner per budget", "oracle", "Adaptivity of every policy",
                 "distinct masks", "| batch |", "examples.png"):
        assert text in report, text
    for png in ("accuracy_vs_flops.png", "keep_rates.png", "blocks_used.png", "examples.png"):
        assert (run_dir / png).stat().st_size > 1000
    for stage in ("pretrain", "policy", "lam0.2", "finetune", "gates_target0.6", "hparams"):
        assert any((run_dir / "tb" / stage).iterdir()), stage
    evaluation = metrics["evaluation"]
    assert {"distinct_masks", "masks_covering_90pct", "blocks_used_std", "by_difficulty", "keep_prob"} <= set(evaluation["adaptivity"])
    assert "report:" in result.stdout and "TensorBoard:" in result.stdout


def test_fine_tuned_pair_is_saved_and_loadable(study):
    from stable_baselines3 import PPO

    from backbone.models.weights import load_model

    run_dir = study[0] / "runs" / "tiny"
    for folder in ("finetune", "finetune_lam0.2"):
        assert load_model(run_dir / folder / "backbone.pt").num_blocks == 3
        assert PPO.load(run_dir / folder / "policy.zip", device="cpu").action_space.n == 3


def test_report_numbers_match_an_independent_re_evaluation(study):
    run_dir = study[0] / "runs" / "tiny"
    recorded = json.loads((run_dir / "metrics.json").read_text())["evaluation"]
    again = evaluate_run(run_dir)
    for key in ("accuracy", "blocks_used", "flops", "flops_ratio", "keep_rate_per_block", "by_class", "adaptivity"):
        assert again[key] == recorded[key], key
    assert recorded["model"] == "finetune"
    stage = json.loads((run_dir / "metrics.json").read_text())["finetune"]["test"]
    for key in ("accuracy", "blocks_used", "flops", "keep_rate_per_block", "top_masks", "adaptivity"):
        assert recorded[key] == stage[key], key  # the saved pair scores as the stage measured it


def test_refreshed_policy_is_the_saved_pairs_and_its_time_is_counted(study):
    import shutil

    work = study[0]
    source, target = work / "runs" / "tiny", work / "runs" / "tiny_refresh"
    target.mkdir()
    for name in ("backbone.pt", "config.yaml", "ladder.json"):
        shutil.copy(source / name, target / name)
    shutil.copytree(source / "policy", target / "policy")
    metrics = json.loads((source / "metrics.json").read_text())
    (target / "metrics.json").write_text(json.dumps({"pretrain": metrics["pretrain"], "policy": metrics["policy"]}))
    result = run("--config", "tiny.yaml", "--set", "name=tiny_refresh", "--set", "finetune.refresh_policy=true",
                 cwd=work, module="experiments.finetune")
    assert result.returncode == 0, result.stderr[-3000:]
    stage = json.loads((target / "metrics.json").read_text())["finetune"]
    assert stage["train_time_s"] == pytest.approx(stage["joint_train_time_s"] + stage["refresh_time_s"])
    assert stage["refresh_time_s"] > 0 and "accuracy" in stage["test_before_refresh"]
    assert (target / "finetune" / "refresh" / "last.zip").exists()
    again = evaluate_run(target)  # the saved pair is the refreshed policy on the fine-tuned backbone
    assert again["model"] == "finetune"
    for key in ("accuracy", "blocks_used", "flops", "keep_rate_per_block"):
        assert again[key] == stage["test"][key], key


def test_resume_skips_finished_stages_and_refuses_silent_overwrite(study):
    work, _ = study
    again = run("--config", "tiny.yaml", "--resume", cwd=work)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("already finished") >= 5
    refused = run("--config", "tiny.yaml", cwd=work)
    assert refused.returncode == 2 and "already exists" in refused.stderr


def test_evaluate_cli_json(study):
    work, _ = study
    result = run("--run", "runs/tiny", "--json", cwd=work, module="experiments.evaluate")
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["split"] == "test" and [r["batch"] for r in data["latency"]] == [1, 16]
    assert data["latency"][0]["images"] == 4 and {r["dtype"] for r in data["latency"]} == {"float32"}
    bad = run("--run", "nowhere", cwd=work, module="experiments.evaluate")
    assert bad.returncode == 2 and "not a run directory" in bad.stderr


def test_policy_stage_without_backbone_is_a_clear_error(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY)
    result = run("--config", "tiny.yaml", "--set", "name=empty", cwd=tmp_path, module="experiments.train_policy")
    assert result.returncode == 2 and "no backbone" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs" / "empty").exists()
    result = run("--config", "tiny.yaml", "--set", "name=empty", cwd=tmp_path, module="experiments.finetune")
    assert result.returncode == 2 and "experiments.pretrain" in result.stderr


def _without_timings(value):
    """Metrics minus what depends on the clock (timings, throughput, measured latency)."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items()
                if k != "latency" and not any(t in k for t in ("time", "_s", "per_s"))}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def test_two_runs_with_the_same_seed_give_the_same_metrics(study, tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY)
    again = run("--config", "tiny.yaml", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    first = json.loads((study[0] / "runs" / "tiny" / "metrics.json").read_text())
    second = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
    assert set(first) == set(second)
    for stage in first:
        assert _without_timings(second[stage]) == _without_timings(first[stage]), stage
    other_seed = run("--config", "tiny.yaml", "--set", "seed=1", "--set", "name=seed1", cwd=tmp_path,
                     module="experiments.pretrain")
    assert other_seed.returncode == 0, other_seed.stderr[-2000:]
    third = json.loads((tmp_path / "runs" / "seed1" / "metrics.json").read_text())["pretrain"]
    assert _without_timings(third["history"]) != _without_timings(first["pretrain"]["history"])


def test_difficulty_probe_cli(study):
    work, _ = study
    result = run("--run", "runs/tiny", "--json", cwd=work, module="experiments.probe")
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(data["probes"]) == {"pixels (8x8)", "stem", "after stage 1"}
    for probe in data["probes"].values():
        assert 0 <= probe["group_accuracy"] <= 1 and -1 <= probe["correlation"] <= 1 and probe["chance"] == 0.25
    # The synthetic levels differ in noise and contrast, which the stem's statistics see.
    assert data["probes"]["stem"]["group_accuracy"] > 0.4
    bound = data["policy_bound"]
    at = bound["at_budgets"]
    assert {"fixed subset", "oracle (per image)", "knows the difficulty group (oracle)", "probe policy on stem"} <= set(at)
    for i, _ in enumerate(bound["budgets"]):
        reached = {name: values[i] for name, values in at.items() if values[i] is not None}
        # No policy choosing among the ladder's masks beats the per-image oracle among them.
        assert all(v <= reached["oracle (per image)"] + 1e-9 for v in reached.values()), reached
    optimum = bound["reward_optimum"]
    assert [o["lam"] for o in optimum] == sorted(o["lam"] for o in optimum) and len(optimum[0]["by_group"]) == 4
    bad = run("--run", "nowhere", cwd=work, module="experiments.probe")
    assert bad.returncode == 2 and "not a run directory" in bad.stderr


def test_pair_benchmark_splits_the_pairs_time(study):
    work, _ = study
    result = run("--bench", "pair", "--run", "runs/tiny", "--repeats", "1", "--json", "pair.json", cwd=work,
                 module="experiments.benchmark")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((work / "pair.json").read_text())["records"]
    assert [r["batch"] for r in rows] == [1, 256]
    for r in rows:
        assert 0 < r["kept_time_share"] <= 1 and r["masked_backbone_ms"] > 0
        assert r["runner_efficiency"] > 0 and math.isfinite(r["policy_ms"])  # timings: no bounds under load
        assert r["cost_model_efficiency"] == pytest.approx(1 / r["kept_time_share"] / r["flops_ratio"])
    assert "where it goes: masked backbone alone" in result.stdout


def test_study_on_an_imported_backbone_trains_every_baseline(study, tmp_path):
    """model.init_checkpoint with pretrain.epochs 0: the static networks get study.static_epochs of
    their own (from scratch), so no untrained network enters the comparison; without that
    setting the study refuses to start the comparison with a clear error."""
    work, _ = study
    imported = work / "runs" / "tiny" / "backbone.pt"
    (tmp_path / "tiny.yaml").write_text(TINY)
    common = ["--config", "tiny.yaml", "--set", f"model.init_checkpoint={imported}", "--set", "pretrain.epochs=0"]
    refused = run(*common, "--set", "name=no_static_budget", cwd=tmp_path)
    assert refused.returncode == 2 and "study.static_epochs" in refused.stderr, refused.stderr[-2000:]
    assert not (tmp_path / "runs" / "no_static_budget").exists()  # refused before any work
    # Every fine-tuning distilled from the imported backbone (the pair's, the gates', the baselines').
    result = run(*common, "--set", "name=imported", "--set", "study.static_epochs=2", "--set", "finetune.distill=0.5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs" / "imported" / "metrics.json").read_text())
    compare = metrics["compare"]
    static = compare["curves"]["static ResNet (depth × width)"]
    assert static and all(p["knob"]["epochs"] == 2 and p["train_time_s"] > 0 for p in static)
    assert compare["static_recipe"]["epochs"] == 2 and compare["static_recipe"]["stochastic_depth"] == 0.0
    assert compare["static_recipe"]["distill"] == 0.0 and compare["finetune_budget"]["distill"] == 0.5  # no teacher from scratch
    assert "distilled from the full backbone (weight 0.5)" in (tmp_path / "runs" / "imported" / "report.md").read_text()
    full = compare["curves"]["full backbone"][0]["accuracy"]
    assert full == pytest.approx(json.loads((work / "runs" / "tiny" / "metrics.json").read_text())["compare"]["curves"]["full backbone"][0]["accuracy"])
    # Every method that starts from the backbone got the joint fine-tuning's budget.
    for name in ("fixed subset + fine-tuning", "random dropping + fine-tuning", "full backbone + fine-tuning"):
        assert compare["curves"][name], name


def test_a_tagged_policy_is_loaded_with_its_own_stage_config(study, tmp_path):
    """A policy trained with --tag on other settings than the run's (here the sequential env in a
    run whose main policy is one-shot) is evaluated and timed as it was trained."""
    import shutil

    work, _ = study
    shutil.copytree(work / "runs" / "tiny", tmp_path / "runs" / "tiny")  # evaluate rewrites the report
    shutil.copy(work / "tiny.yaml", tmp_path)
    trained = run("--config", "tiny.yaml", "--tag", "seq", "--set", "policy.env=sequential", cwd=tmp_path,
                  module="experiments.train_policy")
    assert trained.returncode == 0, trained.stderr[-2000:]
    evaluated = run("--run", "runs/tiny", "--tag", "seq", "--json", cwd=tmp_path, module="experiments.evaluate")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads(evaluated.stdout)["model"] == "seq"
    timed = run("--bench", "pair", "--run", "runs/tiny", "--tag", "seq", "--repeats", "1", "--json", "seq.json",
                cwd=tmp_path, module="experiments.benchmark")
    assert timed.returncode == 0, timed.stderr[-2000:]
    assert {r["model"] for r in json.loads((tmp_path / "seq.json").read_text())["records"]} == {"seq"}


def test_batchnorm_recalibration_cli_scores_every_rung_and_the_policy_both_ways(study, tmp_path):
    """experiments.recalibrate on a ladder policy: a row per rung, every test image routed once,
    and the policy's accuracy with the backbone's own statistics is what experiments.evaluate says."""
    import shutil

    work, _ = study
    shutil.copytree(work / "runs" / "tiny", tmp_path / "runs" / "tiny")
    shutil.copy(work / "tiny.yaml", tmp_path)
    # A floor of one block: the empty rung is not the policy's to choose (policy.ladder_min_blocks).
    trained = run("--config", "tiny.yaml", "--tag", "rungs", "--set", "policy.action=ladder", "--set",
                  "policy.ladder_min_blocks=1", cwd=tmp_path, module="experiments.train_policy")
    assert trained.returncode == 0, trained.stderr[-2000:]
    result = run("--run", "runs/tiny", "--tag", "rungs", "--images", "64", "--json", cwd=tmp_path,
                 module="experiments.recalibrate")
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(result.stdout.strip().splitlines()[-1])
    ladder = json.loads((tmp_path / "runs" / "tiny" / "rungs" / "ladder.json").read_text())["masks"]
    run_ladder = json.loads((tmp_path / "runs" / "tiny" / "ladder.json").read_text())["masks"]
    assert ladder == [m for m in run_ladder if m.count("1") >= 1] and len(ladder) == len(run_ladder) - 1
    assert [r["blocks"] for r in data["rungs"]] == [m.count("1") for m in ladder] and data["calibration_images"] == 64
    assert sum(r["policy_images"] for r in data["rungs"]) == data["test_images"] == 120
    assert all(0 <= r[k] <= 1 for r in data["rungs"] for k in ("accuracy", "accuracy_recalibrated"))
    by_rung = sum(r["accuracy"] * r["policy_images"] for r in data["rungs"]) / data["test_images"]
    assert data["policy"]["same_rungs_at_random"] == pytest.approx(by_rung)
    assert data["policy"]["routing_gain"] == pytest.approx(data["policy"]["accuracy"] - by_rung)
    evaluated = run("--run", "runs/tiny", "--tag", "rungs", "--json", cwd=tmp_path, module="experiments.evaluate")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert data["policy"]["accuracy"] == pytest.approx(json.loads(evaluated.stdout)["accuracy"])
    # The pair jointly fine-tuned, then a classifier refitted per rung (finetune.refit_heads): saved, reloaded
    # by evaluate and recalibrate --finetuned alike, which agree on its accuracy.
    tuned = run("--config", "tiny.yaml", "--tag", "rungs", "--set", "policy.action=ladder", "--set",
                "policy.ladder_min_blocks=1", "--set", "finetune.refit_heads=64", "--set", "finetune.epochs=1",
                cwd=tmp_path, module="experiments.finetune")
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    evaluated = run("--run", "runs/tiny", "--tag", "rungs", "--json", cwd=tmp_path, module="experiments.evaluate")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    after = run("--run", "runs/tiny", "--tag", "rungs", "--images", "64", "--finetuned", "--json", cwd=tmp_path,
                module="experiments.recalibrate")
    assert after.returncode == 0, after.stderr[-2000:]
    tuned_data = json.loads(after.stdout.strip().splitlines()[-1])
    assert tuned_data["finetuned"] and tuned_data["policy"]["accuracy"] == pytest.approx(json.loads(evaluated.stdout)["accuracy"])
    assert load_model(tmp_path / "runs" / "tiny" / "finetune_rungs" / "backbone.pt").arch["path_heads"] == len(ladder)
    # The run's main policy decides keep bits, not rungs: one clear error.
    bits = run("--run", "runs/tiny", cwd=tmp_path, module="experiments.recalibrate")
    assert bits.returncode == 2 and "no ladder policy" in bits.stderr


def test_the_comparison_leaves_out_the_methods_it_is_told_to(study, tmp_path):
    """study.leave_out: a fine-tuning-budget study can run the fixed subsets alone (the
    from-scratch networks of a real backbone take hours); the report's curves say what ran."""
    import shutil

    work, _ = study
    shutil.copytree(work / "runs" / "tiny", tmp_path / "runs" / "tiny")
    shutil.copy(work / "tiny.yaml", tmp_path)
    result = run("--config", "tiny.yaml", "--set", "study.leave_out=[full_finetune,random_dropping,gates,static,cascade]",
                 cwd=tmp_path, module="experiments.compare")
    assert result.returncode == 0, result.stderr[-2000:]
    compare = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())["compare"]
    assert set(compare["curves"]) == {"full backbone", "fixed subset", "fixed subset + fine-tuning", "RL policy",
                                      "RL policy + joint fine-tuning"}
    assert compare["left_out"] == ["cascade", "full_finetune", "gates", "random_dropping", "static"]
    assert compare["curves"]["fixed subset + fine-tuning"] and compare["headline"][0]["winner"] in compare["curves"]
