"""The study's grid as Ray Tune trials: ``python -m experiments.sweep --config FILE [--set k=v …] [--address ADDR] [--cpus-per-trial N] [--gpus-per-trial G] [--max-failures K] [--resume]``.

The grid is the config's own: seeds (``study.seeds``, else ``seed``) × λ (``policy.reward.lam``
and ``study.lambdas``). Every trial works in a run directory of its own:

- ``backbone_seed<S>``: pretraining into ``runs/<name>/seed<S>/`` (one trial for all seeds with
  ``study.share_backbone``), and the fixed-subset ladder that the later trials copy;
- ``policy_seed<S>_lam<λ>``: the policy, its joint fine-tuning and the evaluation in
  ``runs/<name>/seed<S>/lam<λ>/`` on a copy of the seed's backbone (laid out like a one-λ run of
  ``experiments.run``, so ``experiments.evaluate --run`` works on it);
- ``baselines_seed<S>`` (``study.baselines``): the comparison's other methods in
  ``runs/<name>/seed<S>/compare/``.

The backbone trials run first (one Tune run), then all policy and baselines trials (a second).
Then ``runs/<name>/seed<S>/metrics.json`` and ``report.md`` get the seed's curves (RL from the
policy trials, the rest from its baselines trial) read at ``study.budgets``,
``runs/<name>/summary.{md,json}`` the mean ± std over seeds, and ``runs/<name>/sweep.json``
every trial (run directory, resources, retries, wall time). Ray's files: ``runs/<name>/ray/``.

Each trial asks for ``--cpus-per-trial`` CPUs (torch runs that many threads) and
``--gpus-per-trial`` GPUs (a fraction shares one). A failed trial is retried up to
``--max-failures`` times: every stage resumes from the checkpoints in the trial's run directory,
so a retry runs the trial again with ``resume=True`` and continues where the failed attempt
stopped. ``--address`` joins a running Ray cluster (``ray start --head``); without it a local Ray
uses this machine's CPUs and GPUs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import torch

from backbone.data.datasets import Splits, load_splits
from backbone.errors import ConfigError
from backbone.training.loop import resolve_device
from experiments.common import (cli, config_from_args, experiment_parser, owning, prepare_output_dir, prepare_run_dir,
                                release_run_dir, write_json)
from experiments.compare import run_compare, with_policy_curves
from experiments.static_networks import static_recipe
from experiments.config import ExperimentConfig, from_dict, to_dict
from experiments.evaluate import evaluate_run
from experiments.finetune import finetune_dir, finetune_section, run_finetune
from experiments.pretrain import backbone_path, build_backbone, load_backbone, run_pretrain
from experiments.report import write_report
from experiments.run import log_sweep_hparams, share_backbone, summarize_seeds, with_lambda
from experiments.train_policy import policy_dir, run_ladder, run_train_policy

INSTALL_HINT = "pip install 'dyndepth[sweep]'"
#: Fault injection for tests and drills: ``<trial id>:<stage>`` fails that trial once, right after the stage.
FAIL_ONCE_ENV = "DYNDEPTH_SWEEP_FAIL_ONCE"


# ----------------------------------------------------------------------------- the grid
def lam_tag(lam: float) -> str:
    return f"lam{lam:g}"


def study_seeds(study: ExperimentConfig) -> list[int]:
    return list(dict.fromkeys(study.study.seeds or [study.seed]))


def trial_specs(study: ExperimentConfig) -> tuple[list[dict], list[dict]]:
    """(backbone trials, policy and baselines trials): one dict per trial (kind, seed, λ, id)."""
    seeds = study_seeds(study)
    backbones = [{"kind": "backbone", "seed": s, "id": f"backbone_seed{s}"}
                 for s in (seeds[:1] if study.study.share_backbone else seeds)]
    later = []
    for s in seeds:
        later += [{"kind": "policy", "seed": s, "lam": lam, "id": f"policy_seed{s}_{lam_tag(lam)}"} for lam in study.lambdas]
        if study.study.baselines:
            later.append({"kind": "baselines", "seed": s, "id": f"baselines_seed{s}"})
    return backbones, later


def seed_config(study: ExperimentConfig, seed: int) -> ExperimentConfig:
    """The seed's run directory ``runs/<name>/seed<S>/`` (also for a single seed: the study's own
    folder holds the summary and Ray's files)."""
    return dataclasses.replace(study, seed=seed, output_dir=str(study.run_dir), name=f"seed{seed}")


