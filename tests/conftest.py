import os
from pathlib import Path

import pytest
import torch

# Test networks are tiny: one thread does the work without waiting on the other core (which the
# 2-core CI machine may need for a subprocess); the real-data tests ask for two.
torch.set_num_threads(1)

#: The real CIFAR-10 JPEG tree that sits in ../shared beside the repository (never copied into it).
REAL_CIFAR10_JPG = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def cifar10_jpg() -> Path:
    if not (REAL_CIFAR10_JPG / "test").is_dir():
        message = f"real CIFAR-10 JPEG tree not found at {REAL_CIFAR10_JPG}"
        if os.environ.get("CI"):  # CI promises ../shared: a missing tree must not turn the real-data checks into skips
            pytest.fail(message + " (CI is set: the real-data checks must run)")
        pytest.skip(message)
    return REAL_CIFAR10_JPG


@pytest.fixture(scope="session")
def study(tmp_path_factory):
    """The tiny study (``tiny_study.TINY``) run once by ``experiments.run``: (work dir, result).
    Shared by the pipeline tests and the CLIs that read a finished run."""
    from tiny_study import TINY, run

    work = tmp_path_factory.mktemp("study")
    (work / "tiny.yaml").write_text(TINY)
    result = run("--config", "tiny.yaml", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return work, result
