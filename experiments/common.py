"""What every experiment script shares: argument parsing, the run directory, clean error exits."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import fcntl
import json
import os
import shlex
import shutil
import socket
import sys
import traceback
from pathlib import Path
from typing import Callable

from backbone.errors import CheckpointError, ConfigError, DyndepthError, OutputError
from backbone.training import distributed
from backbone.training.interrupt import Interrupted, clear_stop, install_signal_handlers
from backbone.files import remove_stale_temporary_files, write_atomically
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

    This process first becomes the owner of the run (:func:`lock_run_dir`). Existing work is
    never silently replaced: without ``--resume``/``--overwrite`` a non-empty directory is an
    error, and ``--resume`` with a config that differs in the sections ``compare`` (default: all)
    is an error naming the keys that differ. Under torchrun rank 0 does all of it; the other
    ranks wait and raise its error, if any.
    """
    return distributed.run_on_main(lambda: _prepare_output_dir(Path(directory), cfg, resume, overwrite, compare))


def _prepare_output_dir(directory: Path, cfg: ExperimentConfig, resume: bool, overwrite: bool, compare) -> Path:
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    lock_run_dir(cfg.run_dir)
    saved = directory / "config.yaml"
    contents = [p for p in directory.iterdir() if p.name != LOCK_FILE] if directory.exists() else []
    if contents:
        if overwrite:
            for path in contents:  # not the lock: this process owns the run while it starts over
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
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
        if resume:
            # A SIGKILL between writing a file and renaming it leaves its temporary file; this
            # process owns the run now (the lock), so nothing else is writing one.
            remove_stale_temporary_files(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, saved)
    return directory


# ----------------------------------------------------------------------------- one owner per run
#: The lock file of a run directory: while a process owns the run it holds an flock on it, and
#: the file names that process (pid, host, command, since when) for whoever is refused. The owner
#: removes it when it exits; one left by a killed process is simply taken over.
LOCK_FILE = ".lock"
_held_locks: dict[Path, int] = {}  # resolved run directory -> open file descriptor of its lock


def lock_run_dir(run_dir: Path) -> None:
    """Make this process the owner of ``run_dir`` until it exits (or :func:`release_run_dir`).

    A run directory already owned by a live process is a ``ConfigError`` naming that process.
    Taking the lock again in the same process is a no-op; under torchrun only rank 0 takes it
    (the other ranks never write).

    Why ``fcntl.flock`` rather than creating the file with O_EXCL and checking whether the pid in
    it is alive: the kernel drops an flock when its process dies in any way (SIGKILL and the OOM
    killer included), so a stale lock cannot exist and there is nothing to detect or break; a pid
    check can only see processes on this host, is fooled by reused pids, and two newcomers that
    both find a dead owner race to replace it. On NFS, Linux maps flock onto NFS byte-range
    locks, which the server releases when a client dies. Children forked without exec (DataLoader
    workers) inherit the descriptor; they die with their parent.
    """
    if not distributed.is_main_process():
        return
    key = Path(run_dir).resolve()
    if key in _held_locks:
        return
    key.mkdir(parents=True, exist_ok=True)
    path = key / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _describe_owner(os.pread(fd, 4096, 0))
            os.close(fd)
            raise ConfigError(
                f"{run_dir} is in use by {owner}; wait for it to finish or stop it first "
                f"(two processes on one run would overwrite each other's checkpoints)"
            ) from None
        except OSError as exc:  # a file system without locks: refuse rather than risk two writers
            os.close(fd)
            raise OutputError(f"cannot lock {path} ({exc.strerror}); put the runs on a local file system") from exc
        if _same_file(fd, path):
            break
        os.close(fd)  # the owner removed the file between our open and flock: lock the new one
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
             "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    if distributed.launched_by_torchrun():
        owner["command"] = f"torchrun job of {distributed.env_world_size()} processes, rank 0: {owner['command']}"
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
    _held_locks[key] = fd


def release_run_dir(run_dir: Path) -> None:
    """Give up the ownership of ``run_dir`` (this also happens when the process exits)."""
    key = Path(run_dir).resolve()
    fd = _held_locks.pop(key, None)
    if fd is not None:
        with contextlib.suppress(OSError):  # removed while still locked: no newcomer can lock a stale inode
            if _same_file(fd, key / LOCK_FILE):
                os.unlink(key / LOCK_FILE)
        os.close(fd)  # closing the only descriptor releases the flock


@contextlib.contextmanager
def owning(run_dir: Path):
    """Own ``run_dir`` for a block of library code (e.g. ``evaluate_run`` called from a notebook or
    a test): taken if this process does not own it yet, and then given back at the end."""
    already = Path(run_dir).resolve() in _held_locks
    lock_run_dir(run_dir)
    try:
        yield
    finally:
        if not already:
            release_run_dir(run_dir)


