"""The study's grid as Ray Tune trials (experiments.sweep): a local Ray on 2 CPUs, 2 seeds × 2 λ.

One sweep serves the module (Ray and its worker processes are slow to start). One of its trials
fails once on purpose (experiments.sweep.FAIL_ONCE_ENV) after its policy is trained: Tune must
retry it and the retry must continue from the policy the failed attempt left.
"""

import json
import os
import signal
import statistics
import sys
from pathlib import Path

import pytest
import ray

from experiments import sweep as sweep_module
from experiments.common import cli, release_run_dir
from experiments.compare import RL, RL_FT
from experiments.config import load_config

pytestmark = pytest.mark.timeout(600)  # the module's sweep runs inside the first test's setup

ROOT = Path(__file__).resolve().parents[1]
TINY = """
name: tiny
output_dir: {out}
data: {{train_size: 400, test_size: 120, num_classes: 4, val_fraction: 0.3}}
model: {{arch: resnet8, width: 4}}
pretrain: {{epochs: 2, batch_size: 32, warmup_epochs: 0, stochastic_depth: 0.2}}
policy: {{num_envs: 16, n_steps: 4, batch_size: 64, timesteps: 256, observation: stem, eval_every: 128, checkpoint_every: 128}}
finetune: {{epochs: 1, batch_size: 32, policy_batch_size: 32}}
study: {{seeds: [0, 1], lambdas: [0.2], budgets: [0.6], keep_rates: [0.5], latency_batch: 16, latency_repeats: 2, latency_stream: 4}}
"""
FAILING = "policy_seed0_lam0.2"


