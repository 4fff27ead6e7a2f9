"""Which GPU this process really runs on, as NVML sees it, and its peak memory bandwidth.

NVML numbers every GPU of the machine; torch numbers only the visible ones (`CUDA_VISIBLE_DEVICES`, a SLURM
allocation), in its own order. So `cuda:0` under `CUDA_VISIBLE_DEVICES=3` is NVML's device 3: the NVML handle
is found by the torch device's UUID, else its PCI bus id, and by index only where nothing hides devices.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# Peak memory bandwidth (bytes/s) by exact device name (torch's, "NVIDIA " prefix and case ignored). Matched
# whole: a fragment would give "NVIDIA GH200 480GB" the H200's figure and "NVIDIA RTX A1000" the A100's.
BANDWIDTH_TABLE = {
    "h200": 4.8e12, "h200 nvl": 4.8e12,
    "h100 80gb hbm3": 3.35e12,  # SXM5
    "h100 pcie": 2.0e12, "h100 nvl": 3.9e12,
    "a100-sxm4-80gb": 2.039e12, "a100-sxm4-40gb": 1.555e12, "a100 80gb pcie": 1.935e12, "a100-pcie-40gb": 1.555e12,
    "l40s": 0.864e12, "a10": 0.6e12, "a10g": 0.6e12, "geforce rtx 4090": 1.008e12,
}
HBM_DOUBLE_DATA_RATE = 2  # NVML's memory clock is half the transfer rate (HBM and GDDR6/6X alike)


def normalized_name(name: str) -> str:
    name = " ".join(name.split()).lower()
    return name.removeprefix("nvidia ").strip()


def table_bandwidth(name: str) -> float | None:
    return BANDWIDTH_TABLE.get(normalized_name(name))


def nvml():
    """The initialised pynvml module, or None (not installed, no driver, not permitted)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # noqa: BLE001 - any NVML failure means "no NVML figures", recorded by the callers
        return None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _torch_uuid(props) -> str | None:
    uuid = getattr(props, "uuid", None)
    return str(uuid) if uuid is not None and str(uuid) else None


def _torch_pci_bus_id(props) -> str | None:
    """NVML's form, domain:bus:device.function, from torch's PCI ids (torch >= 2.5 has them)."""
    ids = [getattr(props, name, None) for name in ("pci_domain_id", "pci_bus_id", "pci_device_id")]
    if any(not isinstance(i, int) for i in ids):
        return None
    return f"{ids[0]:08X}:{ids[1]:02X}:{ids[2]:02X}.0"


@dataclass
class NvmlDevice:
    """An NVML handle for a torch device and how it was matched, or why there is none (`handle` None)."""
    handle: object | None
    matched_by: str | None = None
    reason: str | None = None