def backbone_source(study: ExperimentConfig, seed: int) -> Path:
    """The run directory whose backbone the trials of ``seed`` use."""
    return seed_config(study, study_seeds(study)[0] if study.study.share_backbone else seed).run_dir


def trial_config(study: ExperimentConfig, spec: dict) -> ExperimentConfig:
    """The config of one trial: its seed, its λ and its run directory."""
    seed_cfg = seed_config(study, spec["seed"])
    if spec["kind"] == "backbone":
        return seed_cfg
    if spec["kind"] == "policy":
        return dataclasses.replace(with_lambda(seed_cfg, spec["lam"]), output_dir=str(seed_cfg.run_dir), name=lam_tag(spec["lam"]))
    return dataclasses.replace(seed_cfg, output_dir=str(seed_cfg.run_dir), name="compare")


# ----------------------------------------------------------------------------- one trial
def backbone_trial(study: ExperimentConfig, spec: dict, cfg: ExperimentConfig, splits: Splits) -> None:
    run_dir = prepare_run_dir(cfg, resume=True)
    run_pretrain(cfg, run_dir, resume=True, splits=splits)
    fail_once(spec, "pretrain", run_dir)
    # The ladder is a function of the backbone and the held-out images only: searched once here,
    # it travels with the backbone (run.share_backbone) instead of once per λ.
    p = cfg.policy
    ladder_policy = p.env == "oneshot" and p.action == "ladder"
    nested = [False] * (study.study.baselines or (ladder_policy and p.ladder_search != "nested"))
    nested += [True] * (ladder_policy and p.ladder_search == "nested")
    if nested:
        backbone = load_backbone(run_dir, resolve_device(cfg.device))
        for n in nested:
            run_ladder(cfg, backbone, splits, nested=n)


def policy_trial(study: ExperimentConfig, spec: dict, cfg: ExperimentConfig, splits: Splits) -> None:
    run_dir = prepare_run_dir(cfg, resume=True)
    if not backbone_path(run_dir).exists():
        share_backbone(backbone_source(study, spec["seed"]), run_dir)
    prepare_output_dir(policy_dir(run_dir), cfg, resume=True)
    run_train_policy(cfg, resume=True, splits=splits)
    fail_once(spec, "train_policy", run_dir)
    if cfg.finetune.epochs > 0:
        prepare_output_dir(finetune_dir(run_dir), cfg, resume=True)
        run_finetune(cfg, resume=True, splits=splits)
    if "evaluation" not in read_metrics(run_dir):  # the last stage: present only when all before it finished
        evaluate_run(run_dir)


def baselines_trial(study: ExperimentConfig, spec: dict, cfg: ExperimentConfig, splits: Splits) -> None:
    run_dir = prepare_run_dir(cfg, resume=True)
    if not backbone_path(run_dir).exists():
        share_backbone(backbone_source(study, spec["seed"]), run_dir)
    run_compare(cfg, resume=True, splits=splits, policy_metrics={})  # the RL curves come from the policy trials


TRIALS = {"backbone": backbone_trial, "policy": policy_trial, "baselines": baselines_trial}


def sweep_trial(params: dict) -> None:
    """Ray Tune's function trainable: one trial's stages in its run directory, all with ``resume=True``
    (so a retry continues from the failed attempt's checkpoints)."""
    import ray
    from ray import tune

    os.chdir(params["cwd"])  # Tune starts a trial in a folder of its own; the config's paths are the driver's
    torch.set_num_threads(max(1, int(params["cpus"])))  # the trial's CPU share, not the whole machine
    study, spec = from_dict(ExperimentConfig, params["config"]), params["trial"]
    cfg = trial_config(study, spec)
    tic = time.perf_counter()
    try:
        TRIALS[spec["kind"]](study, spec, cfg, load_splits(cfg.data))
    finally:
        release_run_dir(cfg.run_dir)  # a retry may start before this process is gone
    assigned = ray.get_runtime_context().get_assigned_resources()
    tune.report({"cpu": assigned.get("CPU", 0.0), "gpu": assigned.get("GPU", 0.0), "torch_threads": torch.get_num_threads(),
                 "device": str(resolve_device(cfg.device)), "host": socket.gethostname(), "trial_wall_s": time.perf_counter() - tic})


