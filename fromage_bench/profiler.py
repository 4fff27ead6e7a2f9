"""`fromage-bench profile`: cost of each inference scenario, isolated from accuracy, at each precision.

Scenarios (what runs) are small functions that build inputs and return a closure doing one unit of work;
the timer (what is measured) runs warm-up calls and then timed calls around it (at least `repeats` of them and at
least `min_seconds` of timed work), with CUDA events on GPU.
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from model import FromageInputError, PRECISIONS, load_fromage, resolve_placement
from model.precision import INT8_OUTLIERS
from model.errors import require_known
from model.prompts import EmbeddedPrompt, pad_batch
from model.generation import DECODE_PATHS, STATIC_PATHS, generate
from model.static_decode import supports_static
from tasks.visdial import PROTOCOLS as VISDIAL_PROTOCOLS, Dialogue, Round, ranking_context_text, score_round

from .environment import describe_environment
from .results import write_results
from .devices import normalized_name, peak_bandwidth, table_bandwidth
from .trackers import MemoryTracker, Stopwatch, release_memory, reset_device_memory

SCENARIOS = ("image_encoding", "prefill", "decode", "option_scoring", "retrieval")
VISDIAL_VAL_ROUNDS = 2064 * 10  # VisDial v1.0 val: 2064 dialogues x 10 rounds, 100 options each

# Targets set on one GPU (the performance issue's), judged on that GPU or scaled to this one by the ratio of peak
# memory bandwidths (these workloads read weights and KV caches: bandwidth-bound), and labelled as scaled.
TARGETS = {"visdial_val_projected_minutes": {"at_most": 15.0, "set_for": "NVIDIA H100 80GB HBM3"}}


@dataclass
class ProfileConfig:
    out: Path
    model_dir: Path | None = None
    random_init: bool = False
    opt_version: str | None = None
    visual_model: str | None = None
    device: str | None = None
    precisions: list[str] = field(default_factory=list)
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS))
    warmup: int = 2  # untimed calls before each item's timed ones
    repeats: int = 10  # each item: at least this many timed calls ...
    min_seconds: float = 2.0  # ... and at least this much timed work, whichever takes longer
    image_batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    context_lengths: list[int] = field(default_factory=lambda: [32, 128, 512])
    decode_batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 16])
    decode_paths: list[str] = field(default_factory=lambda: ["auto"])  # see model.generation.DECODE_PATHS
    new_tokens: int = 32
    options: int = 100
    option_tokens: int = 7
    option_context_tokens: int = 120
    option_batch_size: int = 100  # options per scoring pass, as `eval --option-batch-size`
    pool_sizes: list[int] = field(default_factory=lambda: [1000, 100000])
    seed: int = 0
    bandwidth: float | None = None  # bytes/s, overrides NVML and the table (devices.peak_bandwidth)
    naive: bool = False  # also time the reference paths (no-cache decode, per-option scoring) for comparison
    int8_outliers: str = "planted"  # random init: plant outlier feature dimensions (model.precision) or "none"

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


def time_it(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int, min_seconds: float = 0.0,
            clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds per call of `fn`, after `warmup` untimed calls: at least `repeats` timed calls (one at the least)
    and at least `min_seconds` of timed work, whichever takes longer. CUDA events on GPU, `clock` on CPU."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    timed = 0.0
    while len(times) < max(repeats, 1) or timed < min_seconds:
        times.append(_timed_call(fn, device, clock))
        timed += times[-1]
    return times


def _timed_call(fn: Callable[[], object], device: torch.device, clock: Callable[[], float]) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000.0
    t0 = clock()
    fn()
    return clock() - t0


def _summary(times: list[float]) -> dict:
    """Median and interquartile range (quartiles interpolated linearly, as numpy.percentile does) of the timed
    calls, with the extremes, the count, the timed total and every value."""
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else times * 3
    return {"median": statistics.median(times), "q1": q1, "q3": q3, "iqr": q3 - q1, "min": min(times),
            "max": max(times), "n": len(times), "timed_seconds": sum(times), "all": times}


def _random_text(model, n_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """Random token ids (BOS first) from the tokenizer's ordinary vocabulary."""
    vocab = len(model.model.tokenizer) - 2  # exclude <|image|> and [RET]
    ids = torch.randint(4, vocab, (n_tokens,), generator=generator)
    ids[0] = model.model.tokenizer.bos_token_id
    return ids


