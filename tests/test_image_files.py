"""Image files decoded by DataLoader workers: the same features as in-process decoding, in order, with
unreadable files reported by position; the feature cache skips decoding."""
import pytest
import torch

from model.images import default_workers, load_image, pixel_batches
from tasks.cache import FeatureCache, load_features


@pytest.fixture
def files(tmp_path, images):
    """7 paths: 5 images (PNG and JPEG), one corrupt file and one that does not exist."""
    paths = []
    for i in range(5):
        path = tmp_path / f"im{i}.{'png' if i % 2 else 'jpg'}"
        images[i % len(images)].save(path)
        paths.append(path)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 not a jpeg at all")
    paths.insert(2, corrupt)
    paths.insert(5, tmp_path / "missing.png")
    return paths


@pytest.mark.parametrize("workers", [0, 2])
def test_worker_decoding_equals_in_process_features(tiny, files, workers):
    readable = [p for p in files if p.name.startswith("im")]
    expected = tiny.image_features([load_image(p) for p in readable])
    seen, failed, features = [], {}, []
    for positions, feats, bad in tiny.image_file_features(files, batch_size=3, workers=workers):
        seen += positions
        features.append(feats)
        failed.update(bad)
    assert seen == [0, 1, 3, 4, 6]  # in order, skipping the two unreadable files
    assert failed == {2: "corrupt image", 5: "missing image"}
    torch.testing.assert_close(torch.cat(features), expected, atol=0, rtol=0)


def test_batches_hold_pixels_of_the_readable_files_only(tiny, files):
    batches = list(pixel_batches(files, tiny.model.feature_extractor, batch_size=4, workers=0))
    assert [b[0] for b in batches] == [[0, 1, 3], [4, 6]]
    assert [tuple(b[1].shape) for b in batches] == [(3, 3, 224, 224), (2, 3, 224, 224)]
    assert [b[2] for b in batches] == [{2: "corrupt image"}, {5: "missing image"}]


def test_default_workers(monkeypatch):
    for cores, expected in ((2, 0), (3, 1), (6, 4), (64, 8)):
        monkeypatch.setattr("os.sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert default_workers(33, batch_size=32) == expected
        assert default_workers(32, batch_size=32) == 0  # one batch: starting processes costs more than decoding


def test_load_features_caches_each_batch_and_skips_decoding_on_a_hit(tiny, files, tmp_path):
    cache = FeatureCache(tmp_path / "cache", "fingerprint")
    first, failures = load_features(tiny, files, cache, batch_size=2, workers=2)
    assert sorted(first) == [0, 1, 3, 4, 6] and failures == {2: "corrupt image", 5: "missing image"}
    assert (cache.hits, cache.misses) == (0, 5)
    encoded = tiny.counters["images_encoded"]
    again, failures_again = load_features(tiny, files, cache, batch_size=2, workers=2)
    assert tiny.counters["images_encoded"] == encoded and (cache.hits, cache.misses) == (5, 5)
    assert failures_again == failures
    for i in first:
        torch.testing.assert_close(again[i], first[i], atol=0, rtol=0)
