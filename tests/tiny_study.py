"""The tiny study that the pipeline tests (and the CLIs built on a finished run) share: its
config, and how a test runs a CLI module in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = """
name: tiny
data: {train_size: 400, test_size: 120, num_classes: 4, val_fraction: 0.3}
model: {arch: resnet8, width: 4}
pretrain: {epochs: 2, batch_size: 32, warmup_epochs: 0, stochastic_depth: 0.2}
policy: {num_envs: 16, n_steps: 4, batch_size: 64, timesteps: 256, observation: stem, eval_every: 128, checkpoint_every: 128}
finetune: {epochs: 1, batch_size: 32, policy_batch_size: 32}
study: {lambdas: [0.2], budgets: [0.6], keep_rates: [0.5], latency_batch: 16, latency_repeats: 2, latency_stream: 4}
"""


def run(*args, cwd, module="experiments.run"):
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"},
    )
