"""The results' environment says whether this CPU computes bf16 / fp16 natively (issue 18)."""
from fromage_bench.cpu_precision import low_precision_support
from fromage_bench.environment import describe_cpu


def cpu_info(cpuinfo: str) -> dict:
    return describe_cpu(cpuinfo, lscpu="")

ZEN4 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx2 fma avx512f avx512_bf16 avx512_vnni\n\nprocessor\t: 1\n"
AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse avx avx2 fma f16c\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd asimdhp bf16 i8mm\n"


def test_a_zen4_has_native_bf16_but_emulates_fp16():
    support = low_precision_support(cpu_info(ZEN4))
    assert support["bf16"]["native"] is True and support["bf16"]["instructions"] == ["avx512_bf16"]
    assert support["fp16"]["native"] is False and "emulation" in support["fp16"]["note"]


def test_an_avx2_only_cpu_emulates_both():
    support = low_precision_support(cpu_info(AVX2))  # f16c only converts: no fp16 arithmetic
    assert [support[p]["native"] for p in ("bf16", "fp16")] == [False, False]
    assert "slower than fp32" in support["bf16"]["note"]


def test_arm_features_are_read_and_no_flags_means_unknown():
    support = low_precision_support(cpu_info(ARM))
    assert support["bf16"]["instructions"] == ["bf16"] and support["fp16"]["instructions"] == ["asimdhp"]
    assert low_precision_support(cpu_info("processor : 0\nmodel name : x\n"))["bf16"]["native"] is None