def _embedded(model, ids: torch.Tensor) -> EmbeddedPrompt:
    ids = ids.to(model.model.device)
    return EmbeddedPrompt(model.model.embed_tokens(ids), ids, ids)


def _pixels(model, batch: int, generator: torch.Generator) -> torch.Tensor:
    size = model.model.visual_model.config.image_size
    return torch.randn(batch, 3, size, size, generator=generator)


def scenario_image_encoding(model, cfg, gen):
    for batch in cfg.image_batch_sizes:
        pixels = _pixels(model, batch, gen).to(model.model.device)
        yield {"batch_size": batch}, (lambda p=pixels: model.model.get_visual_embs(p, "retrieval")), {"images": batch}


def scenario_prefill(model, cfg, gen):
    limit = model.model.lm.config.max_position_embeddings
    for length in cfg.context_lengths:
        if length > limit:
            continue
        batch = pad_batch([_embedded(model, _random_text(model, length, gen))])
        run = lambda b=batch: model.model.lm(inputs_embeds=b.embeds, attention_mask=b.attention_mask,  # noqa: E731
                                             position_ids=b.position_ids, use_cache=True)
        yield {"context_tokens": length, "batch_size": 1}, run, {"tokens": length}


def scenario_decode(model, cfg, gen):
    """Time T new tokens and 1 new token; the difference over T-1 is the per-token decode cost (prefill and
    the per-call set-up cancel out)."""
    prompt_len = 32
    for batch_size in cfg.decode_batch_sizes:
        batch = pad_batch([_embedded(model, _random_text(model, prompt_len, gen)) for _ in range(batch_size)], side="left")
        # the chosen decode paths ("auto": CUDA graph where possible), plus, for the speed-up, the dynamic-cache
        # step and the original's no-cache decoding at batch 1
        paths = list(cfg.decode_paths)
        if cfg.naive and batch_size == 1:
            paths += [p for p in ("dynamic", "naive_no_cache") if p not in paths]
        for path in paths:
            params = {"batch_size": batch_size, "prompt_tokens": prompt_len, "new_tokens": cfg.new_tokens}
            if path != "auto":
                params["path"] = path
            if path in STATIC_PATHS and not supports_static(model.model.lm):
                yield params, None, {"skipped": "this model cannot take the static decode step (int8, or not an OPT with ReLU)"}
                continue
            kwargs = {"use_cache": False} if path == "naive_no_cache" else {"decode": path}
            full = lambda b=batch, k=kwargs: generate(model.model, b, cfg.new_tokens, **k)  # noqa: E731
            one = lambda b=batch, k=kwargs: generate(model.model, b, 1, **k)  # noqa: E731
            yield params, (full, one), {"tokens": batch_size}


def scenario_option_scoring(model, cfg, gen):
    """One VisDial round exactly as `eval` scores it (`tasks.visdial.score_round`: each protocol's context,
    options in passes of `option_batch_size`), for a question of random tokens and random options."""
    features = model.model.vision_features(_pixels(model, 1, gen).to(model.model.device))
    image = model.model.project_visual(features, "captioning")[0]
    decode = model.model.tokenizer.decode
    question = decode(_random_text(model, cfg.option_context_tokens, gen)[1:])
    texts = tuple(decode(_random_text(model, cfg.option_tokens, gen)[1:]) for _ in range(cfg.options))
    dialogue = Dialogue(0, 0, "", (Round(question, "", texts, 0),))
    params = {"options": cfg.options, "context_tokens": cfg.option_context_tokens, "option_tokens": cfg.option_tokens,
              "option_batch_size": cfg.option_batch_size}
    visuals = {protocol: image for protocol in VISDIAL_PROTOCOLS}  # eval's two preprocessings cost the same
    yield (params, (lambda: score_round(model, visuals, dialogue, 0, VISDIAL_PROTOCOLS, cfg.option_batch_size)),
           {"options": cfg.options * len(VISDIAL_PROTOCOLS)})
    if cfg.naive:  # the original script's way: the whole context re-encoded for each option, batches of 20
        context = [image, ranking_context_text(dialogue, 0)]
        yield ({**params, "path": "naive_per_option"}, (lambda: model.score_continuations(context, texts, naive=True)),
               {"options": cfg.options})


