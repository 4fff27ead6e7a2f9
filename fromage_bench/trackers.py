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