@atexit.register
def _release_all() -> None:
    for key in list(_held_locks):
        release_run_dir(key)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _describe_owner(content: bytes) -> str:
    try:
        owner = json.loads(content.decode())
        command = owner["command"] if len(owner["command"]) <= 160 else owner["command"][:157] + "..."
        return f"pid {owner['pid']} on {owner['host']} since {owner['since']} ({command})"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):  # the owner is between flock and write
        return "another process (it is just starting)"


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
    lock_run_dir(run_dir)
    path = run_dir / "metrics.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[stage] = metrics
    write_json(path, data)
    return data


def finished_stage(run_dir: Path, section: str, output: Path, resume: bool) -> dict | None:
    """With ``resume``: the metrics of ``section`` if that stage already finished (its ``output``
    exists and its metrics were recorded), so the caller can skip it; else None.

    A stage calls this before it works in ``run_dir``, so this process becomes the run's owner
    here (:func:`lock_run_dir`): a second process on the run is refused before it writes.
    """
    lock_run_dir(run_dir)
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
    from envs.observations import sequential_obs_dim

    blocks, action = backbone.num_blocks, model.action_space
    retrain = "train a policy for this backbone (python -m experiments.train_policy)"
    if env_kind == "oneshot" and isinstance(action, Discrete):
        ladder = Path(path).parent / "ladder.json"
        if not ladder.exists():
            raise CheckpointError(f"policy {path} picks one of {action.n} candidate masks but {ladder} is missing; {retrain}")
    elif env_kind == "oneshot" and isinstance(action, MultiBinary):
        if action.n != blocks:
            raise CheckpointError(f"policy {path} decides {action.n} blocks but the backbone {backbone_file} "
                                  f"has {blocks}: it was trained for another backbone; {retrain}")
    elif env_kind == "sequential" and isinstance(action, Discrete):
        size = sequential_obs_dim(backbone.feature_dim, blocks)
        if model.observation_space.shape != (size,):
            raise CheckpointError(f"policy {path} takes {model.observation_space.shape[0]} inputs but the backbone "
                                  f"{backbone_file} ({blocks} blocks) gives {size}: it was trained for another "
                                  f"backbone; {retrain}")
    else:
        raise CheckpointError(f"policy {path} (action space {action}) was not trained for the {env_kind} env of "
                              f"policy.env; set policy.env to the env it was trained on, or {retrain}")
    return model


def tensorboard_writer(run_dir: Path, stage: str):
    """One log tree per run: ``tensorboard --logdir runs/<name>/tb`` shows every stage. Under
    torchrun rank 0 logs; the other ranks get a writer that writes nothing."""
    if not distributed.is_main_process():
        return _NoWriter()
    lock_run_dir(run_dir)
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tb" / stage))


class _NoWriter:
    """A ``SummaryWriter`` stand-in whose every method does nothing."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def report_parser(description: str, run_help: str) -> argparse.ArgumentParser:
    """The parser of a script that reports on a run directory: ``--run``, ``--json``, ``--debug``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--run", type=Path, required=True, help=run_help)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--debug", action="store_true")
    return parser


def print_report(result: dict, as_json: bool, print_text: Callable[[dict], None]) -> None:
    """``result`` as one JSON line on stdout (``--json``, for scripts), else ``print_text(result)``."""
    if as_json:
        json.dump(result, sys.stdout)
        print()
    else:
        print_text(result)


def cli(
    main: Callable[[argparse.Namespace], int | None],
    parser: argparse.ArgumentParser,
    argv: list[str] | None = None,
    distributed_ok: bool = False,
) -> None:
    """Run ``main(args)``; a ``DyndepthError`` becomes one line on stderr and exit status 2.

    SIGINT (Ctrl-C) and SIGTERM stop a training loop at its next step after a checkpoint
    (``backbone.training.interrupt``); the exit status is then 130 and ``--resume`` continues the run.
    ``distributed_ok``: the script runs under torchrun (its ``main`` calls
    ``distributed.init_distributed``); any other script is refused there, since every rank
    would run the whole stage and write the same files. Under torchrun rank 0 reports.
    """
    args = parser.parse_args(argv)
    clear_stop()
    install_signal_handlers()
    main_rank = distributed.is_main_process()
    try:
        if distributed.env_world_size() > 1 and not distributed_ok:
            raise ConfigError(f"{parser.prog} does not run under torchrun: start it with python -m "
                              f"(torchrun works for experiments.pretrain)")
        code = main(args)
    except DyndepthError as exc:
        if args.debug:
            traceback.print_exc()
        if main_rank or not getattr(exc, "reported_on_main", False):
            print(f"error: {exc}" if main_rank else f"error (rank {os.environ.get('RANK')}): {exc}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as exc:
        if main_rank:
            print(f"interrupted: {exc}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        if main_rank:
            print("interrupted; finished stages and the last checkpoint are kept: rerun with --resume", file=sys.stderr)
        sys.exit(130)
    finally:
        distributed.shutdown()
    sys.exit(code or 0)


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    return load_config(args.config, args.overrides)
