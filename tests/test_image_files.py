"""Image files decoded by DataLoader workers: the same features as in-process decoding, in order, with
unreadable files reported by position; the feature cache skips decoding."""
import pytest
import torch

import os

from model import images as image_module
from model.images import PIXEL_MEMO, PixelMemo, default_workers, load_image, pixel_batches
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


def bomb_png(path, width: int = 20000, height: int = 10000):
    """A valid 1-bit PNG of width x height (200 Mpx by default: over Pillow's default decompression-bomb limit of
    2 x MAX_IMAGE_PIXELS ~ 179 Mpx), all zeros, a few kB on disk."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_skipped_and_counted_in_process_and_in_workers(tiny, files, tmp_path):
    from PIL import Image

    from model.images import try_load

    bomb = bomb_png(tmp_path / "huge.png")
    assert 20000 * 10000 > 2 * Image.MAX_IMAGE_PIXELS  # Pillow's default limit, unchanged
    with pytest.raises(Image.DecompressionBombError):
        Image.open(bomb)
    assert try_load(bomb) == (None, "image too large")
    paths = files[:2] + [bomb] + files[2:]
    for workers in (0, 2):
        features, failures = load_features(tiny, paths, None, batch_size=3, workers=workers)
        assert failures == {2: "image too large", 3: "corrupt image", 6: "missing image"}
        assert sorted(features) == [0, 1, 4, 5, 7]


def test_any_decoding_failure_of_one_file_skips_only_that_file(tiny, files, monkeypatch):
    """A decoder that fails with an unexpected exception type (not OSError) on one file: skipped, counted."""
    import model.images as images

    real_open = images.Image.open

    def flaky_open(path, *args, **kwargs):
        if str(path).endswith("im3.png"):
            raise RuntimeError("decoder bug")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(images.Image, "open", flaky_open)
    features, failures = load_features(tiny, files, None, batch_size=3, workers=0)
    assert failures == {2: "corrupt image", 4: "corrupt image", 5: "missing image"}
    assert sorted(features) == [0, 1, 3, 6]


def test_the_cache_keeps_crop_and_squash_features_apart(tiny, tmp_path, awkward_files):
    from model.images import CROP, SQUASH, open_image

    paths = list(awkward_files.values())
    cache = FeatureCache(tmp_path / "cache", "fingerprint")
    for preprocess in (CROP, SQUASH):
        features, failures = load_features(tiny, paths, cache, batch_size=4, workers=0, preprocess=preprocess)
        assert not failures
        expected = tiny.image_features([open_image(p) for p in paths], preprocess=preprocess)
        torch.testing.assert_close(torch.stack([features[i] for i in range(len(paths))]), expected, atol=1e-6, rtol=0)
    assert (cache.hits, cache.misses) == (0, 2 * len(paths))  # squash did not reuse the crop entries
    again, _ = load_features(tiny, paths, cache, batch_size=4, workers=0, preprocess=SQUASH)
    assert cache.hits == len(paths)
    torch.testing.assert_close(torch.stack([again[i] for i in range(len(paths))]), expected, atol=0, rtol=0)


def _pixels_by_position(batches) -> dict:
    return {p: px for positions, pixels, _ in batches if pixels is not None for p, px in zip(positions, pixels)}


def _decoded(monkeypatch) -> list:
    """The files `pixel_batches` decodes from here on (in-process, workers=0)."""
    opened = []
    real = image_module.try_open
    monkeypatch.setattr(image_module, "try_open", lambda path: (opened.append(path), real(path))[1])
    return opened


def test_the_pixel_memo_decodes_each_file_once_per_preprocessing_and_gives_the_same_pixels(tiny, files, monkeypatch):
    processor = tiny.model.feature_extractor
    opened = _decoded(monkeypatch)
    first = _pixels_by_position(pixel_batches(files, processor, 3, workers=0))
    assert len(opened) == 7  # every file once, the unreadable two included
    batches = list(pixel_batches(files, processor, 3, workers=0))  # a second precision, say
    again, failed = _pixels_by_position(batches), {k: v for _, _, bad in batches for k, v in bad.items()}
    assert len(opened) == 9  # only the two unreadable files again: they are not held
    assert failed == {2: "corrupt image", 5: "missing image"}
    assert sorted(again) == sorted(first) == [0, 1, 3, 4, 6]
    assert all(torch.equal(again[i], first[i]) for i in first)
    list(pixel_batches(files, processor, 3, workers=0, preprocess="squash"))  # another preprocessing: its own
    assert len(opened) == 16
    with PIXEL_MEMO.off():  # neither read nor filled
        list(pixel_batches(files, processor, 3, workers=0))
    assert len(opened) == 23


def test_a_changed_file_is_decoded_afresh_and_a_full_memo_takes_no_more(tiny, files, images, monkeypatch):
    processor = tiny.model.feature_extractor
    list(pixel_batches(files, processor, 3, workers=0))
    images[3].save(files[0])  # other content: new size and mtime
    os.utime(files[0], ns=(1, 1))
    opened = _decoded(monkeypatch)
    changed = _pixels_by_position(pixel_batches(files, processor, 3, workers=0))
    assert files[0] in opened and torch.equal(changed[0], tiny.model.feature_extractor(
        [load_image(files[0])], return_tensors="pt").pixel_values[0])

    one = changed[0].numel() * changed[0].element_size()
    small = PixelMemo(max_bytes=2 * one)
    monkeypatch.setattr(image_module, "PIXEL_MEMO", small)
    list(pixel_batches(files, processor, 3, workers=0))
    assert small.bytes == 2 * one and len(small._pixels) == 2  # the first two readable files, then full