def nvml_device(device: torch.device, pynvml=None) -> NvmlDevice:
    if device.type != "cuda":
        return NvmlDevice(None, reason="not a CUDA device")
    pynvml = pynvml or nvml()
    if pynvml is None:
        return NvmlDevice(None, reason="NVML is not available (pynvml missing, no driver, or not permitted)")
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    uuid = _torch_uuid(props)
    if uuid:
        candidates = [uuid] if uuid.startswith(("GPU-", "MIG-")) else [f"GPU-{uuid}", f"MIG-{uuid}"]
        for candidate in candidates:
            try:
                return NvmlDevice(pynvml.nvmlDeviceGetHandleByUUID(candidate), f"uuid {candidate}")
            except Exception:  # noqa: BLE001 - not this form of the UUID: try the next way
                pass
    bus_id = _torch_pci_bus_id(props)
    if bus_id:
        try:
            return NvmlDevice(pynvml.nvmlDeviceGetHandleByPciBusId(bus_id), f"pci bus id {bus_id}")
        except Exception:  # noqa: BLE001
            pass
    hidden = any(os.environ.get(v) is not None for v in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"))
    try:
        same_count = pynvml.nvmlDeviceGetCount() == torch.cuda.device_count()
        if not hidden and same_count:
            return NvmlDevice(pynvml.nvmlDeviceGetHandleByIndex(index), f"index {index} (no UUID or PCI id from torch)")
    except Exception as err:  # noqa: BLE001
        return NvmlDevice(None, reason=f"NVML could not list devices: {err}")
    return NvmlDevice(None, reason=f"cuda:{index} not found in NVML by UUID or PCI bus id, and device indices "
                                   "differ (CUDA_VISIBLE_DEVICES or an allocation hides devices)")


def _is_mig(pynvml, handle, name: str) -> bool:
    if "mig" in normalized_name(name).split():  # torch names a slice "NVIDIA A100-SXM4-40GB MIG 1g.5gb"
        return True
    if handle is None:
        return False
    try:
        if pynvml.nvmlDeviceIsMigDeviceHandle(handle):
            return True
    except Exception:  # noqa: BLE001 - old drivers lack the call
        pass
    try:
        return pynvml.nvmlDeviceGetMigMode(handle)[0] == pynvml.NVML_DEVICE_MIG_ENABLE
    except Exception:  # noqa: BLE001 - not supported (no MIG on this GPU)
        return False


def peak_bandwidth(device: torch.device, override: float | None = None, pynvml=None) -> dict:
    """The device's peak memory bandwidth: `{"bytes_per_second", "source", "device_name"}`, with `reason`
    where it is unknown or refused (then `bytes_per_second` is None). Sources, in order: `--bandwidth`; NVML's
    maximum memory clock x bus width x 2; the exact-name table."""
    if override:
        return {"bytes_per_second": float(override), "source": "--bandwidth", "device_name": None}
    if device.type != "cuda":
        return {"bytes_per_second": None, "source": None, "device_name": None,
                "reason": f"not a GPU ({device.type}): no weight-read roofline"}
    name = torch.cuda.get_device_name(device)
    pynvml = pynvml or nvml()
    found = nvml_device(device, pynvml)
    out = {"bytes_per_second": None, "source": None, "device_name": name}
    if _is_mig(pynvml, found.handle, name):
        return {**out, "reason": "MIG instance: a slice gets only its share of the GPU's memory bandwidth, which "
                                 "NVML does not report, so no roofline (pass --bandwidth with the slice's figure)"}
    if found.handle is not None:
        try:
            clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(found.handle, pynvml.NVML_CLOCK_MEM)
            bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(found.handle)
            if clock_mhz and bus_bits:
                return {**out, "bytes_per_second": clock_mhz * 1e6 * bus_bits / 8 * HBM_DOUBLE_DATA_RATE,
                        "source": "nvml: max memory clock x bus width x 2", "memory_clock_mhz": clock_mhz,
                        "memory_bus_width_bits": bus_bits, "nvml_matched_by": found.matched_by}
        except Exception:  # noqa: BLE001 - older drivers lack the bus width: the table may know the device
            pass
    table = table_bandwidth(name)
    if table is not None:
        return {**out, "bytes_per_second": table, "source": "table (exact device name)"}
    why_nvml = found.reason or "NVML did not report the memory clock and bus width"
    return {**out, "reason": f"unknown bandwidth for {name!r}: {why_nvml}, and the name is not in the table "
                             "(pass --bandwidth)"}


def describe_gpu(index: int, pynvml=None) -> dict:
    """Identity of visible GPU `index` for the environment block: UUID, PCI bus id, NVML's match, MIG."""
    props = torch.cuda.get_device_properties(index)
    found = nvml_device(torch.device("cuda", index), pynvml)
    out = {"uuid": _torch_uuid(props), "pci_bus_id": _torch_pci_bus_id(props), "nvml_matched_by": found.matched_by}
    if found.reason:
        out["nvml_unavailable"] = found.reason
    return out


def visible_devices_env() -> dict:
    """The variables that decide which GPUs this process sees."""
    names = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "NVIDIA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")
    return {name: os.environ[name] for name in names if name in os.environ}
