"""Written files follow the user's umask, as any file the user writes does: 0666 & ~umask (0644 under 022,
0660 under 007), not tempfile's 0600, so a team shares results, reports, predictions, caches and checkpoints."""
import os
import stat

import pytest
import torch

from fromage_bench.cli import main
from fromage_bench.synth.visdial import write_visdial


@pytest.fixture(params=[0o022, 0o007], ids=["umask-022", "umask-007"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_tiny_eval_writes_results_report_and_predictions_by_the_umask(tiny_dir, tmp_path, umask):
    write_visdial(tmp_path / "data", n=2, seed=0)
    out = tmp_path / "run"
    assert main(["eval", "--model-dir", str(tiny_dir), "--data-root", str(tmp_path / "data"), "--out", str(out),
                 "--tasks", "visdial_ranking", "--precisions", "fp32", "--device", "cpu", "--limit", "1",
                 "--no-progress", "--cache-dir", str(tmp_path / "cache")]) == 0
    predictions = sorted((out / "predictions").glob("*.jsonl"))
    cached = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert predictions and cached
    for f in [out / "results.json", out / "report.html", *predictions, *cached]:
        assert mode(f) == 0o666 & ~umask, f
    assert not list(out.rglob("*.tmp")) and not list((tmp_path / "cache").rglob("*.tmp"))


def test_release_checkpoint_and_retrieval_set_follow_the_umask(tiny, tmp_path, umask):
    from model.checkpoint import save_release
    from model.retrieval_set import RetrievalSet

    release = save_release(tiny.model, tmp_path / "release")
    saved = RetrievalSet(embeddings=torch.randn(3, 4), paths=["a.jpg", "b.png", "c.jpg"]).save(tmp_path / "set")
    files = [f for d in (release, saved) for f in d.iterdir()]
    assert len(files) == 4
    for f in files:
        assert mode(f) == 0o666 & ~umask, f


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, umask):
    from model.files import atomic_write, atomic_write_bytes, atomic_write_text

    target = tmp_path / "doc.txt"
    atomic_write_text(target, "première\r\n")
    assert target.read_bytes() == "première\r\n".encode() and mode(target) == 0o666 & ~umask

    def fail_halfway(f):
        f.write(b"torn")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail_halfway)
    assert target.read_bytes() == "première\r\n".encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.txt"]  # no temporary file left behind
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01" and mode(target) == 0o666 & ~umask


def test_saved_backbones_follow_the_umask(tmp_path, umask):
    """Hugging Face's save_pretrained writes its safetensors weights 0600; the backbones we write do not keep that."""
    from model import make_tiny

    out = make_tiny(tmp_path / "tiny", seed=0)
    files = [f for f in out.rglob("*") if f.is_file()]
    assert {f.name for f in files} >= {"model.safetensors", "config.json", "pretrained_ckpt.pth.tar", "model_args.json"}
    for f in files:
        assert mode(f) == 0o666 & ~umask, f
