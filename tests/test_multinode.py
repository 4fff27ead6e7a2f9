"""Past one machine: two torchrun launchers, each `--nnodes 2 --nproc-per-node 1` and meeting by c10d
rendezvous on localhost (two nodes simulated on this machine, as `srun torchrun ...` starts one launcher per
node), give exactly the single-process results of `eval` and byte-identical `build-retrieval-set` files.
Ranks read RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR from torchrun's environment (each node's only rank
has LOCAL_RANK 0); the output directory is shared, as a cluster's shared file system would be."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fromage_bench.synth.captions import write_cc3m
from fromage_bench.synth.visdial import write_visdial
from fromage_bench.synth.vist import write_vist
from model.retrieval_set import EMBEDDINGS_FILE, PATHS_FILE
from tests.reference.photos import awkward_image_files
from tests.subprocesses import REPO, child_env
from tests.test_resume_and_shards import SHARDED_TASKS, eval_command, free_port, metrics, predictions

SKIPPED = "retrieval_skipped.tsv"


def two_node_launchers(command: list[str], rendezvous_id: str) -> list[list[str]]:
    """The two launchers' command lines for `python -m fromage_bench ...` (`command` without the python)."""
    port = free_port()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", rendezvous_id,
                "--local-addr", "127.0.0.1", "--max-restarts", "0"]
    return [[*launcher, *command] for _ in range(2)]


def run_two_nodes(command: list[str], rendezvous_id: str) -> list[str]:
    """Start both launchers at once, wait for both; each one's stdout."""
    procs = [subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in two_node_launchers(command, rendezvous_id)]
    outputs = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=240)
        finally:
            for other in procs:  # one launcher failing leaves the other waiting at the rendezvous
                if proc.returncode != 0:
                    other.kill()
        assert proc.returncode == 0, stderr[-4000:]
        outputs.append(stdout)
    return outputs


@pytest.mark.slow
def test_eval_on_two_nodes_gives_the_single_process_results_exactly(tiny_dir, tmp_path):
    data = tmp_path / "data"
    write_vist(data, n=7, seed=2, corrupt=1)
    write_visdial(data, n=5, seed=2, n_rounds=2, missing=[1])
    write_cc3m(data, n=9, seed=2, missing=1)
    one_out, two_out = tmp_path / "one", tmp_path / "two"
    one_cmd = eval_command(tiny_dir, data, one_out, SHARDED_TASKS, batch_size=2)
    done = subprocess.run(one_cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    one = json.loads((one_out / "results.json").read_text())

    run_two_nodes(eval_command(tiny_dir, data, two_out, SHARDED_TASKS, batch_size=2)[1:], "eval")
    two = json.loads((two_out / "results.json").read_text())
    assert two["environment"]["processes"] == 2
    assert metrics(two) == metrics(one)  # ==, to the last digit
    assert predictions(two_out, two) == predictions(one_out, one)
    for record in two["records"]:
        per_rank = [r["work"]["batches_computed"] for r in record["cost"]["per_rank"]]
        assert len(per_rank) == 2 and all(n > 0 for n in per_rank)  # both nodes did some of the work


@pytest.mark.slow
def test_build_retrieval_set_on_two_nodes_writes_the_single_process_bytes(tiny_dir, tmp_path):
    photos = tmp_path / "photos"
    for copy in range(3):  # 18 files in chunks of 2: 9 chunks, dealt 5 + 4
        awkward_image_files(photos / f"copy{copy}")
    base = ["-m", "fromage_bench", "build-retrieval-set", "--model-dir", str(tiny_dir), "--images", str(photos),
            "--device", "cpu", "--no-progress", "--chunk-size", "2", "--batch-size", "2", "--image-workers", "0"]
    one = subprocess.run([sys.executable, *base, "--out", str(tmp_path / "one")], cwd=REPO, env=child_env(),
                         capture_output=True, text=True, timeout=180)
    assert one.returncode == 0, one.stderr[-4000:]

    printed = run_two_nodes([*base, "--out", str(tmp_path / "two")], "build")
    # one process group of two: only its rank 0 writes the set and says so (two lone processes both would)
    assert sum("wrote a retrieval set" in out for out in printed) == 1
    for name in (EMBEDDINGS_FILE, PATHS_FILE, SKIPPED):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