def scenario_retrieval(model, cfg, gen):
    queries = [[_random_text(model, 24, gen), torch.tensor([model.model.retrieval_token_idx])] for _ in range(16)]
    dim = model.model.args.shared_emb_dim
    for pool in cfg.pool_sizes:
        matrix = torch.nn.functional.normalize(torch.randn(pool, dim, generator=gen), dim=1).to(
            model.model.device, model.model.dtype)

        def run(m=matrix):
            q = model.retrieval_embeddings(queries)
            return (q.to(m.dtype) @ m.T).topk(10, dim=1)

        yield {"pool_size": pool, "queries": len(queries)}, run, {"queries": len(queries)}


SCENARIO_FUNCTIONS = {"image_encoding": scenario_image_encoding, "prefill": scenario_prefill,
                      "decode": scenario_decode, "option_scoring": scenario_option_scoring,
                      "retrieval": scenario_retrieval}


def measured_copy_bandwidth(device: torch.device) -> float | None:
    """Device-to-device copy rate, bytes read + written per second (a practical ceiling for weight reads)."""
    if device.type != "cuda":
        return None
    return copy_bandwidth(device, 1 << 30)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Copy rate of one `nbytes` buffer into another; both are freed and the allocator's cache emptied before
    returning, so the probe's buffers are in no later item's reserved or NVML figures."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    times = time_it(lambda: y.copy_(x), device, 2, 5)
    del x, y
    reset_device_memory(device)
    return 2 * nbytes / statistics.median(times)


def _decode_roofline(model, per_token_seconds: float, bandwidth: dict, copy_bandwidth: float | None) -> dict:
    """`bandwidth`: `devices.peak_bandwidth`'s answer for the device (its figure, source, or the reason for none)."""
    from model.precision import weight_bytes

    peak = bandwidth.get("bytes_per_second")
    lm_bytes = weight_bytes(model.model.lm)  # every LM weight is read once per generated token at batch 1
    roof = {"weight_bytes": lm_bytes, "measured_tokens_per_second": 1.0 / per_token_seconds,
            "bandwidth_bytes_per_second": peak, "bandwidth_source": bandwidth.get("source"),
            "copy_bandwidth_bytes_per_second": copy_bandwidth}
    if peak:
        roof["roofline_tokens_per_second"] = peak / lm_bytes
        roof["fraction_of_roofline"] = (lm_bytes / per_token_seconds) / peak
    else:  # said, not dropped: MIG, or a device whose bandwidth neither NVML nor the table knows
        roof["roofline_unavailable"] = bandwidth.get("reason") or "no peak bandwidth"
    return roof


def judge_target(name: str, value: float, bandwidth: dict) -> dict:
    """`value` against TARGETS[name] on this device: as set where this is the GPU it was set for, else with the
    limit scaled by (its bandwidth / this device's), labelled `scaled`; not judged without a bandwidth."""
    target = TARGETS[name]
    set_for = target["set_for"]
    out = {"target": name, "at_most": target["at_most"], "set_for": set_for, "value": value,
           "judged_on": bandwidth.get("device_name")}
    if bandwidth.get("device_name") and normalized_name(bandwidth["device_name"]) == normalized_name(set_for):
        return {**out, "scaled": False, "limit": target["at_most"], "met": value <= target["at_most"]}
    here, there = bandwidth.get("bytes_per_second"), table_bandwidth(set_for)
    if not here:
        return {**out, "scaled": None, "met": None,
                "not_judged": f"set for {set_for}, and this device's bandwidth is unknown, so it cannot be scaled"
                              + (f" ({bandwidth['reason']})" if bandwidth.get("reason") else "")}
    limit = target["at_most"] * there / here
    return {**out, "scaled": True, "scale": there / here, "limit": limit, "met": value <= limit,
            "scaled_by": f"bandwidth ratio {there / 1e12:.3g} / {here / 1e12:.3g} TB/s ({set_for} / this device)"}


def _record(scenario: str, precision: str, params: dict, status: str, **fields) -> dict:
    """A profile record of results.json: "ok" with its cost, or "skipped" / "error" with the reason."""
    return {"kind": "profile", "scenario": scenario, "precision": precision, "status": status, "params": params,
            **fields}