def fail_once(spec: dict, stage: str, run_dir: Path) -> None:
    """``DYNDEPTH_SWEEP_FAIL_ONCE=<trial id>:<stage>``: fail right after ``stage``, the first time only."""
    if os.environ.get(FAIL_ONCE_ENV) != f"{spec['id']}:{stage}":
        return
    marker = run_dir / f".failed_once_{stage}"
    if not marker.exists():
        marker.touch()
        raise RuntimeError(f"{FAIL_ONCE_ENV}: {spec['id']} fails once after {stage}")


def read_metrics(run_dir: Path) -> dict:
    path = run_dir / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


# ----------------------------------------------------------------------------- the driver
def import_ray():
    try:
        import ray
        from ray import tune
    except ImportError:
        raise ConfigError(f"Ray Tune is not installed: {INSTALL_HINT}") from None
    return ray, tune


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A clear error at once for an address where no Ray listens (``ray.init`` retries for minutes)."""
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address!r}: expected HOST:PORT (the head's GCS, e.g. 10.0.0.1:6379), "
                          f"ray://HOST:10001 or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); start one "
                          f"with `ray start --head` on the head node, or leave --address out for a local Ray") from None


def start_ray(ray, address: str | None) -> bool:
    """Join the cluster at ``address``, else start a local Ray; False if the caller's Ray is already up."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, **({} if address else {"include_dashboard": False}))
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"cannot connect to the Ray cluster at {address!r}: {exc}") from None
    return True


def check_resources(ray, cpus: float, gpus: float) -> None:
    """A trial must fit on one node, else Tune would wait for it forever."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if not any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
        have = ", ".join(f"{r.get('CPU', 0):g} CPUs + {r.get('GPU', 0):g} GPUs" for r in nodes)
        raise ConfigError(f"each trial asks for {cpus:g} CPUs and {gpus:g} GPUs, but no Ray node has that ({have}): "
                          f"lower --cpus-per-trial / --gpus-per-trial")


def trial_name(trial) -> str:
    return trial.config["trial"]["id"]


def run_phase(tune, name: str, specs: list[dict], study: ExperimentConfig, args, storage: Path) -> list[dict]:
    """One Tune run of ``specs``; a record per trial (its run directory, resources, retries, error)."""
    if not specs:
        return []
    import collections

    class RetryCounter(tune.Callback):
        def __init__(self):
            self.retries = collections.Counter()

        def on_trial_recover(self, iteration, trials, trial, **info):  # failed, and started again
            self.retries[str(trial)] += 1

    counter = RetryCounter()
    tuner = tune.Tuner(
        tune.with_resources(sweep_trial, {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}),
        param_space={"trial": tune.grid_search(specs), "config": to_dict(study), "cwd": os.getcwd(), "cpus": args.cpus_per_trial},
        # reuse_actors: a finished trial's process takes the next trial (no new start and imports);
        # every trial seeds its stages and gives back its run directory, so nothing carries over.
        tune_config=tune.TuneConfig(trial_name_creator=trial_name, trial_dirname_creator=trial_name, reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), callbacks=[counter], verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=args.max_failures)),
    )
    records = []
    for result in tuner.fit():
        spec = result.config["trial"]
        reported = {k: result.metrics.get(k) for k in ("cpu", "gpu", "torch_threads", "device", "host", "trial_wall_s")}
        error = None if result.error is None else (str(result.error).strip().splitlines() or ["?"])[-1]
        records.append({**spec, "run_dir": str(trial_config(study, spec).run_dir), "phase": name,
                        "requested": {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}, **reported,
                        "retries": counter.retries[spec["id"]], "error": error, "ray_dir": result.path})
    return records


def assemble_seed(study: ExperimentConfig, seed: int) -> Path:
    """``runs/<name>/seed<S>/``'s metrics.json and report.md from its trials: pretraining, every policy
    and fine-tuned pair (tagged ``lam<λ>``), the comparison with the RL curves added, and the
    evaluation of the policy's own λ."""
    cfg = seed_config(study, seed)
    source = backbone_source(study, seed)
    metrics = {"pretrain": read_metrics(source)["pretrain"]}
    if source != cfg.run_dir:
        metrics["pretrain"]["shared_from"] = str(source)
    for lam in study.lambdas:
        tag, trial = lam_tag(lam), read_metrics(cfg.run_dir / lam_tag(lam))
        metrics[tag] = {**trial["policy"], "tag": tag}
        if "finetune" in trial:
            metrics[finetune_section(tag)] = {**trial["finetune"], "policy_tag": tag}
    compare = (read_metrics(cfg.run_dir / "compare")["compare"] if study.study.baselines
               else {"budgets": list(study.study.budgets), "curves": {}})
    metrics["compare"] = with_policy_curves(compare, metrics)
    main_dir = cfg.run_dir / lam_tag(study.policy.reward.lam)
    evaluation = read_metrics(main_dir).get("evaluation")
    if evaluation:
        metrics["evaluation"] = {**evaluation, "model": f"{main_dir.name}/{evaluation['model']}"}
        if (main_dir / "examples.png").exists():
            shutil.copy2(main_dir / "examples.png", cfg.run_dir / "examples.png")
    with owning(cfg.run_dir):
        prepare_run_dir(cfg, resume=True)
        write_json(cfg.run_dir / "metrics.json", metrics)
        write_report(cfg.run_dir, metrics, cfg)
        log_sweep_hparams(cfg.run_dir)
    return cfg.run_dir


