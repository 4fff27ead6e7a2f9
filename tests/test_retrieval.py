"""[RET] retrieval: batched embeddings, the retrieval set file format, and nearest-image lookup."""
import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fromage_bench.cli import main
from model import FromageInputError, RetrievalSet, load_fromage


def test_batched_retrieval_embeddings_equal_each_prompt_alone(tiny, images):
    prompts = [["a red [RET]"], [images[0], "two blue squares [RET]"],
               ["Q:", images[1], "A: yes", images[2], "the end [RET]"], ["[RET]"]]
    batched = tiny.retrieval_embeddings(prompts, batch_size=3)
    for i, p in enumerate(prompts):
        torch.testing.assert_close(batched[i], tiny.retrieval_embeddings([p])[0], atol=1e-5, rtol=1e-4)
    assert torch.allclose(batched.norm(dim=1), torch.ones(len(prompts)))
    with pytest.raises(ValueError, match="no \\[RET\\]"):
        tiny.retrieval_embeddings([["no token here"]])


def _image_files(tmp_path, images):
    paths = []
    for i, im in enumerate(images):
        p = tmp_path / f"img{i}.png"
        im.save(p)
        paths.append(p.name)
    return paths


def test_ret_returns_the_nearest_images_of_the_retrieval_set(tiny_dir, tmp_path, images):
    model = load_fromage(tiny_dir, device="cpu")
    prompt = [images[3], "There are two stars [RET]"]
    query = model.retrieval_embeddings([prompt])[0]
    rng = np.random.default_rng(0)
    pool = torch.tensor(rng.normal(size=(40, query.numel())), dtype=torch.float32)
    # independent expectation: cosine ranking with numpy, scale-free (the set's rows are not normalised)
    pool[17] = 3.0 * query + 0.05 * pool[17]
    pool[5] = 2.0 * query + 0.2 * pool[5]  # noise small enough that it stays clear of the random rows whatever the query
    order = np.argsort(-(F.normalize(pool, dim=1).numpy() @ query.numpy()))
    assert list(order[:2]) == [17, 5]
    files = _image_files(tmp_path, images)
    paths = [files[i % len(files)] for i in range(40)]
    model.set_retrieval_set(RetrievalSet(paths, pool, image_root=str(tmp_path)))
    out = model.generate_for_images_and_texts(prompt, num_words=0, max_img_per_ret=2)
    assert out[0].endswith("[RET]") and len(out[1]) == 2
    expected = [np.asarray(images[17 % 4].resize((224, 224))), np.asarray(images[5 % 4].resize((224, 224)))]
    assert all(np.array_equal(np.asarray(got), want) for got, want in zip(out[1], expected))
    scores, top_paths = model.retrieve(query[None], k=2)
    assert top_paths == [[paths[17], paths[5]]]


def test_ret_without_retrieval_set_is_a_clear_error(tiny):
    with pytest.raises(RuntimeError, match="no retrieval set"):
        tiny.generate_for_images_and_texts(["a red [RET]"], num_words=0)


def test_retrieval_set_round_trip_and_loading_from_the_model_dir(tiny_dir, tmp_path):
    rs = RetrievalSet(["a.jpg", "b.jpg", "c.jpg"], torch.randn(3, 32), image_root="/data")
    rs.save(tmp_path / "rs")
    back = RetrievalSet.load(tmp_path / "rs")
    assert back.paths == rs.paths and torch.equal(back.embeddings, rs.embeddings) and back.resolve(1) == "/data/b.jpg"
    m = load_fromage(tiny_dir, device="cpu", retrieval_set=tmp_path / "rs")
    expected = m.model.logit_scale.exp() * F.normalize(rs.embeddings, dim=1)
    torch.testing.assert_close(m.emb_matrix, expected)
    with pytest.raises(FromageInputError, match="dimension 8"):
        m.set_retrieval_set(RetrievalSet(["x"], torch.randn(1, 8)))


def test_pickle_needs_explicit_trust_and_converts(tmp_path, capsys):
    emb = np.random.default_rng(1).normal(size=(4, 32)).astype(np.float32)
    pkl = tmp_path / "cc3m_embeddings_0.pkl"
    pkl.write_bytes(pickle.dumps({"paths": ["u1", "u2", "u3", "u4"], "embeddings": emb}))
    assert main(["convert-embeddings", str(pkl), "--out", str(tmp_path / "out")]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["convert-embeddings", str(pkl), "--out", str(tmp_path / "out"), "--trust-pickle"]) == 0
    back = RetrievalSet.load(tmp_path / "out")
    assert back.paths == ["u1", "u2", "u3", "u4"] and np.array_equal(back.embeddings.numpy(), emb)


def test_model_dir_with_only_pickles_does_not_unpickle(tiny_dir, tmp_path, caplog):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    (d / "cc3m_embeddings_0.pkl").write_bytes(b"not even a pickle")
    m = load_fromage(d, device="cpu")
    assert m.retrieval_set is None
    assert "convert-embeddings --trust-pickle" in caplog.text


@pytest.mark.parametrize("write, message", [
    (lambda d: (d / "retrieval_paths.json").write_text("{bad"), "malformed JSON"),
    (lambda d: (d / "retrieval_embeddings.safetensors").write_bytes(b"xx"), "not a readable safetensors"),
    (lambda d: (d / "retrieval_paths.json").write_text(json.dumps({"paths": ["only-one"]})), "1 paths but embeddings"),
])
def test_bad_retrieval_sets(tmp_path, write, message):
    RetrievalSet(["a", "b"], torch.randn(2, 4)).save(tmp_path / "rs")
    write(tmp_path / "rs")
    with pytest.raises(FromageInputError, match=message):
        RetrievalSet.load(tmp_path / "rs")
