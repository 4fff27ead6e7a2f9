"""The environment block of every results file: versions, hardware, code revision."""
from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("torch", "transformers", "tokenizers", "bitsandbytes", "accelerate", "torchmetrics", "pycocoevalcap",
            "numpy", "pillow", "fromage-bench")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def git_revision() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, timeout=10)
        if commit.returncode == 0:
            return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": None, "dirty": None}


def gpu_info() -> list[dict]:
    """Each visible GPU, in torch's numbering, with what identifies it on the machine (UUID, PCI bus id, how
    NVML matched it: `devices.describe_gpu`) and its peak memory bandwidth with the figure's source."""
    if not torch.cuda.is_available():
        return []
    from .devices import describe_gpu, nvml, peak_bandwidth, visible_devices_env

    pynvml = nvml()
    driver = None
    if pynvml is not None:
        try:
            driver = pynvml.nvmlSystemGetDriverVersion()
            driver = driver.decode() if isinstance(driver, bytes) else driver
        except Exception:  # noqa: BLE001 - NVML not permitted: the rest still describes the device
            pass
    visible = visible_devices_env()
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        bandwidth = peak_bandwidth(torch.device("cuda", i), pynvml=pynvml)
        out.append({"index": i, "name": props.name, "memory_bytes": props.total_memory,
                    "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
                    "driver": driver, "cuda": torch.version.cuda, **describe_gpu(i, pynvml),
                    "peak_bandwidth_bytes_per_second": bandwidth["bytes_per_second"],
                    "peak_bandwidth_source": bandwidth["source"] or bandwidth.get("reason"),
                    "visible_devices": visible})
    return out


def describe_environment() -> dict:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "torch_threads": torch.get_num_threads(),
        "gpus": gpu_info(),
        "packages": {name: _version(name) for name in PACKAGES},
        "code": git_revision(),
    }
