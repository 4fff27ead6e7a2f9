"""Peak memory bandwidth for the decode roofline: NVML's max memory clock x bus width x 2 first, the table by
exact name as the fallback (no "GH200" -> H200, "RTX A1000" -> A100), MIG refused and unknown devices said,
the source recorded; a GPU-specific target judged on its GPU or scaled and labelled."""
import pytest
import torch

from fromage_bench.devices import peak_bandwidth, table_bandwidth
from fromage_bench.profiler import _decode_roofline, copy_bandwidth, judge_target, target_text
from tests.fake_gpu import FakeGpu, FakeNvml, install, torch_props

CUDA0 = torch.device("cuda", 0)


def one_gpu(monkeypatch, name, nvml=True, **gpu):
    fake = FakeGpu(uuid="GPU-11111111-2222-3333-4444-555555555555", pci_bus_id="00000000:06:00.0", name=name, **gpu)
    install(monkeypatch, FakeNvml([fake]) if nvml else None, [torch_props(name, uuid=fake.uuid)])
    return fake


# NVML's max memory clock (MHz) and bus width (bits) as nvidia-smi -q reports them, against the datasheet figure
@pytest.mark.parametrize("name, clock_mhz, bus_bits, datasheet", [
    ("NVIDIA H100 80GB HBM3", 2619, 5120, 3.35e12),  # 2619e6 * 640 B * 2 = 3.352 TB/s
    ("NVIDIA H200", 3201, 6144, 4.8e12),  # 4.917 TB/s: 2.4 % over NVIDIA's rounded 4.8
    ("NVIDIA A100-SXM4-80GB", 1593, 5120, 2.039e12),
    ("NVIDIA GeForce RTX 4090", 10501, 384, 1.008e12),  # GDDR6X: NVML's clock is half the data rate too
])
def test_nvml_formula_agrees_with_the_datasheet(monkeypatch, name, clock_mhz, bus_bits, datasheet):
    one_gpu(monkeypatch, name, memory_clock_mhz=clock_mhz, bus_width_bits=bus_bits)
    bw = peak_bandwidth(CUDA0)
    assert bw["source"].startswith("nvml") and bw["memory_clock_mhz"] == clock_mhz
    assert bw["bytes_per_second"] == pytest.approx(clock_mhz * 1e6 * bus_bits / 8 * 2)
    assert bw["bytes_per_second"] == pytest.approx(datasheet, rel=0.03)
    assert table_bandwidth(name) == pytest.approx(datasheet, rel=0.001)


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H200", 4.8e12), ("NVIDIA H100 80GB HBM3", 3.35e12), ("NVIDIA H100 PCIe", 2.0e12),
    ("NVIDIA A100-SXM4-40GB", 1.555e12), ("nvidia  a10", 0.6e12), ("NVIDIA A10G", 0.6e12),
])
def test_table_fallback_by_exact_name_when_nvml_cannot_say(monkeypatch, name, expected):
    one_gpu(monkeypatch, name, memory_clock_mhz=None, bus_width_bits=None)  # an old driver: no bus width
    bw = peak_bandwidth(CUDA0)
    assert bw == {"bytes_per_second": expected, "source": "table (exact device name)", "device_name": name}


@pytest.mark.parametrize("name, substring_match", [
    ("NVIDIA GH200 480GB", "H200"),  # Grace Hopper: 4.0 TB/s HBM3, not the H200's 4.8
    ("NVIDIA RTX A1000", "A100"),  # a 192 GB/s workstation card, not an A100
    ("NVIDIA A100 MIG 1g.10gb", "A100"),
])
def test_the_substring_traps_are_not_matched(name, substring_match):
    assert table_bandwidth(name) is None
    assert substring_match in name


@pytest.mark.parametrize("name", ["NVIDIA RTX A6000", "NVIDIA L4", "NVIDIA L40", "Tesla V100-SXM2-16GB",
                                  "NVIDIA H800", "NVIDIA B200", "NVIDIA GH200 480GB", "NVIDIA RTX A1000"])
