"""CUDA checks, run on a GPU machine (skipped elsewhere): defaults, cache/no-cache equality, precisions,
CPU/GPU agreement, and the runner's GPU memory trackers."""
import pytest
import torch

from fromage_bench.cli import main
from fromage_bench.results import read_results
from model import load_fromage
from model.precision import resolve_placement

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cuda_fp32(tiny_dir):
    return load_fromage(tiny_dir, device="cuda", precision="fp32")


def test_defaults_on_cuda(tiny_dir):
    placement = resolve_placement()
    assert placement.device.type == "cuda" and placement.precision == "bf16"
    m = load_fromage(tiny_dir)
    assert m.model.device.type == "cuda" and m.model.lm_dtype == torch.bfloat16


def test_cache_equals_no_cache_and_cpu(cuda_fp32, tiny, images):
    prompt = [images[0], "A red"]
    a = cuda_fp32.generate([prompt], 16)
    b = cuda_fp32.generate([prompt], 16, use_cache=False)
    assert torch.equal(a.token_ids, b.token_ids)
    assert torch.equal(a.token_ids.cpu(), tiny.generate([prompt], 16).token_ids)
    assert cuda_fp32.get_log_lik_scores(prompt) == pytest.approx(tiny.get_log_lik_scores(prompt), abs=1e-3)


def test_continuations_on_cuda(cuda_fp32, images):
    context = [images[1], "Q: what colour?\nA: "]
    options = ["red", "blue square", "no", "it is green"]
    fast = cuda_fp32.score_continuations(context, options)
    naive = cuda_fp32.score_continuations(context, options, naive=True)
    torch.testing.assert_close(fast.sum_logprob, naive.sum_logprob, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "fp16", "int8"])
def test_precisions_on_cuda(tiny_dir, cuda_fp32, images, precision):
    m = load_fromage(tiny_dir, device="cuda", precision=precision)
    prompt = [images[2], "Q: what is it?\nA: a circle"]
    ref = cuda_fp32.get_log_lik_scores(prompt)
    assert abs(m.get_log_lik_scores(prompt) - ref) < 0.05 * abs(ref)
    assert m.weight_bytes < cuda_fp32.weight_bytes


def test_runner_records_gpu_memory(tiny_dir, tmp_path):
    from fromage_bench.synth.visdial import write_visdial

    write_visdial(tmp_path / "data", n=2, seed=0)
    out = tmp_path / "run"
    assert main(["eval", "--model-dir", str(tiny_dir), "--data-root", str(tmp_path / "data"), "--out", str(out),
                 "--tasks", "visdial_ranking", "--precisions", "bf16,int8", "--no-progress", "--no-cache"]) == 0
    for r in read_results(out)["records"]:
        assert r["status"] == "ok"
        assert r["cost"]["memory"]["cuda_max_allocated_bytes"] > 0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graph_decode_equals_dynamic(tiny_dir, images, precision):
    m = load_fromage(tiny_dir, device="cuda", precision=precision)
    for prompt in ([images[0], "A red"], ["Q: what colour is it?\nA:"]):
        for _ in range(2):  # the second call replays the graph captured by the first
            dynamic = m.generate([prompt], 16, decode="dynamic")
            graph = m.generate([prompt], 16, decode="graph")
            static = m.generate([prompt], 16, decode="static")
            compiled = m.generate([prompt], 16, decode="compiled")  # torch.compile'd layer halves inside the graph
            assert torch.equal(graph.token_ids, static.token_ids)
            if precision == "fp32":
                assert torch.equal(compiled.token_ids, graph.token_ids)
            if precision == "fp32":
                assert torch.equal(graph.token_ids, dynamic.token_ids)
                torch.testing.assert_close(graph.ret_embeddings, dynamic.ret_embeddings, atol=1e-4, rtol=1e-3)


def test_cuda_graph_sampling_and_ret_rules(tiny_dir, images):
    m = load_fromage(tiny_dir, device="cuda", precision="fp32")
    prompt = [images[1], "There are two"]
    kw = {"ret_scale_factor": -20.0, "min_word_tokens": 2}
    assert torch.equal(m.generate([prompt], 12, decode="graph", **kw).token_ids,
                       m.generate([prompt], 12, decode="dynamic", **kw).token_ids)
    sample = lambda d: m.generate([prompt], 12, decode=d, temperature=1.0, top_p=0.9,  # noqa: E731
                                  generator=torch.Generator(device="cpu").manual_seed(5)).token_ids
    assert torch.equal(sample("graph"), sample("dynamic"))


MARGIN = 64 << 20  # activations, KV buffers, CUDA graph pools, cuBLAS workspaces: small beside the weights below


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory, images):
    """~75M LM parameters (300 MB in fp32): weights dwarf every other allocation, so a leaked model shows. Each
    precision has run once already, so one-time allocations (handles, kernels, bitsandbytes' buffers) are done."""
    from model import make_tiny

    model_dir = make_tiny(tmp_path_factory.mktemp("wide") / "fromage", seed=0, hidden=1024, layers=6)
    for precision in _precisions_that_run():
        _decode(load_fromage(model_dir, device="cuda", precision=precision), images)
    return model_dir


def _decode(m, images) -> None:
    from model.static_decode import supports_static

    m.generate([[images[0], "A red"]], 12, decode="graph" if supports_static(m.model.lm) else "dynamic")


