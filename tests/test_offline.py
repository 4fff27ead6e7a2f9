"""Nothing reaches the network: an evaluation runs with every socket connection refused."""
import socket

import pytest

from fromage_bench.cli import main
from fromage_bench.results import read_results
from fromage_bench.synth.visdial import write_visdial


def test_eval_runs_with_sockets_blocked(tiny_dir, tmp_path, monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted during an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # our code must not depend on the user having set it
    write_visdial(tmp_path / "data", n=2, seed=4)
    out = tmp_path / "run"
    assert main(["eval", "--model-dir", str(tiny_dir), "--data-root", str(tmp_path / "data"), "--out", str(out),
                 "--tasks", "visdial_retrieval,visdial_ranking", "--device", "cpu", "--no-progress", "--no-cache"]) == 0
    assert all(r["status"] == "ok" for r in read_results(out)["records"])
    assert attempts == []


def test_unknown_hub_id_fails_without_network(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: pytest.fail("tried to resolve a host"))
    assert main(["info", "--model-dir", str(tiny_dir), "--opt-version", "facebook/opt-6.7b", "--device", "cpu"]) == 2
    assert "local Hugging Face cache" in capsys.readouterr().err
