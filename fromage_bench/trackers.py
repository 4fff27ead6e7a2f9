"""What is measured, separate from what runs: latency per example, memory (CUDA allocator, NVML,
process RSS), and throughput from the model's own work counters."""
from __future__ import annotations

import gc
import os
import threading
import time
from collections import Counter
from pathlib import Path

import torch


def percentiles_ms(seconds: list[float]) -> dict[str, float] | None:
    if not seconds:
        return None
    t = torch.tensor(seconds, dtype=torch.float64) * 1000.0
    q = torch.quantile(t, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))
    return {"p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "mean": float(t.mean())}


def synchronize(device: torch.device | None = None) -> None:
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.synchronize(device)


def release_memory() -> None:
    """Collect what a freed model left (its LM and static decoders form reference cycles) and hand the
    allocator's cached blocks back, so the next model's load and peaks start from what is really held."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _rss_bytes() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_device_memory(device: torch.device) -> None:
    """What every tracked block starts from: garbage collected, the device idle, the allocator's cached blocks
    handed back and its peaks reset, so a block's peaks are its own and not a high-water mark of the process
    (an earlier cell's activations, the copy-bandwidth probe's buffers)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class MemoryTracker:
    """Peak memory over a block, from a reset state (`reset_device_memory`): torch's CUDA allocator peaks
    (allocated, reserved), and a background thread sampling process RSS and, where NVML answers for this very
    GPU (matched by UUID / PCI bus id: `devices.nvml_device`), device and per-process GPU memory every
    `interval` seconds. `summary()["baseline"]` holds the same figures just before the block, after the reset:
    what was already held (the model's weights) when it began."""

    def __init__(self, device: torch.device, interval: float = 0.05):
        self.device = device
        self.interval = interval
        self.peaks: Counter = Counter()
        self.baseline: dict[str, int] = {}
        self.notes: dict[str, str] = {}
        self._process_seen = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = None
        self._nvml_handle = None

    def __enter__(self):
        reset_device_memory(self.device)
        if self.device.type == "cuda":
            from .devices import nvml, nvml_device

            self._nvml = nvml()
            found = nvml_device(self.device, self._nvml)
            self._nvml_handle = found.handle
            if found.handle is None:
                self.notes["nvml_unavailable"] = found.reason
        self.baseline = self._current()
        self._sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        return False

    def _loop(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def _current(self) -> dict[str, int]:
        """One reading of every figure this tracker can take."""
        now = {"cpu_rss_bytes": _rss_bytes()}
        if self.device.type == "cuda":
            now["cuda_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
            now["cuda_reserved_bytes"] = torch.cuda.memory_reserved(self.device)
        now.update(self._nvml_reading())
        return now

    def _nvml_reading(self) -> dict[str, int]:
        if self._nvml_handle is None:
            return {}
        out = {}
        try:
            out["nvml_device_used_bytes"] = int(self._nvml.nvmlDeviceGetMemoryInfo(self._nvml_handle).used)
        except Exception as err:  # noqa: BLE001 - NVML can refuse queries in containers; the allocator figures remain
            self.notes.setdefault("nvml_device_unavailable", f"NVML refused the memory query: {err}")
        process = self._process_bytes()
        if process is not None:
            out["nvml_process_used_bytes"] = process
        return out

    def _process_bytes(self) -> int | None:
        """This process's GPU memory as NVML counts it (CUDA context included), or None with the reason noted
        (in a PID-namespaced container NVML lists host PIDs, so this process is never found)."""
        try:
            listed = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._nvml_handle)
        except Exception as err:  # noqa: BLE001
            self.notes.setdefault("nvml_process_unavailable", f"NVML refused the process list: {err}")
            return None
        mine = [p for p in listed if p.pid == os.getpid()]
        if not mine:
            self.notes.setdefault("nvml_process_unavailable",
                                  f"this process (pid {os.getpid()}) is not in NVML's process list "
                                  f"({len(listed)} listed; a PID-namespaced container sees host PIDs)")
            return None
        if any(p.usedGpuMemory is None for p in mine):
            self.notes.setdefault("nvml_process_unavailable", "NVML lists this process without its memory use")
            return None
        self._process_seen = True
        return sum(int(p.usedGpuMemory) for p in mine)

    def _sample(self):
        for name, value in self._current().items():
            if not name.startswith("cuda_"):  # the allocator keeps its own peaks, exact rather than sampled
                self.peaks[name] = max(self.peaks[name], value)

    def summary(self) -> dict:
        """Peaks (`*_bytes`), `baseline`, and the reasons for any NVML figure missing (`nvml_*unavailable`)."""
        out: dict = dict(self.peaks)
        if self.device.type == "cuda":
            out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
            out["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
        out["baseline"] = dict(self.baseline)
        notes = dict(self.notes)
        if self._process_seen:  # seen at some sample: a transient refusal is no "unavailable"
            notes.pop("nvml_process_unavailable", None)
        return {**out, **notes}


class Stopwatch:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        return False


def throughput(counters: Counter, seconds: float) -> dict[str, float]:
    """Per-second rates of the model's work counters over a block (images, tokens scored/generated, ...)."""
    if seconds <= 0:
        return {}
    return {f"{name}_per_second": count / seconds for name, count in sorted(counters.items()) if count}