def run_sweep(config: Path, *extra: str) -> int:
    args = sweep_module.parser().parse_args(["--config", str(config), "--cpus-per-trial", "1", "--max-failures", "1", *extra])
    return sweep_module.main(args)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    work = tmp_path_factory.mktemp("sweep")
    config = work / "tiny.yaml"
    config.write_text(TINY.format(out=work / "runs"))
    # Ray's workers inherit the environment of the process that starts Ray.
    env = {sweep_module.FAIL_ONCE_ENV: f"{FAILING}:train_policy",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        code = run_sweep(config)
        yield config, work / "runs" / "tiny", code
    finally:
        ray.shutdown()
        release_run_dir(work / "runs" / "tiny")
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def trials(study: Path) -> dict:
    return {t["id"]: t for t in json.loads((study / "sweep.json").read_text())["trials"]}


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture
def pytest_signal_handlers():
    """cli() installs the project's SIGINT/SIGTERM handlers: give pytest its own back afterwards."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


# Before the sweep's tests: these run before the module's Ray starts.
@pytest.mark.parametrize("case", ["unknown key", "unreachable address", "ray missing"])
def test_bad_input_is_one_error_line(tmp_path, monkeypatch, capsys, pytest_signal_handlers, case):
    (tmp_path / "tiny.yaml").write_text(TINY.format(out="runs"))
    monkeypatch.chdir(tmp_path)
    argv, expected = ["--config", "tiny.yaml"], "Ray Tune is not installed: pip install 'dyndepth[sweep]'"
    if case == "unknown key":
        argv, expected = argv + ["--set", "study.lambda=[0.1]"], "unknown config key 'study.lambda'"
    elif case == "unreachable address":
        argv, expected = argv + ["--address", "127.0.0.1:9"], "--address 127.0.0.1:9: no Ray cluster answers there"
    else:
        monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if Ray were not installed
    with pytest.raises(SystemExit) as exit_info:
        cli(sweep_module.main, sweep_module.parser(), argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1
    assert lines[0].startswith("error: ") and expected in lines[0], lines
    assert not (tmp_path / "runs").exists()  # nothing written


def test_one_run_directory_per_trial(sweep):
    config, study, code = sweep
    assert code == 0
    lams = sorted({load_config(config).policy.reward.lam, 0.2})
    expected = {f"backbone_seed{s}" for s in (0, 1)} | {f"baselines_seed{s}" for s in (0, 1)}
    expected |= {f"policy_seed{s}_lam{lam:g}" for s in (0, 1) for lam in lams}
    records = trials(study)
    assert set(records) == expected and all(r["error"] is None for r in records.values())
    assert len({r["run_dir"] for r in records.values()}) == len(records)  # no two trials share a directory
    for s in (0, 1):
        seed_dir = study / f"seed{s}"
        assert metrics(seed_dir)["pretrain"]["test_accuracy"] > 0
        assert "compare" in metrics(seed_dir / "compare") and (seed_dir / "compare" / "backbone.pt").exists()
        for lam in lams:
            run_dir = seed_dir / f"lam{lam:g}"
            assert (run_dir / "policy" / "policy.zip").exists() and (run_dir / "finetune" / "policy.zip").exists()
            m = metrics(run_dir)
            assert m["policy"]["reward"]["lam"] == lam and {"finetune", "evaluation"} <= set(m)
            assert load_config(run_dir / "config.yaml").seed == s and (run_dir / "report.md").exists()
    # The trial directories of one seed hold copies of that seed's own backbone.
    contents = {(study / "seed0" / d / "backbone.pt").read_bytes() for d in ("", "compare", "lam0.2")}
    assert len(contents) == 1 and (study / "seed1" / "backbone.pt").read_bytes() not in contents


def test_per_seed_headline_and_the_summary_over_seeds(sweep):
    config, study, _ = sweep
    headlines = []
    for s in (0, 1):
        seed_dir = study / f"seed{s}"
        compare = metrics(seed_dir)["compare"]
        baselines = metrics(seed_dir / "compare")["compare"]
        assert RL not in baselines["curves"]  # the baselines trial had no policy
        # The RL curves are the policy trials' test results; the rest is the baselines trial's.
        points = {p["knob"]["tag"]: p["accuracy"] for p in compare["curves"][RL]}
        assert points == {t: metrics(seed_dir / t)["policy"]["test"]["accuracy"] for t in points} and len(points) == 2
        assert len(compare["curves"][RL_FT]) == 2
        assert compare["curves"]["fixed subset"] == baselines["curves"]["fixed subset"]
        row = compare["headline"][0]
        assert row["budget"] == 0.6 and row["accuracy"][RL] is not None and row["winner"] in compare["curves"]
        headlines.append(row["accuracy"])
        report = (seed_dir / "report.md").read_text()
        for text in ("Accuracy at matched FLOPs", "Adaptivity of every policy", "lam0.2", "| batch |"):
            assert text in report, text
    summary = json.loads((study / "summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    methods = summary["budgets"][0]["methods"]
    for name in (RL, RL_FT, "fixed subset", "static ResNet (depth × width)"):
        values = [h[name] for h in headlines]
        assert methods[name]["seeds"] == 2
        assert methods[name]["mean"] == pytest.approx(statistics.mean(values))
        assert methods[name]["std"] == pytest.approx(statistics.stdev(values))
    assert " ± " in (study / "summary.md").read_text()


def test_each_trial_asked_for_its_resources(sweep):
    _, study, _ = sweep
    for r in trials(study).values():
        assert r["requested"] == {"cpu": 1.0, "gpu": 0.0}
        assert (r["cpu"], r["gpu"], r["torch_threads"], r["device"]) == (1.0, 0.0, 1, "cpu")  # as Ray gave it
    assert (study / "ray" / "trials" / FAILING).is_dir()  # Tune's files stay in the study's folder


def test_a_failed_trial_is_retried_and_continues_where_it_failed(sweep):
    _, study, _ = sweep
    records = trials(study)
    assert records[FAILING]["retries"] == 1 and records[FAILING]["error"] is None
    assert all(r["retries"] == 0 for k, r in records.items() if k != FAILING)
    run_dir = Path(records[FAILING]["run_dir"])
    failed_at = (run_dir / ".failed_once_train_policy").stat().st_mtime_ns
    # The policy of the failed attempt was kept (not trained again); the retry fine-tuned it.
    assert (run_dir / "policy" / "policy.zip").stat().st_mtime_ns < failed_at
    assert (run_dir / "finetune" / "policy.zip").stat().st_mtime_ns > failed_at


def test_resume_reruns_nothing(sweep):
    config, study, _ = sweep
    outputs = sorted(study.glob("seed*/lam*/*/policy.zip")) + sorted(study.glob("seed*/compare/baselines/*.pt"))
    before = {p: p.stat().st_mtime_ns for p in outputs}
    summary = json.loads((study / "summary.json").read_text())
    assert run_sweep(config, "--resume") == 0
    assert {p: p.stat().st_mtime_ns for p in outputs} == before
    assert json.loads((study / "summary.json").read_text()) == summary
    assert all(r["retries"] == 0 for r in trials(study).values())
