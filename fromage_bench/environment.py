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


# Instruction sets that decide which kernels torch and bitsandbytes run (bf16 / int8 paths above all).
INSTRUCTION_SETS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                    "avx512_bf16", "avx512_fp16", "avx_vnni", "avx_vnni_int8", "asimd", "asimdhp", "fphp", "sve", "sve2", "bf16",
                    "i8mm")
CPU_FIELDS = {"model name": "model_name", "vendor_id": "vendor", "cpu family": "family", "model": "model",
              "stepping": "stepping", "flags": "flags", "features": "flags"}  # /proc/cpuinfo (x86; Arm's Features)
LSCPU_FIELDS = {"model name": "model_name", "vendor id": "vendor", "cpu family": "family", "model": "model",
                "stepping": "stepping", "flags": "flags"}
# What decides speed and memory: runs that differ in any of these are not compared on speed or memory.
SPEED_PACKAGES = ("torch", "transformers", "bitsandbytes")


def _key_values(text: str, fields: dict[str, str]) -> dict[str, str]:
    """The first value of each wanted `key : value` line (the first processor's, in /proc/cpuinfo)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        name = fields.get(key.strip().lower())
        if sep and name and name not in out:
            out[name] = value.strip()
    return out


def _lscpu() -> str:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def describe_cpu(cpuinfo: str | None = None, lscpu: str | None = None) -> dict:
    """The CPU as speed depends on it: name, vendor, family / model / stepping, the instruction sets that matter
    (`INSTRUCTION_SETS` and every `amx_*`), from /proc/cpuinfo or, where it has none of them, lscpu."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    found = _key_values(cpuinfo, CPU_FIELDS)
    source = "/proc/cpuinfo"
    if "flags" not in found:
        found = {**_key_values(_lscpu() if lscpu is None else lscpu, LSCPU_FIELDS), **found}
        source = "lscpu"
    flags = set(found.pop("flags", "").lower().split())
    return {"model_name": found.get("model_name") or platform.processor() or platform.machine(),
            "vendor": found.get("vendor"), "family": found.get("family"), "model": found.get("model"),
            "stepping": found.get("stepping"),
            "instruction_sets": sorted(f for f in flags if f in INSTRUCTION_SETS or f.startswith("amx")),
            "source": source if flags else None}


def _usable_cpus() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


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
    from .cpu_precision import low_precision_support

    cpu_info = describe_cpu()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_info": cpu_info,
        "cpu_low_precision": low_precision_support(cpu_info),
        "cpu_count": os.cpu_count(),
        "usable_cpus": _usable_cpus(),
        "memory_bytes": _memory_bytes(),
        "torch_threads": torch.get_num_threads(),
        "gpus": gpu_info(),
        "packages": {name: _version(name) for name in PACKAGES},
        "code": git_revision(),
    }


def _speed_view(env: dict) -> dict[str, object]:
    """The fields of an environment block that decide speed and memory, by a readable name (the instruction
    sets apart: `comparable` names the ones only one side has)."""
    cpu = env.get("cpu_info") or {}
    view: dict[str, object] = {f"CPU {k.replace('_', ' ')}": cpu.get(k)
                               for k in ("model_name", "vendor", "family", "model", "stepping")}
    view.update({"cpu_count": env.get("cpu_count"), "usable_cpus": env.get("usable_cpus"),
                 "torch_threads": env.get("torch_threads")})
    gpus = env.get("gpus") or []
    view["GPUs"] = ", ".join(f"{g.get('name')} (driver {g.get('driver')}, CUDA {g.get('cuda')})" for g in gpus) or "none"
    packages = env.get("packages") or {}
    view.update({name: packages.get(name) for name in SPEED_PACKAGES})
    return view


def comparable(base: dict | None, new: dict | None) -> tuple[bool, list[str]]:
    """Whether two runs' speed and memory may be compared, and if not, each difference. An environment without
    `cpu_info` (results written before 2026-12-01, or a hand-made file) cannot show that it is the same
    machine kind: not comparable, so that an old baseline never fails a run on speed it cannot vouch for."""
    missing = [side for side, env in (("BASE", base), ("NEW", new)) if not env or not env.get("cpu_info")]
    if missing:
        return False, [f"{' and '.join(missing)} records no CPU family / model / stepping / instruction sets "
                       "(a results file from before 2026-12-01)"]
    b, n = _speed_view(base), _speed_view(new)
    reasons = [f"{name}: {b[name]} vs {n[name]}" for name in b if b[name] != n[name]]
    sets_b, sets_n = (set(env["cpu_info"].get("instruction_sets") or []) for env in (base, new))
    if sets_b != sets_n:
        parts = [f"only {side} has {' '.join(sorted(extra))}"
                 for side, extra in (("BASE", sets_b - sets_n), ("NEW", sets_n - sets_b)) if extra]
        reasons.append("CPU instruction sets: " + ", ".join(parts))
    return not reasons, reasons
