"""A fake NVML (`pynvml`) and a fake CUDA caching allocator behind `torch.cuda.*`, for testing on CPU what the
memory tracker and the bandwidth lookup do on a GPU machine.

The fake allocator keeps what the real one keeps: bytes allocated to tensors, bytes reserved from the driver
(allocated plus cached free blocks, handed back only by `empty_cache`), and the peaks of both since the last
`reset_peak_memory_stats`. The fake NVML numbers every GPU of the machine, whatever torch sees."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

NVML_CLOCK_MEM = 2
NVML_DEVICE_MIG_ENABLE = 1


class NVMLError(Exception):
    pass


@dataclass
class FakeGpu:
    uuid: str  # NVML's form, "GPU-..."
    pci_bus_id: str  # NVML's form, "00000000:3B:00.0"
    name: str = "NVIDIA H100 80GB HBM3"
    used_bytes: int = 0
    memory_clock_mhz: int | None = 2619
    bus_width_bits: int | None = 5120
    mig: bool = False
    processes: list = field(default_factory=list)  # (pid, bytes or None)


class FakeNvml:
    """The pynvml calls the harness makes, over a list of GPUs in NVML's (PCI) order."""
    NVML_CLOCK_MEM = NVML_CLOCK_MEM
    NVML_DEVICE_MIG_ENABLE = NVML_DEVICE_MIG_ENABLE
    NVMLError = NVMLError

    def __init__(self, gpus: list[FakeGpu], refuse_processes: bool = False):
        self.gpus = gpus
        self.refuse_processes = refuse_processes

    def nvmlInit(self):
        pass

    def nvmlSystemGetDriverVersion(self):
        return "580.00"

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        return self.gpus[index]

    def nvmlDeviceGetHandleByUUID(self, uuid):
        uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
        for gpu in self.gpus:
            if gpu.uuid == uuid:
                return gpu
        raise NVMLError("Not Found")

    def nvmlDeviceGetHandleByPciBusId(self, bus_id):
        for gpu in self.gpus:
            if gpu.pci_bus_id.lower() == bus_id.lower():
                return gpu
        raise NVMLError("Not Found")

    def nvmlDeviceGetMemoryInfo(self, gpu):
        return SimpleNamespace(used=gpu.used_bytes, total=80 << 30, free=(80 << 30) - gpu.used_bytes)

    def nvmlDeviceGetComputeRunningProcesses(self, gpu):
        if self.refuse_processes:
            raise NVMLError("Insufficient Permissions")
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in gpu.processes]

    def nvmlDeviceGetMaxClockInfo(self, gpu, kind):
        assert kind == NVML_CLOCK_MEM
        if gpu.memory_clock_mhz is None:
            raise NVMLError("Not Supported")
        return gpu.memory_clock_mhz

    def nvmlDeviceGetMemoryBusWidth(self, gpu):
        if gpu.bus_width_bits is None:
            raise NVMLError("Not Supported")
        return gpu.bus_width_bits

    def nvmlDeviceIsMigDeviceHandle(self, gpu):
        return False

    def nvmlDeviceGetMigMode(self, gpu):
        return [int(gpu.mig), int(gpu.mig)]


class FakeAllocator:
    """torch.cuda's memory functions for one device (events appended to `calls`, in order)."""

    def __init__(self):
        self.allocated = self.reserved = self.peak_allocated = self.peak_reserved = 0
        self.calls: list[str] = []

    def alloc(self, n: int):
        self.allocated += n
        self.reserved = max(self.reserved, self.allocated)  # a new block when the cache has none free
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def free(self, n: int):
        self.allocated -= n  # the block stays cached: reserved unchanged

    def empty_cache(self):
        self.calls.append("empty_cache")
        self.reserved = self.allocated

    def reset_peak_memory_stats(self, device=None):
        self.calls.append("reset_peak_memory_stats")
        self.peak_allocated, self.peak_reserved = self.allocated, self.reserved

    def synchronize(self, device=None):
        self.calls.append("synchronize")


def torch_props(name: str, uuid: str | None = None, pci: tuple[int, int, int] | None = None):
    """A torch device-properties object: torch prints the UUID without NVML's "GPU-" prefix."""
    props = SimpleNamespace(name=name, total_memory=80 << 30, major=9, minor=0, multi_processor_count=132)
    if uuid is not None:
        props.uuid = uuid.removeprefix("GPU-")
    if pci is not None:
        props.pci_domain_id, props.pci_bus_id, props.pci_device_id = pci
    return props


def install(monkeypatch, nvml: FakeNvml | None, visible: list[SimpleNamespace], allocator: FakeAllocator | None = None,
            cuda_visible_devices: str | None = None):
    """Fake CUDA with the `visible` devices' properties (torch's numbering) and `nvml` as `pynvml`."""
    import sys

    allocator = allocator or FakeAllocator()
    if nvml is None:
        monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails, as with no NVML installed
    else:
        monkeypatch.setitem(sys.modules, "pynvml", nvml)
    for var in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    if cuda_visible_devices is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", cuda_visible_devices)
    cuda = torch.cuda

    def index_of(device=None):
        if device is None:
            return 0
        return device if isinstance(device, int) else (torch.device(device).index or 0)

    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "device_count", lambda: len(visible))
    monkeypatch.setattr(cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cuda, "get_device_properties", lambda device=None: visible[index_of(device)])
    monkeypatch.setattr(cuda, "get_device_name", lambda device=None: visible[index_of(device)].name)
    monkeypatch.setattr(cuda, "synchronize", allocator.synchronize)
    monkeypatch.setattr(cuda, "empty_cache", allocator.empty_cache)
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", allocator.reset_peak_memory_stats)
    monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: allocator.allocated)
    monkeypatch.setattr(cuda, "memory_reserved", lambda device=None: allocator.reserved)
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda device=None: allocator.peak_allocated)
    monkeypatch.setattr(cuda, "max_memory_reserved", lambda device=None: allocator.peak_reserved)
    return allocator


def four_gpus(**overrides) -> list[FakeGpu]:
    """A 4-GPU machine; GPU i has used (i + 1) GiB and this process's memory on GPU 3 only."""
    gpus = [FakeGpu(uuid=f"GPU-0000000{i}-aaaa-bbbb-cccc-00000000000{i}", pci_bus_id=f"00000000:{0x18 + i:02X}:00.0",
                    used_bytes=(i + 1) << 30, **overrides) for i in range(4)]
    gpus[3].processes = [(12345, 7 << 30), (os.getpid(), 3 << 30)]
    return gpus
