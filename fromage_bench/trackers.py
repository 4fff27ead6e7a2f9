"""What is measured, separate from what runs: latency per example, memory (CUDA allocator, NVML,
process RSS), and throughput from the model's own work counters."""
from __future__ import annotations

import gc
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
        import os

        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class MemoryTracker:
    """Peak memory over a block: torch's CUDA allocator peaks, and a background thread sampling process
    RSS and (where NVML answers) device and per-process GPU memory every `interval` seconds."""

    def __init__(self, device: torch.device, interval: float = 0.05):
        self.device = device
        self.interval = interval
        self.peaks: Counter = Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml_handle = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._nvml_handle = _nvml_handle(self.device)
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

    def _sample(self):
        self.peaks["cpu_rss_bytes"] = max(self.peaks["cpu_rss_bytes"], _rss_bytes())
        if self._nvml_handle is not None:
            import pynvml

            try:
                info = pynvml.nvmlDeviceGetMemoryInfo(self._nvml_handle)
                self.peaks["nvml_device_used_bytes"] = max(self.peaks["nvml_device_used_bytes"], int(info.used))
                import os

                for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(self._nvml_handle):
                    if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                        self.peaks["nvml_process_used_bytes"] = max(self.peaks["nvml_process_used_bytes"],
                                                                    int(proc.usedGpuMemory))
            except Exception:  # NVML can refuse queries in containers; the allocator figures remain
                pass

    def summary(self) -> dict[str, int]:
        out = dict(self.peaks)
        if self.device.type == "cuda":
            out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
            out["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
        return out


def _nvml_handle(device: torch.device):
    try:
        import pynvml

        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:
        return None


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
