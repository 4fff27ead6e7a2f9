"""Whether this CPU computes bf16 and fp16 natively: a field of the results' environment block, so that a
bf16 or fp16 figure measured on a CPU without native support says what it measures (issue 18).

Without the instructions below, torch's CPU kernels convert bf16 / fp16 operands to fp32 for the arithmetic
and back, so those cells run slower than fp32 (on an AVX2-only EPYC, VisDial answer ranking took 70-76 s at
bf16 and fp16 against 34 s at fp32): the figure is the cost of the emulation, not of the precision.
"""
from __future__ import annotations

# x86 instruction sets with bf16 / fp16 arithmetic (dot products or matrix tiles); Arm's flags of the same use
NATIVE = {"bf16": ("avx512_bf16", "amx_bf16", "bf16"), "fp16": ("avx512_fp16", "amx_fp16", "fphp", "asimdhp")}


def low_precision_support(cpu_info: dict) -> dict[str, dict]:
    """{"bf16": {...}, "fp16": {...}} for `environment.describe_cpu`'s answer, each with `native` (True / False /
    None: flags unknown), the instructions found, and a note saying what a CPU figure at that precision measures."""
    flags = set(cpu_info["instruction_sets"]) if cpu_info.get("source") else None
    out = {}
    for precision, instructions in NATIVE.items():
        found = sorted(f for f in instructions if flags is not None and f in flags)
        if flags is None:
            out[precision] = {"native": None, "instructions": [], "note": "CPU flags unknown"}
        elif found:
            out[precision] = {"native": True, "instructions": found,
                              "note": f"{precision} arithmetic in hardware ({', '.join(found)})"}
        else:
            out[precision] = {"native": False, "instructions": [],
                              "note": f"no native {precision} on this CPU (none of {', '.join(instructions)}): "
                                      f"{precision} is converted to fp32 for the arithmetic, so {precision} cells "
                                      "run slower than fp32; their speed measures that emulation, not the precision"}
    return out
