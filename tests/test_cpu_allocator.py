"""Freed tensor memory stays in the process (backbone.cpu_allocator): no page faults per forward."""

import os
import subprocess
import sys

import pytest
import torch

from backbone.cpu_allocator import _glibc, allocated_bytes
from backbone.models.cost import peak_memory_mb

glibc_only = pytest.mark.skipif(_glibc() is None, reason="mallopt is glibc's (Linux)")


FAULTS_PER_FORWARD = """
import resource, torch, backbone
from backbone.cpu_allocator import allocator_setting
model = backbone.build_resnet(20, num_classes=10, width=16).eval()
x = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8)
mask = torch.rand(128, model.num_blocks, generator=torch.Generator().manual_seed(0)) < 0.5
windows = []
with torch.inference_mode():
    for _ in range(3):
        model(x), model(x, mask)  # the heap grows to what a forward needs
    # The fewest faults per forward over four windows of 4 forwards: the tuned heap may still grow
    # by a few pages in a window (fragmentation moves its high-water mark), glibc's own settings
    # unmap and fault the 8 MB activations in again in every one.
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(2):
            model(x), model(x, mask)
        windows.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
print(allocator_setting(), min(windows))
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
def test_peak_memory_is_what_a_call_holds_whatever_the_heap_kept():
    assert allocated_bytes() > 0
    cpu = torch.device("cpu")
    fresh = peak_memory_mb(lambda: torch.ones(64 * 2**20 // 4), cpu)  # 64 MiB, freed at once
    # 256 MiB allocated and freed: the tuned heap keeps it resident, which a peak-RSS probe would
    # count as this process's baseline; the allocated-bytes peak does not move.
    torch.ones(256 * 2**20 // 4)
    after_big_free = peak_memory_mb(lambda: torch.ones(64 * 2**20 // 4), cpu)
    two_alive = peak_memory_mb(lambda: (torch.ones(32 * 2**20 // 4), torch.ones(32 * 2**20 // 4)), cpu)
    assert 63.9 < fresh < 66 and 63.9 < after_big_free < 66 and 63.9 < two_alive < 66, (fresh, after_big_free, two_alive)
    assert peak_memory_mb(lambda: torch.ones(1), cpu) < 1


@glibc_only
def test_a_masked_forward_needs_no_more_memory_than_the_full_one():
    """The masked runner's promise (half-batch runs of blocks that keep most rows): a batch-64
    ResNet-20 forward at keep rates 0.25-0.9, random and shared masks, peaks at or below the full."""
    import backbone

    model = backbone.build_resnet(20, num_classes=10, width=16).eval()
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    gen, cpu = torch.Generator().manual_seed(0), torch.device("cpu")
    with torch.inference_mode():
        full = peak_memory_mb(lambda: model(x), cpu)
        for keep in (0.25, 0.5, 0.75, 0.9):
            random_rows = torch.rand(64, model.num_blocks, generator=gen) < keep
            shared = (torch.rand(1, model.num_blocks, generator=gen) < keep).expand(64, -1)
            for mask in (random_rows, shared):
                masked = peak_memory_mb(lambda m=mask: model(x, m), cpu)
                assert masked <= full * 1.001, (keep, masked, full)


def test_opt_out_leaves_the_system_allocator():
    code = "import backbone; from backbone.cpu_allocator import allocator_setting; print(allocator_setting())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "DYNDEPTH_CPU_ALLOCATOR": "system"}, check=True)
    assert out.stdout.strip() == "system"
