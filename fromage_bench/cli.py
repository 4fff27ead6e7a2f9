"""`fromage-bench` command line. Bad input -> one line on stderr naming the file and the problem, exit 2."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", type=Path, help="directory with model_args.json and pretrained_ckpt.pth.tar")
    parser.add_argument("--opt-version", help="override the LM: a local directory or a Hugging Face id in the local cache")
    parser.add_argument("--visual-model", help="override the vision encoder (local directory or cached HF id)")
    parser.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available)")
    parser.add_argument("--precision", help="fp32, bf16, fp16 or int8 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--retrieval-set", type=Path, help="directory written by build-retrieval-set or convert-embeddings")
    parser.add_argument("--accept-foreign-retrieval-set", action="store_true",
                        help="use a retrieval set recorded as built by another model or preprocessing (else an error)")
    parser.add_argument("--random-init", action="store_true",
                        help="paper-scale backbones with random weights from shipped configs (no weights needed)")
    parser.add_argument("--seed", type=int)


def _load(args):
    from model.loading import load_model

    return load_model(args.model_dir, opt_version=args.opt_version, visual_model=args.visual_model, device=args.device,
                precision=args.precision, retrieval_set=args.retrieval_set, random_init=args.random_init,
                seed=args.seed or 0, accept_foreign_retrieval_set=args.accept_foreign_retrieval_set)


def cmd_make_tiny(args) -> int:
    from model import make_tiny
    from model.tiny import make_tiny_gill

    if args.family == "gill":  # GILL's release layout (model.gill); 4 visual tokens unless asked, as its release
        out = make_tiny_gill(args.out, seed=args.seed, n_visual_tokens=args.n_visual_tokens or 4)
        print(f"wrote a tiny GILL model to {out}")
        return 0
    out = make_tiny(args.out, seed=args.seed, n_visual_tokens=args.n_visual_tokens or 1)
    print(f"wrote a tiny FROMAGe model to {out}")
    return 0


def cmd_convert_embeddings(args) -> int:
    from model import RetrievalSet

    retrieval = RetrievalSet.from_original_pickles(args.pickles, trust_pickle=args.trust_pickle)
    if args.image_root:
        retrieval.image_root = str(args.image_root)
    out = retrieval.save(args.out)
    print(f"wrote {len(retrieval)} embeddings of dimension {retrieval.embeddings.shape[1]} to {out}")
    return 0


def cmd_info(args) -> int:
    fromage = _load(args)
    model = fromage.model
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    trained = count(model) - count(model.lm) - count(model.visual_model)
    info = {
        "device": str(fromage.placement.device), "precision": fromage.placement.precision,
        "opt_version": model.args.opt_version, "visual_encoder": model.args.visual_encoder,
        "n_visual_tokens": model.args.n_visual_tokens, "lm_parameters": count(model.lm),
        "vision_parameters": count(model.visual_model), "trained_parameters": trained,
        "weight_bytes": fromage.weight_bytes, "retrieval_token_idx": model.retrieval_token_idx,
        "retrieval_set_size": len(fromage.retrieval_set) if fromage.retrieval_set else 0,
        "fingerprint": fromage.fingerprint,
    }
    if getattr(fromage, "release_info", None):  # GILL: its [IMG] ids, decision model, unused generation map
        release = fromage.release_info
        info["release"] = {**release, "ignored_checkpoint_keys": len(release["ignored_checkpoint_keys"])}
    print(json.dumps(info, indent=2))
    return 0


def cmd_generate(args) -> int:
    from model.images import load_image
    from model.inference import RETRIEVED_PATH

    use_embedded_default(args)
    fromage = _load(args)
    if "generate" not in getattr(fromage, "capabilities", {"generate"}):  # GILL (model/gill.py): retrieval only
        from model.errors import FromageInputError

        raise FromageInputError(args.model_dir, f"the {fromage.family} family cannot generate text here")
    prompt = [load_image(args.image)] if args.image else []
    prompt.append(args.text)
    outputs = fromage.generate_for_images_and_texts(prompt, num_words=args.num_words, ret_scale_factor=args.ret_scale_factor)
    for item in outputs:
        print(item if isinstance(item, str) else
              f"<{len(item)} retrieved image(s): {', '.join(im.info.get(RETRIEVED_PATH, '?') for im in item)}>")
    return 0


def use_embedded_default(args) -> bool:
    """No --model-dir (and no --random-init): the embedded default's trained model and, unless --retrieval-set
    names another, its retrieval set, built first if missing (`generate`, `demo`, the examples). True if used."""
    from .embedded import DEFAULT_WORK, ensure_model

    if args.model_dir is not None or args.random_init:
        return False
    print(f"fromage-bench: no --model-dir: using the embedded default model ({DEFAULT_WORK}; built there if missing)",
          file=sys.stderr, flush=True)
    args.model_dir, retrieval = ensure_model(DEFAULT_WORK)
    if args.retrieval_set is None:
        args.retrieval_set = retrieval
    return True


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def read_config_file(path: Path) -> dict:
    """TOML or YAML file whose keys are the eval flags (with underscores): tasks, precisions, data_root, ..."""
    from model.errors import FromageInputError

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise FromageInputError(path, f"cannot read config file: {err.strerror or err}") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            import tomllib

            data = tomllib.loads(text)
    except Exception as err:  # tomllib.TOMLDecodeError / yaml.YAMLError: the parser's message says where
        raise FromageInputError(path, f"malformed config: {err}") from None
    if not isinstance(data, dict):
        raise FromageInputError(path, "expected a table/mapping of eval options")
    return data


def eval_config_from_args(args):
    from model.errors import FromageInputError

    from .runner import EvalConfig, default_cache_dir

    values = {}
    if args.config:
        values = read_config_file(args.config)
        known = {f for f in EvalConfig.__dataclass_fields__}
        unknown = sorted(set(values) - known)
        if unknown:
            raise FromageInputError(args.config, f"unknown option(s) {', '.join(unknown)}", f"known: {', '.join(sorted(known))}")
    flags = {"tasks": args.tasks, "out": args.out, "data_root": args.data_root, "model_dir": args.model_dir,
             "opt_version": args.opt_version, "visual_model": args.visual_model, "device": args.device,
             "protocols": args.protocol, "limit": args.limit, "batch_size": args.batch_size, "seed": args.seed,
             "option_batch_size": args.option_batch_size, "image_workers": args.image_workers,
             "retrieval_set": args.retrieval_set, "clip": args.clip, "label": args.label}
    if args.accept_foreign_retrieval_set:
        flags["accept_foreign_retrieval_set"] = True
    values.update({k: v for k, v in flags.items() if v is not None})  # flags win over the file
    precisions = _split(args.precisions or args.precision) or values.get("precisions") or []
    values["precisions"] = _split(precisions) if isinstance(precisions, str) else list(precisions)
    values["random_init"] = bool(args.random_init or values.get("random_init", False))
    values["progress"] = not args.no_progress and values.get("progress", True)
    for required in ("tasks", "out"):
        if not values.get(required):
            raise FromageInputError(f"--{required.replace('_', '-')}", "required (flag or config file)")
    for key in ("out", "data_root", "model_dir", "retrieval_set", "cache_dir"):
        if values.get(key) is not None:
            values[key] = Path(values[key])
    if args.no_cache:
        values["cache_dir"] = None
    elif values.get("cache_dir") is None:
        values["cache_dir"] = args.cache_dir or default_cache_dir()
    return EvalConfig(**values)


def _relaunch_with_torchrun(args) -> int:
    """`--nproc N`: the same command under `torchrun --nproc-per-node N` (one process per GPU, or gloo on CPU)."""
    import os
    import socket
    import subprocess

    argv = list(args.argv)
    i = argv.index("--nproc")
    del argv[i:i + 2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "fromage_bench", *argv]
    return subprocess.call(command, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


def cmd_eval(args) -> int:
    import os

    from .runner import run_eval

    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _relaunch_with_torchrun(args)
    config = eval_config_from_args(args)
    config.keep_journal = args.keep_journal
    path = run_eval(config)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"wrote {path}")
    _write_report(path.parent)
    return 0


def _write_report(run_dir: Path) -> None:
    """The results are already safe on disk; a report failure is reported, not fatal."""
    from reports import write_report

    try:
        print(f"wrote {write_report(run_dir)}")
    except Exception as err:  # noqa: BLE001 - keep the run's results even if rendering breaks
        print(f"fromage-bench: warning: report not written: {err} (rerun `fromage-bench report {run_dir}`)",
              file=sys.stderr)


def cmd_tasks(args) -> int:
    from .runner import family_support, list_tasks

    for t in list_tasks():
        print(f"{t['name']}: {t['description']}")
        print(f"    settings: {', '.join(t['settings'])}; protocols: {', '.join(t['protocols'])}")
        print(f"    metrics: {', '.join(t['metrics'])}")
        for role, path in t["files"].items():
            print(f"    {role}: <data-root>/{path}")
    families, rows = family_support()
    width = max(len(cell) for cell, _ in rows)
    print("\nmodel families (yes: runs; no: the cell is recorded as skipped, with the reason):")
    print((f"    {'task:setting'.ljust(width)}  " + "  ".join(f.ljust(7) for f in families)).rstrip())
    for cell, support in rows:
        print((f"    {cell.ljust(width)}  " + "  ".join(("yes" if support[f] else "no").ljust(7) for f in families)).rstrip())
    return 0


def cmd_embedded(args) -> int:
    from . import embedded

    embedded.run_embedded(args.work or embedded.DEFAULT_WORK, args.out or embedded.DEFAULT_OUT,
                          args.precisions or embedded.PRECISIONS,
                          extra_eval=["--no-progress"] if args.no_progress else None)
    return 0


def cmd_compare(args) -> int:
    from .compare import parse_reports, run_compare

    reports = parse_reports(args.report)
    if args.output:
        reports[args.format] = args.output
    code, text = run_compare(args.base, args.new, args.metric_tol, args.speed_tol, args.memory_tol, rule=args.rule,
                             output="text" if args.output else args.format, reports=reports,
                             compare_speed_anyway=args.compare_speed_anyway)
    print(text, end="")
    return code


def _ints(text: str | None) -> list[int] | None:
    from model.errors import FromageInputError

    if text is None:
        return None
    try:
        return [int(v) for v in _split(text)]
    except ValueError:
        raise FromageInputError(f"{text!r}", "expected comma-separated integers") from None


def cmd_profile(args) -> int:
    from .profiler import SCENARIOS, ProfileConfig, run_profile
    from .results import read_results

    cfg = ProfileConfig(out=args.out, model_dir=args.model_dir, random_init=args.random_init, opt_version=args.opt_version,
                        visual_model=args.visual_model, device=args.device,
                        precisions=_split(args.precisions or args.precision),
                        scenarios=_split(args.scenarios) or list(SCENARIOS), warmup=args.warmup, repeats=args.repeats,
                        min_seconds=args.min_seconds,
                        new_tokens=args.new_tokens, seed=args.seed or 0, bandwidth=args.bandwidth, naive=args.naive,
                        decode_paths=_split(args.decode_paths) or ["auto"], int8_outliers=args.int8_outliers)
    for flag, attr in (("image_batch_sizes", "image_batch_sizes"), ("context_lengths", "context_lengths"),
                       ("decode_batch_sizes", "decode_batch_sizes"), ("pool_sizes", "pool_sizes")):
        values = _ints(getattr(args, flag))
        if values:
            setattr(cfg, attr, values)
    if args.options:
        cfg.options = args.options
    if args.option_batch_size is not None:
        cfg.option_batch_size = args.option_batch_size
    path = run_profile(cfg)
    print(f"wrote {path}")
    _write_report(path.parent)
    failed = [r for r in read_results(path.parent)["records"] if r["status"] == "error"]
    for r in failed:
        print(f"profile: {r['scenario']} {r['precision']} {r['params']} failed: {r['reason']}", file=sys.stderr)
    return 1 if failed else 0


def cmd_report(args) -> int:
    from reports import main_report

    path = main_report(args.run_dir, args.images, args.benchmarks)
    print(f"wrote {path}")
    return 0


def cmd_results_csv(args) -> int:
    from .results import to_csv

    print(f"wrote {to_csv(args.run_dir, args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fromage-bench", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny", help="write a tiny FROMAGe model directory in the release format (offline)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-visual-tokens", type=int, choices=(1, 4), help="default: 1 (fromage), 4 (gill)")
    p.add_argument("--family", choices=("fromage", "gill"), default="fromage",
                   help="release layout to write: FROMAGe's (default) or GILL's")
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("convert-embeddings", help="convert the original cc3m_embeddings*.pkl to a safe retrieval set")
    p.add_argument("pickles", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--image-root", type=Path, help="directory that relative paths in the set resolve against")
    p.add_argument("--trust-pickle", action="store_true", help="allow unpickling (runs code from the file: trusted files only)")
    p.set_defaults(func=cmd_convert_embeddings)

    p = sub.add_parser("tasks", help="list the evaluation tasks, their settings, metrics and expected files")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("eval", help="evaluate a model on tasks at one or more precisions; writes results.json")
    _add_model_arguments(p)
    p.add_argument("--tasks", help="e.g. vist_retrieval:5cap4img,visdial_ranking (no setting = all settings)")
    p.add_argument("--data-root", type=Path, help="root of the datasets in their official layouts (see `tasks`)")
    p.add_argument("--out", type=Path, help="run directory: results.json, predictions/, report.html")
    p.add_argument("--precisions", help="comma-separated, e.g. fp32,bf16,fp16,int8 (one model load each)")
    p.add_argument("--protocol", help="paper, corrected or both (default: every protocol a task has)")
    p.add_argument("--limit", type=int, help="first N examples of each task")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--option-batch-size", type=int,
                   help="VisDial answer options scored per forward pass (default 100: a round's options in one; "
                        "halved on CUDA out-of-memory)")
    p.add_argument("--image-workers", type=int,
                   help="processes decoding image files (default: the cores beyond two, up to 8; 0 decodes "
                        "in this process)")
    p.add_argument("--config", type=Path, help="TOML or YAML file with the same options (flags win)")
    p.add_argument("--cache-dir", type=Path, help="image feature cache (default ~/.cache/fromage-bench/features)")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--nproc", type=int, help="run under torchrun with N processes (examples sharded, same results)")
    p.add_argument("--keep-journal", action="store_true", help="keep OUT/.journal (per-batch results) after success")
    # model families (model/family.py): --model-dir detects FROMAGe / GILL / CLIP from the directory's files
    p.add_argument("--clip", help="evaluate a CLIP model instead of --model-dir: a local directory or a Hugging Face "
                                  "id in the local cache (nothing is downloaded)")
    p.add_argument("--label", help="the model's name in the results (default: its family)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="compare two runs; exit 1 if NEW regressed beyond tolerance, else 0")
    p.add_argument("base", type=Path, help="run directory or results.json")
    p.add_argument("new", type=Path, help="run directory or results.json")
    p.add_argument("--metric-tol", default="0.5", help="allowed metric drop in points (default 0.5)")
    p.add_argument("--speed-tol", default="10%", help="allowed slow-down, relative (default 10%%)")
    p.add_argument("--memory-tol", default="5%", help="allowed memory growth, relative (default 5%%)")
    p.add_argument("--rule", choices=("paired", "absolute"), default="paired",
                   help="metrics: paired (default: a regression when the paired bootstrap interval of NEW - BASE "
                        "over the shared examples lies wholly below -metric-tol) or absolute (a drop > metric-tol)")
    p.add_argument("--format", choices=("text", "markdown", "json", "junit"), default="text",
                   help="text (default), markdown (a GitHub job summary), json (scripts), junit (one test case per record)")
    p.add_argument("--output", type=Path, help="write the --format report here (the text report goes to standard output)")
    p.add_argument("--report", action="append", metavar="FORMAT=PATH",
                   help="also write the report in FORMAT to PATH, from the same comparison (repeatable), "
                        "e.g. --report junit=runs/regression/compare.xml")
    p.add_argument("--compare-speed-anyway", action="store_true",
                   help="compare speed and memory even between environments that are not comparable")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("profile", help="time inference scenarios at each precision (no accuracy)")
    _add_model_arguments(p)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--precisions", help="comma-separated, e.g. bf16,fp16,int8")
    p.add_argument("--scenarios", help="comma-separated subset of image_encoding,prefill,decode,option_scoring,retrieval")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before each item's timed ones (default 2)")
    p.add_argument("--repeats", type=int, default=10,
                   help="each item: at least this many timed calls (default 10) ...")
    p.add_argument("--min-seconds", type=float, default=2.0,
                   help="... and at least this many seconds of timed work, whichever takes longer (default 2)")
    p.add_argument("--image-batch-sizes", help="default 1,8,32")
    p.add_argument("--context-lengths", help="prefill lengths, default 32,128,512")
    p.add_argument("--decode-batch-sizes", help="default 1,4,16")
    p.add_argument("--decode-paths", help="comma-separated decode paths to time: auto (default), dynamic, static, "
                                          "graph, compiled")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--options", type=int, help="answer options per context (default 100)")
    p.add_argument("--option-batch-size", type=int,
                   help="options per scoring pass, as `eval --option-batch-size` (default 100)")
    p.add_argument("--pool-sizes", help="retrieval pool sizes, default 1000,100000")
    p.add_argument("--bandwidth", type=float, help="device memory bandwidth in bytes/s for the decode roofline")
    p.add_argument("--naive", action="store_true",
                   help="also time the reference paths (no-cache decode, per-option scoring) for the speed-up")
    p.add_argument("--int8-outliers", default="planted",
                   help="with --random-init: planted (default: a few hidden dimensions of magnitude 20 in the layer "
                        "norms' outputs, as trained OPT has, so int8 takes LLM.int8()'s outlier path) or none")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("report", help="(re)generate RUN_DIR/report.html from RUN_DIR/results.json")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--images", action="append", metavar="TASK=DIR",
                   help="image directory for a task's thumbnails (default: from the run's data root)")
    p.add_argument("--benchmarks", type=Path, metavar="FILE",
                   help="pytest-benchmark JSON for the speed-up table (`nox -s bench` writes runs/bench/benchmarks.json; "
                        "default: RUN_DIR/benchmarks.json if present)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("results-csv", help="export a run's results.json as CSV (one row per record)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("out", type=Path)
    p.set_defaults(func=cmd_results_csv)

    from .data_cli import add_data_parser
    from .demo import add_demo_parser
    from .reproduce import add_reproduce_parser
    from .retrieval_build import add_build_retrieval_parser
    from .train_cli import add_train_parser

    add_train_parser(sub)
    add_data_parser(sub)
    add_build_retrieval_parser(sub)
    add_demo_parser(sub)
    add_reproduce_parser(sub)  # issue 16: the paper's tables

    p = sub.add_parser("embedded", help="the offline default benchmark: miniworld data, stand-in backbones, "
                                        "a trained FROMAGe, every task at every precision (stages cached)")
    p.add_argument("--work", type=Path, default=None, help="cache of the built stages (default runs/embedded-cache)")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/embedded)")
    p.add_argument("--precisions", default=None, help="default fp32,bf16,fp16,int8")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_embedded)

    p = sub.add_parser("info", help="load a model and print its size, precision and weight bytes")
    _add_model_arguments(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="generate text (and [RET] retrievals) for an optional image and a text prompt")
    _add_model_arguments(p)
    p.add_argument("--image", type=Path)
    p.add_argument("--text", required=True)
    p.add_argument("--num-words", type=int, default=16)
    p.add_argument("--ret-scale-factor", type=float, default=1.0)
    p.set_defaults(func=cmd_generate)
    return parser


def configure_output(verbose: bool = False) -> None:
    """Log lines at INFO with `verbose`, else WARNING; no per-file "Loading weights" bars from transformers
    (noise between our own progress and errors)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def print_input_error(err: Exception, prog: str = "fromage-bench") -> int:
    """Bad input: the one line the user sees (it names the file and the problem); returns the exit status."""
    print(f"{prog}: error: {err}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    from model.errors import FromageInputError

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    configure_output(args.verbose)
    try:
        return args.func(args)
    except FromageInputError as err:
        return print_input_error(err)