def trial_device(study: ExperimentConfig, gpus: float) -> ExperimentConfig:
    """``device: auto`` becomes what each trial is given (a trial without a GPU must not take one)."""
    if study.device == "auto":
        return dataclasses.replace(study, device="cuda" if gpus > 0 else "cpu")
    if study.device.startswith("cuda") and gpus <= 0:
        raise ConfigError(f"device {study.device} needs a GPU per trial: pass --gpus-per-trial 1 (or a fraction)")
    return study


def main(args: argparse.Namespace) -> int:
    if args.cpus_per_trial <= 0 or args.gpus_per_trial < 0 or args.max_failures < -1:
        raise ConfigError("--cpus-per-trial must be > 0, --gpus-per-trial >= 0 and --max-failures >= -1 (-1: no limit)")
    study = trial_device(config_from_args(args), args.gpus_per_trial)
    if study.study.baselines:
        static_recipe(study)  # an imported backbone needs study.static_epochs: refused before any trial
    ray, tune = import_ray()
    if args.address and args.address != "auto":
        check_reachable(args.address)
    if not args.address:  # the trials run here: bad data, device or weights fail before Ray starts
        resolve_device(study.device)
        build_backbone(study, load_splits(study.data).train.num_classes)
    top = prepare_output_dir(study.run_dir, study, resume=args.resume, overwrite=args.overwrite)
    tic = time.perf_counter()
    own_ray = start_ray(ray, args.address)
    wall = {"ray_start_s": time.perf_counter() - tic}
    try:
        check_resources(ray, args.cpus_per_trial, args.gpus_per_trial)
        records = []
        for phase, specs in zip(("backbones", "trials"), trial_specs(study)):
            if any(r["error"] for r in records):  # a missing backbone would fail every later trial
                break
            start = time.perf_counter()
            records += run_phase(tune, phase, specs, study, args, (top / "ray").resolve())
            wall[f"{phase}_s"] = time.perf_counter() - start
    finally:
        if own_ray:
            ray.shutdown()
    failed = [r for r in records if r["error"]]
    run_dirs = [] if failed else [assemble_seed(study, s) for s in study_seeds(study)]
    summary = None
    if run_dirs:
        seeds = study_seeds(study)
        summary = summarize_seeds(dataclasses.replace(study, study=dataclasses.replace(study.study, seeds=seeds)), run_dirs)
    wall["total_s"] = time.perf_counter() - tic
    write_json(top / "sweep.json", {"wall_time_s": wall, "address": args.address, "max_failures": args.max_failures,
                                    "trials": records})
    for r in failed:
        print(f"error: trial {r['id']} failed ({1 + r['retries']} attempts): {r['error']}; its run directory: "
              f"{r['run_dir']}, Ray's log: {r['ray_dir']}", file=sys.stderr)
    if failed:
        print("rerun with --resume to continue the sweep where it stopped", file=sys.stderr)
        return 1
    print(f"\n{len(records)} trials in {wall['total_s']:.0f} s; summary over seeds: {summary}")
    for run_dir in run_dirs:
        print(f"report: {run_dir / 'report.md'}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = experiment_parser(__doc__.splitlines()[0])
    p.add_argument("--address", default=None, help="a running Ray cluster (HOST:PORT, ray://HOST:10001 or auto); default: a local Ray")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs each trial reserves (torch threads)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs each trial reserves (0.5: two trials share one)")
    p.add_argument("--max-failures", type=int, default=2, help="retries of a failed trial (-1: no limit)")
    return p


if __name__ == "__main__":
    cli(main, parser())
