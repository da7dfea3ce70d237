"""Freed tensor memory stays in the process (backbone.cpu_allocator): no page faults per forward."""

import os
import subprocess
import sys

import pytest
import torch

from backbone.cpu_allocator import _glibc, allocator_setting, releasing_memory
from backbone.models.cost import peak_memory_mb

glibc_only = pytest.mark.skipif(_glibc() is None, reason="mallopt is glibc's (Linux)")


FAULTS_PER_FORWARD = """
import resource, torch, backbone
from backbone.cpu_allocator import allocator_setting
model = backbone.build_resnet(20, num_classes=10, width=16).eval()
x = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8)
mask = torch.rand(128, model.num_blocks, generator=torch.Generator().manual_seed(0)) < 0.5
with torch.inference_mode():
    for _ in range(3):
        model(x), model(x, mask)  # the heap grows to what a forward needs
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        model(x), model(x, mask)
print(allocator_setting(), (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 8)
"""


def _faults_per_forward(setting: str) -> tuple[str, float]:
    env = {**os.environ, "DYNDEPTH_CPU_ALLOCATOR": setting, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_FORWARD], capture_output=True, text=True, env=env, check=True)
    name, faults = out.stdout.split()
    return name, float(faults)


@glibc_only
def test_forwards_fault_no_pages_once_tuned():
    tuned, system = _faults_per_forward("tuned"), _faults_per_forward("system")
    assert tuned[0] == "tuned" and system[0] == "system"
    # 8 MB activations: glibc's own thresholds map and unmap them, thousands of faults per forward.
    assert system[1] > 1000 and tuned[1] < 0.05 * system[1], (tuned, system)


@glibc_only
def test_peak_memory_still_sees_a_calls_own_allocation():
    small = peak_memory_mb(lambda: torch.ones(1), torch.device("cpu"))
    big = peak_memory_mb(lambda: torch.ones(64 * 2**20 // 4), torch.device("cpu"))  # 64 MiB, freed at once
    assert big - small > 48, (small, big)
    with releasing_memory():
        pass
    assert allocator_setting() == "tuned"


def test_opt_out_leaves_the_system_allocator():
    code = "import backbone; from backbone.cpu_allocator import allocator_setting; print(allocator_setting())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "DYNDEPTH_CPU_ALLOCATOR": "system"}, check=True)
    assert out.stdout.strip() == "system"