def _allocated_after_release() -> int:
    """Bytes live tensors hold once garbage is collected, cuBLAS's per-stream workspaces dropped (each graph
    capture runs on a side stream, which gets its own)."""
    from fromage_bench.trackers import release_memory

    release_memory()
    getattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None)()
    return torch.cuda.memory_allocated()


def _precisions_that_run() -> list[str]:
    import importlib.util

    return ["fp32", "bf16", "fp16"] + (["int8"] if importlib.util.find_spec("bitsandbytes") else [])


def test_each_precision_frees_its_weights_before_the_next(wide_dir, images):
    """Precisions one after another in one process, as `eval --precisions fp32,bf16,fp16,int8` runs them: each
    cell's decoding peak holds its own weights only, and freeing a model gives all its memory back (the static
    decoders, CUDA graphs included, used to keep every model alive)."""
    baseline = _allocated_after_release()
    for precision in _precisions_that_run():
        m = load_fromage(wide_dir, device="cuda", precision=precision)
        weights = m.weight_bytes
        assert torch.cuda.memory_allocated() < baseline + weights + MARGIN, precision  # nothing earlier is still held
        torch.cuda.reset_peak_memory_stats()
        _decode(m, images)
        peak = torch.cuda.max_memory_allocated()
        del m
        freed_to = _allocated_after_release()
        # the figures for docs/reference-runs (pytest -rP shows them)
        print(f"{precision}: baseline {baseline / 2**20:.1f} MiB, weights {weights / 2**20:.1f} MiB, "
              f"decode peak {peak / 2**20:.1f} MiB, after free {freed_to / 2**20:.1f} MiB")
        assert peak < baseline + weights + MARGIN, precision
        assert freed_to - baseline < 1 << 20, precision


def test_runner_cells_peak_at_their_own_weights(wide_dir, tmp_path):
    """The runner resets the allocator's peak per cell and frees each precision before loading the next: every
    cell's recorded peak is its own weights plus working memory, whatever ran before it."""
    from fromage_bench.synth.visdial import write_visdial

    write_visdial(tmp_path / "data", n=2, seed=0, n_rounds=2)
    out = tmp_path / "run"
    baseline = _allocated_after_release()
    precisions = _precisions_that_run()
    assert main(["eval", "--model-dir", str(wide_dir), "--data-root", str(tmp_path / "data"), "--out", str(out),
                 "--tasks", "visdial_ranking", "--precisions", ",".join(precisions), "--device", "cuda",
                 "--limit", "1", "--batch-size", "1", "--no-progress", "--no-cache"]) == 0  # small activations
    records = read_results(out)["records"]
    assert {r["precision"] for r in records if r["status"] == "ok"} == set(precisions)
    for r in records:
        cost = r["cost"]
        assert cost["memory"]["cuda_max_allocated_bytes"] < baseline + cost["weight_bytes"] + MARGIN, r["precision"]
    assert _allocated_after_release() - baseline < 1 << 20


def test_fusing_qkv_strands_no_cached_blocks():
    """Fusing q/k/v frees each layer's three projections; without handing the cache back those blocks stay
    reserved (about 3 GB for OPT-6.7B in bf16). After a decoder is built the reservation is back to what is
    allocated (within the allocator's rounding), and nothing more is allocated than before."""
    from transformers import OPTForCausalLM

    from model.static_decode import StaticDecoder
    from model.tiny import tiny_opt_config

    torch.cuda.empty_cache()
    config = tiny_opt_config(vocab_size=97, hidden=1024, layers=4, heads=8)
    lm = OPTForCausalLM(config).eval().to("cuda", torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    decoder = StaticDecoder(lm, batch_size=1, max_len=64, use_graph=False)
    buffers = decoder.keys.nbytes + decoder.values.nbytes
    print(f"before {allocated / 2**20:.1f}/{reserved / 2**20:.1f} MiB, after "
          f"{torch.cuda.memory_allocated() / 2**20:.1f}/{torch.cuda.memory_reserved() / 2**20:.1f} MiB (alloc/reserved)")
    assert torch.cuda.memory_allocated() - allocated < buffers + (4 << 20)
    assert torch.cuda.memory_reserved() - torch.cuda.memory_allocated() < 16 << 20


def test_runner_memory_records_baseline_and_reserved_of_the_cell(tiny_dir, tmp_path):
    """Per cell: a baseline taken after the reset, and a reserved peak that no earlier cell's cache inflates."""
    from fromage_bench.synth.visdial import write_visdial

    write_visdial(tmp_path / "data", n=2, seed=0)
    out = tmp_path / "run"
    assert main(["eval", "--model-dir", str(tiny_dir), "--data-root", str(tmp_path / "data"), "--out", str(out),
                 "--tasks", "visdial_ranking", "--precisions", "bf16,fp16", "--no-progress",
                 "--no-cache", "--device", "cuda"]) == 0
    for r in read_results(out)["records"]:
        memory = r["cost"]["memory"]
        assert memory["baseline"]["cuda_allocated_bytes"] <= memory["cuda_max_allocated_bytes"]
        assert memory["cuda_max_reserved_bytes"] >= memory["cuda_max_allocated_bytes"]
        assert ("nvml_device_used_bytes" in memory) != ("nvml_unavailable" in memory)
