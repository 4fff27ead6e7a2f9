"""Where the time goes in one profile scenario: torch.profiler's top operators by device and host time.

    python scripts/trace_scenario.py --random-init --precision bf16 --out trace.txt
"""
import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fromage_bench.profiler import ProfileConfig, scenario_decode, scenario_option_scoring  # noqa: E402
from model import load_fromage  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir")
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--opt-version")
    parser.add_argument("--visual-model")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model = load_fromage(args.model_dir, random_init=args.random_init, opt_version=args.opt_version,
                         visual_model=args.visual_model, precision=args.precision)
    cfg = ProfileConfig(out=Path("."), decode_batch_sizes=[1])
    gen = torch.Generator().manual_seed(0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    lines = []
    with torch.inference_mode():
        work = {"option_scoring": next(scenario_option_scoring(model, cfg, gen))[1],
                "decode_32_tokens": next(scenario_decode(model, cfg, gen))[1][0]}
        for name, fn in work.items():
            for _ in range(2):
                fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            with profile(activities=activities) as prof:
                fn()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
            for key in ("self_cuda_time_total", "self_cpu_time_total") if torch.cuda.is_available() else ("self_cpu_time_total",):
                lines.append(f"== {name}: top operators by {key} ==")
                lines.append(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))
    Path(args.out).write_text("\n".join(lines))


if __name__ == "__main__":
    main()
