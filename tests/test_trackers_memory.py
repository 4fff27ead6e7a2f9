"""The memory tracker on a (faked) GPU machine: each block starts from a reset allocator, records the baseline
before it, reads NVML for the GPU torch really uses (matched by UUID / PCI bus id, whatever
CUDA_VISIBLE_DEVICES hides), and records why a per-process figure is missing."""
import os

import pytest
import torch

from fromage_bench.devices import nvml_device
from fromage_bench.trackers import MemoryTracker
from tests.fake_gpu import FakeAllocator, FakeNvml, four_gpus, install, torch_props

GIB = 1 << 30
CUDA0 = torch.device("cuda", 0)


def test_a_block_peaks_are_its_own_not_the_process_high_water_mark(monkeypatch):
    """An earlier block's 10 GiB (freed, but cached by the allocator) must not show in the next block's reserved
    peak; the baseline is what was held when the block began (the weights)."""
    gpus = four_gpus()
    nvml = FakeNvml(gpus)
    allocator = install(monkeypatch, nvml, [torch_props("NVIDIA H100 80GB HBM3", uuid=gpus[3].uuid)], FakeAllocator(),
                        cuda_visible_devices="3")
    allocator.alloc(4 * GIB)  # the model's weights
    allocator.alloc(10 * GIB)  # an earlier cell's activations (or the copy-bandwidth probe's buffers)
    allocator.free(10 * GIB)
    assert allocator.reserved == 14 * GIB and allocator.peak_reserved == 14 * GIB
    with MemoryTracker(CUDA0, interval=10) as memory:
        allocator.alloc(1 * GIB)
        allocator.free(1 * GIB)
    summary = memory.summary()
    assert summary["cuda_max_allocated_bytes"] == 5 * GIB
    assert summary["cuda_max_reserved_bytes"] == 5 * GIB  # 15 GiB without the reset
    assert summary["baseline"]["cuda_allocated_bytes"] == 4 * GIB
    assert summary["baseline"]["cuda_reserved_bytes"] == 4 * GIB
    # the reset's order: device idle, cache handed back, then the peaks reset from there
    assert allocator.calls[:3] == ["synchronize", "empty_cache", "reset_peak_memory_stats"]


@pytest.mark.parametrize("visible, torch_index, nvml_index, how", [
    ("3", 0, 3, "uuid"),  # CUDA_VISIBLE_DEVICES=3: torch's cuda:0 is NVML's device 3
    ("2,3", 1, 3, "uuid"),  # a SLURM allocation of two GPUs
    ("3", 0, 3, "pci"),  # a torch without UUIDs: the PCI bus id
    (None, 2, 2, "index"),  # nothing hidden and neither id: NVML's index is torch's
])
def test_nvml_reads_the_gpu_torch_uses(monkeypatch, visible, torch_index, nvml_index, how):
    gpus = four_gpus()
    order = [int(i) for i in visible.split(",")] if visible else range(4)
    props = []
    for i in order:
        gpu = gpus[i]
        pci = tuple(int(part, 16) for part in gpu.pci_bus_id.replace(".", ":").split(":")[:3])
        props.append(torch_props(gpu.name, uuid=gpu.uuid if how == "uuid" else None, pci=pci if how == "pci" else None))
    install(monkeypatch, FakeNvml(gpus), props, cuda_visible_devices=visible)
    device = torch.device("cuda", torch_index)
    found = nvml_device(device)
    assert found.handle is gpus[nvml_index] and found.matched_by.startswith({"uuid": "uuid", "pci": "pci bus id",
                                                                               "index": "index"}[how])
    with MemoryTracker(device, interval=10) as memory:
        pass
    summary = memory.summary()
    assert summary["nvml_device_used_bytes"] == (nvml_index + 1) * GIB  # GPU i holds (i + 1) GiB
    if nvml_index == 3:
        assert summary["nvml_process_used_bytes"] == 3 * GIB  # this pid's entry, not the other process's 7 GiB


def test_hidden_devices_without_ids_give_no_nvml_figures_and_say_why(monkeypatch):
    """Matching by index under CUDA_VISIBLE_DEVICES=3 would read GPU 0: no NVML figure is better than a wrong one."""
    gpus = four_gpus()
    install(monkeypatch, FakeNvml(gpus), [torch_props(gpus[3].name)], cuda_visible_devices="3")
    with MemoryTracker(CUDA0, interval=10) as memory:
        pass
    summary = memory.summary()
    assert "nvml_device_used_bytes" not in summary
    assert "not found in NVML by UUID or PCI bus id" in summary["nvml_unavailable"]
    assert summary["cuda_max_allocated_bytes"] == 0  # the allocator's figures remain


@pytest.mark.parametrize("processes, refuse, expected", [
    ([(1, 5 * GIB)], False, "is not in NVML's process list"),  # PID namespace: NVML lists host PIDs
    ([(os.getpid(), None)], False, "without its memory use"),
    ([], True, "NVML refused the process list: Insufficient Permissions"),
])
def test_a_missing_per_process_figure_is_recorded(monkeypatch, processes, refuse, expected):
    gpus = four_gpus()
    gpus[3].processes = processes
    install(monkeypatch, FakeNvml(gpus, refuse_processes=refuse), [torch_props(gpus[3].name, uuid=gpus[3].uuid)],
            cuda_visible_devices="3")
    with MemoryTracker(CUDA0, interval=10) as memory:
        pass
    summary = memory.summary()
    assert "nvml_process_used_bytes" not in summary
    assert expected in summary["nvml_process_unavailable"]
    assert summary["nvml_device_used_bytes"] == 4 * GIB  # the device figure still comes


def test_no_nvml_installed_is_recorded(monkeypatch):
    install(monkeypatch, None, [torch_props("NVIDIA H100 80GB HBM3", uuid="GPU-x")])
    with MemoryTracker(CUDA0, interval=10) as memory:
        pass
    assert "NVML is not available" in memory.summary()["nvml_unavailable"]


def test_cpu_tracking_has_rss_and_its_baseline():
    with MemoryTracker(torch.device("cpu"), interval=10) as memory:
        block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB touched
        del block
    summary = memory.summary()
    assert summary["cpu_rss_bytes"] >= summary["baseline"]["cpu_rss_bytes"] > 0
    assert not any(k.startswith(("cuda_", "nvml_")) for k in summary)


def test_environment_names_the_gpu_torch_uses(monkeypatch):
    """The environment block says which physical GPU `cuda:0` was (UUID, PCI bus id, NVML's match), what hid the
    others, and the bandwidth with its source."""
    from fromage_bench.environment import gpu_info

    gpus = four_gpus()
    props = torch_props(gpus[3].name, uuid=gpus[3].uuid, pci=(0, 0x1B, 0))
    install(monkeypatch, FakeNvml(gpus), [props], cuda_visible_devices="3")
    (gpu,) = gpu_info()
    assert gpu["uuid"] == gpus[3].uuid.removeprefix("GPU-") and gpu["pci_bus_id"] == gpus[3].pci_bus_id
    assert gpu["nvml_matched_by"] == f"uuid {gpus[3].uuid}" and gpu["visible_devices"] == {"CUDA_VISIBLE_DEVICES": "3"}
    assert gpu["peak_bandwidth_source"].startswith("nvml") and gpu["driver"] == "580.00"
    assert gpu["peak_bandwidth_bytes_per_second"] == pytest.approx(2619e6 * 5120 / 8 * 2)