def outliers_label(cfg: ProfileConfig) -> str:
    """What the LM's int8 outliers are in this run: "planted" or "none" (random init), or the checkpoint's own."""
    return cfg.int8_outliers if cfg.random_init else "checkpoint"


def profile_precision(cfg: ProfileConfig, precision: str) -> list[dict]:
    records = _profile_precision(cfg, precision)
    for record in records:
        record["int8_outliers"] = outliers_label(cfg)
    return records


def _profile_precision(cfg: ProfileConfig, precision: str) -> list[dict]:
    try:
        placement = resolve_placement(cfg.device, precision)
    except FromageInputError as err:
        if err.where.startswith("device="):
            raise
        return [_record(s, precision, {}, "skipped", reason=str(err)) for s in cfg.scenarios]
    copy_bw = measured_copy_bandwidth(placement.device)  # before the load: its 2 GiB never compete with the model
    with Stopwatch() as load_clock:
        model = load_fromage(cfg.model_dir, opt_version=cfg.opt_version, visual_model=cfg.visual_model,
                             device=placement.device, precision=precision, random_init=cfg.random_init, seed=cfg.seed,
                             int8_outliers=cfg.int8_outliers)
    device = placement.device
    base_cost = {"load_seconds": load_clock.seconds, "weight_bytes": model.weight_bytes}
    bandwidth = peak_bandwidth(device, override=cfg.bandwidth)
    records = _profile_scenarios(model, cfg, precision, base_cost, (bandwidth, copy_bw))
    del model  # the records hold numbers only: this was the last reference
    release_memory()
    return records


