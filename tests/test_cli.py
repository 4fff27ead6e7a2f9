"""The command line: make-tiny, info, generate; errors as one line with exit status 2."""
import json

from fromage_bench.cli import main


def test_make_tiny_then_info_and_generate(tmp_path, capsys, images):
    out = tmp_path / "tiny"
    assert main(["make-tiny", "--out", str(out), "--seed", "2", "--n-visual-tokens", "4"]) == 0
    assert (out / "model_args.json").is_file() and (out / "pretrained_ckpt.pth.tar").is_file()
    capsys.readouterr()
    assert main(["info", "--model-dir", str(out), "--device", "cpu", "--precision", "int8"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_visual_tokens"] == 4 and info["precision"] == "int8" and info["weight_bytes"] > 0
    image = tmp_path / "x.png"
    images[0].save(image)
    assert main(["generate", "--model-dir", str(out), "--device", "cpu", "--image", str(image), "--text", "A",
                 "--num-words", "5"]) == 0
    assert capsys.readouterr().out.strip()


def test_corrupt_image_is_one_line_exit_2(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert main(["generate", "--model-dir", str(tiny_dir), "--device", "cpu", "--image", str(bad), "--text", "A"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fromage-bench: error:") and "bad.png" in err and len(err.splitlines()) == 1
