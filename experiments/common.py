"""What every experiment script shares: argument parsing, the run directory, clean error exits."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import traceback
from pathlib import Path
from typing import Callable

from backbone.errors import CheckpointError, ConfigError, DyndepthError, OutputError
from backbone.training.interrupt import Interrupted, clear_stop, install_signal_handlers
from backbone.models.weights import write_atomically
from experiments.config import ExperimentConfig, dump_config, load_config, to_dict


def experiment_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML file, or a preset name from experiments/configs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set pretrain.epochs=5 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue the run in the existing run directory")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing run directory and start over")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


#: The config sections the pretrained backbone depends on (a later stage may change the others).
BACKBONE_SECTIONS = ("name", "output_dir", "seed", "device", "data", "model", "pretrain")


def prepare_run_dir(cfg: ExperimentConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Create (or reuse, with ``resume``) the run directory and write the resolved ``config.yaml``."""
    return prepare_output_dir(cfg.run_dir, cfg, resume, overwrite, compare=BACKBONE_SECTIONS)


def prepare_output_dir(
    directory: Path, cfg: ExperimentConfig, resume: bool = False, overwrite: bool = False, compare=None
) -> Path:
    """Create (or reuse) ``directory`` for a run or a stage and write ``config.yaml`` into it.

    Existing work is never silently replaced: without ``--resume``/``--overwrite`` a non-empty
    directory is an error, and ``--resume`` with a config that differs in the sections
    ``compare`` (default: all) is an error naming the keys that differ.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    saved = directory / "config.yaml"
    if directory.exists() and any(directory.iterdir()):
        if overwrite:
            shutil.rmtree(directory)
        elif not resume:
            raise ConfigError(
                f"{directory} already exists; pass --resume to continue it, "
                f"--overwrite to delete it and start over, or choose another name with --set name=..."
            )
        elif saved.exists():
            old, new = _read_yaml(saved), to_dict(cfg)
            if compare is not None:
                old, new = ({k: d.get(k) for k in compare} for d in (old, new))
            differences = _config_differences(old, new)
            if differences:
                raise ConfigError(
                    f"--resume: the config differs from the one in {saved} at {', '.join(differences)}; "
                    f"resume with the same config or start a new run"
                )
    directory.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, saved)
    return directory


def _read_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def _config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} ({a!r} -> {b!r})")
    return out


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (see ``backbone.models.weights.write_atomically``); a failed write is an
    ``OutputError`` naming the file."""
    text = json.dumps(data, indent=2) + "\n"  # a value JSON cannot hold fails before any file is made
    write_atomically(path, text.encode(), what="file", error=OutputError)


def update_metrics(run_dir: Path, stage: str, metrics: dict) -> dict:
    """Store one stage's metrics under its name in ``run_dir/metrics.json``."""
    path = run_dir / "metrics.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[stage] = metrics
    write_json(path, data)
    return data


def finished_stage(run_dir: Path, section: str, output: Path, resume: bool) -> dict | None:
    """With ``resume``: the metrics of ``section`` if that stage already finished (its ``output``
    exists and its metrics were recorded), so the caller can skip it; else None."""
    metrics_path = run_dir / "metrics.json"
    if not (resume and output.exists() and metrics_path.exists()):
        return None
    done = json.loads(metrics_path.read_text()).get(section)
    if done is not None:
        print(f"{section}: already finished in {run_dir}, skipping (--overwrite to redo)")
    return done


def load_policy(path: Path, algo: str, backbone, env_kind: str, backbone_file: Path, device="cpu"):
    """The SB3 policy at ``path``, checked against the backbone it is to drive.

    A missing, corrupt or foreign file, or a policy trained for a backbone with another number of
    blocks, is a ``CheckpointError`` (else SB3 or the masked forward fails with a traceback).
    """
    import pickle
    import zipfile

    from gymnasium.spaces import Discrete, MultiBinary

    from agents.rl import ALGOS

    if not Path(path).is_file():
        raise CheckpointError(f"policy file {path} does not exist")
    try:
        model = ALGOS[algo].load(path, device=device)
    except (ValueError, RuntimeError, OSError, EOFError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        detail = str(err).split(". ")[0] or type(err).__name__
        raise CheckpointError(f"policy file {path} is truncated, corrupt or not a {algo} policy ({detail})") from err
    blocks, action = backbone.num_blocks, model.action_space
    retrain = "train a policy for this backbone (python -m experiments.train_policy)"
    if env_kind == "oneshot" and isinstance(action, MultiBinary):
        if action.n != blocks:
            raise CheckpointError(f"policy {path} decides {action.n} blocks but the backbone {backbone_file} "
                                  f"has {blocks}: it was trained for another backbone; {retrain}")
    elif env_kind == "sequential" and isinstance(action, Discrete):
        size = 4 * backbone.arch["width"] + blocks + 1  # SkipTask.seq_obs_dim: pooled features, block one-hot, budget
        if model.observation_space.shape != (size,):
            raise CheckpointError(f"policy {path} takes {model.observation_space.shape[0]} inputs but the backbone "
                                  f"{backbone_file} ({blocks} blocks) gives {size}: it was trained for another "
                                  f"backbone; {retrain}")
    else:
        raise CheckpointError(f"policy {path} (action space {action}) was not trained for the {env_kind} env of "
                              f"policy.env; set policy.env to the env it was trained on, or {retrain}")
    return model


def tensorboard_writer(run_dir: Path, stage: str):
    """One log tree per run: ``tensorboard --logdir runs/<name>/tb`` shows every stage."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tb" / stage))


def cli(
    main: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser, argv: list[str] | None = None
) -> None:
    """Run ``main(args)``; a ``DyndepthError`` becomes one line on stderr and exit status 2.

    SIGINT (Ctrl-C) and SIGTERM stop a training loop at its next step after a checkpoint
    (``backbone.training.interrupt``); the exit status is then 130 and ``--resume`` continues the run.
    """
    args = parser.parse_args(argv)
    clear_stop()
    install_signal_handlers()
    try:
        code = main(args)
    except DyndepthError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print("interrupted; finished stages and the last checkpoint are kept: rerun with --resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    return load_config(args.config, args.overrides)