def _profile_scenarios(model, cfg: ProfileConfig, precision: str, base_cost: dict, bandwidths: tuple) -> list[dict]:
    """Every scenario's records on a loaded model. Its own function so that the timed closures (which hold
    the model) are gone when the caller frees the model."""
    device = model.placement.device
    gen = torch.Generator().manual_seed(cfg.seed)
    records = []
    with torch.inference_mode():
        for scenario in cfg.scenarios:
            for params, work, units in SCENARIO_FUNCTIONS[scenario](model, cfg, gen):
                if work is None:
                    records.append(_record(scenario, precision, params, "skipped", reason=units["skipped"]))
                    continue
                try:
                    record = _measure(model, cfg, scenario, precision, params, work, units, base_cost, device,
                                      bandwidths)
                except Exception as err:  # noqa: BLE001 - one failing path (a compile, OOM) must not lose the rest
                    record = _record(scenario, precision, params, "error",
                                     reason=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                print(summary_line(record), file=sys.stderr, flush=True)  # a run cut short still shows what it measured
                records.append(record)
    return records


def summary_line(record: dict) -> str:
    """One line per timed item: scenario, precision, params and the headline figures."""
    params = ", ".join(f"{k}={v}" for k, v in record["params"].items())
    head = f"profile {record['scenario']} {record['precision']} ({params})"
    if record["status"] != "ok":
        return f"{head}: {record['status']}: {record['reason']}"
    cost = record["cost"]
    figures = [f"median {cost['seconds']['median'] * 1000:.2f} ms"]
    if "seconds_per_token" in cost:
        figures = [f"{cost['seconds_per_token'] * 1000:.2f} ms/token"]
    figures += [f"{v:,.1f} {k.removesuffix('_per_second')}/s" for k, v in cost.items() if k.endswith("_per_second")]
    fraction = record.get("roofline", {}).get("fraction_of_roofline")
    if fraction is not None:
        figures.append(f"{fraction:.1%} of roofline ({record['roofline']['bandwidth_source']})")
    elif "roofline_unavailable" in record.get("roofline", {}):
        figures.append(f"no roofline: {record['roofline']['roofline_unavailable']}")
    if "projection" in record:
        figures.append(f"VisDial val projected {record['projection']['projected_minutes']:.1f} min")
        if "target" in record["projection"]:
            figures.append(target_text(record["projection"]["target"]))
    return f"{head}: {', '.join(figures)}"


def target_text(judged: dict) -> str:
    """A judged target in words, saying whether its limit was scaled from the GPU it was set for."""
    if judged.get("met") is None:
        return f"target not judged: {judged.get('not_judged')}"
    verdict = "met" if judged["met"] else "not met"
    if judged.get("scaled"):
        return (f"target <= {judged['limit']:.1f} min {verdict} (scaled from {judged['at_most']:g} min on "
                f"{judged['set_for']} by the {judged['scaled_by']})")
    return f"target <= {judged['limit']:.1f} min on {judged['set_for']} {verdict}"


def _measure(model, cfg: ProfileConfig, scenario: str, precision: str, params: dict, work, units: dict,
             base_cost: dict, device: torch.device, bandwidths: tuple) -> dict:
    """Time one scenario item: its profile record."""
    with MemoryTracker(device) as memory:
        if scenario == "decode":
            full = time_it(work[0], device, cfg.warmup, cfg.repeats, cfg.min_seconds)
            one = time_it(work[1], device, cfg.warmup, cfg.repeats, cfg.min_seconds)
            per_token = max((statistics.median(full) - statistics.median(one)) / (cfg.new_tokens - 1), 1e-9)
            times = [per_token]
        else:
            times = time_it(work, device, cfg.warmup, cfg.repeats, cfg.min_seconds)
    cost = {**base_cost, "seconds": _summary(times), "memory": memory.summary()}
    for unit, count in units.items():
        cost[f"{unit}_per_second"] = count / statistics.median(times)
    record = _record(scenario, precision, params, "ok", cost=cost)
    if scenario == "decode":
        record["cost"]["seconds_per_token"] = times[0]
        record["cost"]["full_generate_seconds"] = _summary(full)
        record["cost"]["one_token_generate_seconds"] = _summary(one)
        if params["batch_size"] == 1:
            record["roofline"] = _decode_roofline(model, times[0], *bandwidths)
    if scenario == "option_scoring" and params["options"] == 100 and "path" not in params:
        # one timed unit is one VisDial round (100 options, both protocols): project the full val set from it
        per_round = work_of(model, work)
        minutes = statistics.median(times) * VISDIAL_VAL_ROUNDS / 60
        record["projection"] = {"visdial_val_rounds": VISDIAL_VAL_ROUNDS,
                                "projected_minutes": minutes,
                                "target": judge_target("visdial_val_projected_minutes", minutes, bandwidths[0]),
                                "work_per_round": per_round,
                                "projected_work": {k: v * VISDIAL_VAL_ROUNDS for k, v in per_round.items()},
                                "assumes": "every round's whole context encoded anew; the task reuses the previous "
                                           "round's prefix, so this bounds it from above"}
    return record


ROUND_WORK = ("scoring_calls", "scoring_passes", "continuations_scored")  # what `eval` counts in `cost.work`


def work_of(model, work: Callable[[], object]) -> dict[str, int]:
    """The model's work counters that one more call of `work` adds (the chunking shows in scoring_passes)."""
    before = dict(model.counters)
    work()
    return {k: model.counters[k] - before.get(k, 0) for k in ROUND_WORK}


def run_profile(cfg: ProfileConfig) -> Path:
    require_known("--scenarios", cfg.scenarios, SCENARIOS, "scenario")
    require_known("--decode-paths", cfg.decode_paths, DECODE_PATHS, "decode path")
    require_known("precision", cfg.precisions, PRECISIONS, "precision")
    require_known("--int8-outliers", [cfg.int8_outliers], INT8_OUTLIERS, "int8 outlier mode")
    if cfg.model_dir is None and not cfg.random_init:
        raise FromageInputError("--model-dir", "required (or --random-init)")
    if cfg.option_batch_size < 1:
        raise FromageInputError("--option-batch-size", "must be >= 1")
    if cfg.repeats < 1:
        raise FromageInputError("--repeats", "must be >= 1")
    if cfg.warmup < 0:
        raise FromageInputError("--warmup", "must be >= 0")
    if not cfg.min_seconds >= 0:  # also refuses NaN
        raise FromageInputError("--min-seconds", "must be >= 0")
    if cfg.new_tokens < 2:
        raise FromageInputError("--new-tokens", "must be >= 2 (decode cost is the difference of two lengths)")
    from .runner import check_output_dir

    check_output_dir(cfg.out)
    precisions = cfg.precisions or [resolve_placement(cfg.device, None).precision]
    records = []
    for precision in precisions:
        records += profile_precision(cfg, precision)
    return write_results(cfg.out, {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                   "config": cfg.to_json(), "environment": describe_environment(), "records": records})
