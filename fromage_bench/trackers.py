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
    return {"p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "mean": float(t.mean()), "n": len(seconds)}


TIMED = "the compute call of each batch only, from a synchronised device to a synchronised device"
ALL_RESUMED = "every batch was resumed from the journal: nothing was computed in this run to time"


def step_latency(unit: str, sizes: list[int], seconds: list[float], resumed_batches: int = 0,
                 resumed_units: int = 0) -> dict:
    """What one `map_batches` step's batch times say: the first computed batch (warm-up: CUDA graph capture,
    cuBLAS init, allocator growth) apart, percentiles of the rest per batch and per `unit` (each unit of a
    batch gets the batch's seconds / size: units within a batch are not timed apart), and the rate over the
    units computed in this run (resumed ones are counted, never timed)."""
    computed = sum(sizes)
    total = sum(seconds)
    out = {"unit": unit, "timed": TIMED, "batches_computed": len(sizes), "units_computed": computed,
           "batches_resumed": resumed_batches, "units_resumed": resumed_units, "compute_seconds": total,
           "batch_sizes": list(sizes), "batch_seconds": list(seconds),
           "units_per_second": computed / total if computed and total > 0 else None,
           "warmup": None, "steady": None}
    if not sizes:
        out["note"] = ALL_RESUMED if resumed_batches else "no batch to compute"
        return out
    out["warmup"] = {"batch_size": sizes[0], "batch_ms": seconds[0] * 1000.0,
                     "ms_per_unit": seconds[0] * 1000.0 / max(1, sizes[0])}
    rest_sizes, rest_seconds = sizes[1:], seconds[1:]
    if rest_sizes:
        per_unit = [s / max(1, n) for n, s in zip(rest_sizes, rest_seconds) for _ in range(max(1, n))]
        steady_total = sum(rest_seconds)
        out["steady"] = {"batches": len(rest_sizes), "units": sum(rest_sizes), "seconds": steady_total,
                         "per_batch_ms": percentiles_ms(rest_seconds), "per_unit_ms": percentiles_ms(per_unit),
                         "units_per_second": sum(rest_sizes) / steady_total if steady_total > 0 else None}
    else:
        out["note"] = "one batch computed: the warm-up only, no steady state"
    return out


def cell_latency(timings: dict) -> dict:
    """`cost.latency` of a cell from its steps' `StepTimes` (tasks.base): each step's `step_latency`, and the
    headline step (the one that computed longest; the only one in every task today)."""
    steps = {name: step_latency(t.unit, t.sizes, t.seconds, t.resumed_batches, t.resumed_units)
             for name, t in timings.items()}
    headline = max(steps, key=lambda name: (steps[name]["compute_seconds"], steps[name]["units_computed"] +
                                            steps[name]["units_resumed"]), default=None)
    return {"headline": headline, "steps": steps}


def examples_rate(latency: dict) -> dict:
    """`examples_per_second` (warm-up included) and `steady_examples_per_second` of a cell: its headline
    step's units computed in this run over their compute seconds, with the unit; a cell whose batches were all
    resumed gets no rate and says why."""
    step = latency["steps"].get(latency["headline"]) if latency.get("headline") else None
    if step is None:
        return {"examples_per_second": None, "examples_unit": None, "examples_per_second_note": "no timed step"}
    out = {"examples_per_second": step["units_per_second"], "examples_unit": step["unit"],
           "steady_examples_per_second": (step["steady"] or {}).get("units_per_second")}
    if step["units_per_second"] is None:
        out["examples_per_second_note"] = step.get("note", "no time measured")
    return out


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