def test_unknown_bandwidth_is_reported_not_dropped(monkeypatch, name):
    one_gpu(monkeypatch, name, nvml=False)
    bw = peak_bandwidth(CUDA0)
    assert bw["bytes_per_second"] is None and bw["source"] is None
    assert f"unknown bandwidth for {name!r}" in bw["reason"] and "NVML is not available" in bw["reason"]
    assert "--bandwidth" in bw["reason"]


def test_nvml_knows_what_the_table_does_not(monkeypatch):
    one_gpu(monkeypatch, "NVIDIA GH200 480GB", memory_clock_mhz=2619, bus_width_bits=5120)
    bw = peak_bandwidth(CUDA0)
    assert bw["source"].startswith("nvml") and bw["bytes_per_second"] == pytest.approx(3.352e12, rel=1e-3)


@pytest.mark.parametrize("name, mig_mode", [("NVIDIA A100-SXM4-40GB MIG 1g.5gb", False),
                                            ("NVIDIA H100 80GB HBM3", True)])
def test_mig_is_refused_with_the_reason(monkeypatch, name, mig_mode):
    one_gpu(monkeypatch, name, mig=mig_mode)
    bw = peak_bandwidth(CUDA0)
    assert bw["bytes_per_second"] is None and bw["reason"].startswith("MIG instance")


def test_the_override_wins_and_is_labelled(monkeypatch):
    one_gpu(monkeypatch, "NVIDIA H100 80GB HBM3")
    assert peak_bandwidth(CUDA0, override=1.0e12) == {"bytes_per_second": 1.0e12, "source": "--bandwidth",
                                                      "device_name": None}


def test_roofline_says_why_it_is_missing(tiny):
    refused = {"bytes_per_second": None, "source": None, "device_name": "x", "reason": "MIG instance: ..."}
    roof = _decode_roofline(tiny, per_token_seconds=0.01, bandwidth=refused, copy_bandwidth=None)
    assert roof["roofline_unavailable"] == "MIG instance: ..." and "fraction_of_roofline" not in roof
    nvml = {"bytes_per_second": 2e9, "source": "nvml: max memory clock x bus width x 2", "device_name": "x"}
    roof = _decode_roofline(tiny, per_token_seconds=0.01, bandwidth=nvml, copy_bandwidth=None)
    assert roof["bandwidth_source"] == nvml["source"]
    assert roof["fraction_of_roofline"] == pytest.approx(roof["weight_bytes"] * 100 / 2e9)


def test_a_target_is_judged_on_its_gpu_or_scaled_and_labelled():
    h100 = {"bytes_per_second": 3.35e12, "device_name": "NVIDIA H100 80GB HBM3"}
    on_h100 = judge_target("visdial_val_projected_minutes", 14.0, h100)
    assert on_h100["scaled"] is False and on_h100["limit"] == 15.0 and on_h100["met"] is True
    h200 = {"bytes_per_second": 4.8e12, "device_name": "NVIDIA H200"}
    on_h200 = judge_target("visdial_val_projected_minutes", 14.0, h200)
    # a bandwidth-bound workload runs 4.8/3.35 times faster here: the limit shrinks to 15 * 3.35 / 4.8 = 10.47
    assert on_h200["scaled"] is True and on_h200["limit"] == pytest.approx(10.46875)
    assert on_h200["met"] is False
    assert "scaled from 15 min on NVIDIA H100 80GB HBM3" in target_text(on_h200)
    unknown = judge_target("visdial_val_projected_minutes", 1.0, {"bytes_per_second": None, "device_name": None,
                                                                  "reason": "not a GPU (cpu)"})
    assert unknown["met"] is None and "not a GPU (cpu)" in unknown["not_judged"]


def test_the_copy_probe_frees_its_buffers_and_empties_the_cache(monkeypatch):
    """The probe's buffers (2 GiB on a GPU) are gone, and the cached blocks handed back, before it returns."""
    import gc
    import weakref

    import fromage_bench.profiler as profiler

    made, real_empty = [], torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        made.append(weakref.ref(t))
        return t

    released = []
    monkeypatch.setattr(profiler.torch, "empty", empty)
    monkeypatch.setattr(profiler, "reset_device_memory",
                        lambda device: (gc.collect(), released.append([r() is None for r in made])))
    rate = copy_bandwidth(torch.device("cpu"), 1 << 16)
    assert rate > 0 and made and released == [[True] * len(made)]
