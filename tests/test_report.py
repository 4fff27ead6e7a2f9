"""The HTML report: self-contained, escaped, correct numbers, tolerant of missing data, written atomically.

`make_fake_run` builds a small but complete run directory (results.json following docs/results-schema.md,
prediction JSONL files, an image directory with good, missing and corrupt images); the browser test reuses it.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from fromage_bench.results import write_results
from reports import main_report, write_report

SCRIPT_CAPTION = "A cat <script>alert(1)</script> & a dog"
PWNED_QUESTION = "is it sunny?<script>document.title='PWNED'</script>"
VIST_PAPER = {"R@1": 18.25, "R@5": 39.0, "R@10": 50.5}
VIST_METRICS = {"fp32": {"R@1": 20.5, "R@5": 41.0, "R@10": 52.0},
                "bf16": {"R@1": 20.0, "R@5": 41.5, "R@10": 52.0},
                "int8": {"R@1": 19.0, "R@5": 40.0, "R@10": 51.0}}
VISDIAL_PAPER = {"NDCG": 16.5, "MRR": 22.0, "R@1": 17.6}
VISDIAL_METRICS = {"fp32": {"NDCG": 15.0, "MRR": 21.0, "R@1": 16.0},
                   "bf16": {"NDCG": 14.75, "MRR": 21.5, "R@1": 16.0}}
INT8_REASON = "int8 needs CUDA (bitsandbytes) <cpu> & no GPU"
GB = 1024 ** 3


def _cost(precision: str, scale: float) -> dict:
    weight = {"fp32": 4, "bf16": 2, "int8": 1}[precision] * GB
    return {"load_seconds": 3.5 * scale, "weight_bytes": weight,
            "load_memory": {"cpu_rss_bytes": weight + GB, "cuda_max_allocated_bytes": weight},
            "wall_seconds": 10.0 * scale, "examples_per_second": 12.5 / scale,
            "latency_ms": {"p50": 70.0 * scale, "p90": 90.0 * scale, "p99": 120.0 * scale, "mean": 75.0 * scale},
            "throughput": {"images_encoded_per_second": 50.0 / scale, "tokens_scored_per_second": 900.0 / scale,
                           "tokens_encoded_per_second": 100.0 / scale},
            "work": {"images_encoded": 500, "tokens_scored": 9000},
            "memory": {"cpu_rss_bytes": weight + 2 * GB, "cuda_max_allocated_bytes": weight + GB // 2,
                       "nvml_device_used_bytes": weight + GB}}


def _vist_predictions(n_stories: int = 6) -> list[dict]:
    out = []
    for s in range(n_stories):
        target = f"p{s}"
        top = [f"p{(s + k) % 8}" for k in range(10)] if s % 2 == 0 else [f"p{(s + k + 1) % 8}" for k in range(10)]
        if s == 1:
            top[0] = "p_missing"  # no such file: a placeholder
            top[1] = "p_bad"      # a corrupt file: a placeholder
        captions = [f"story {s} caption {i}" for i in range(5)]
        if s == 0:
            captions[2] = SCRIPT_CAPTION
        out.append({"story_id": f"s{s}", "target": target, "top": top, "rank": 1 if target == top[0] else 9,
                    "captions": captions})
    return out


def _visdial_predictions() -> list[dict]:
    out = []
    for r in range(6):
        ex = {"image_id": f"v{r}", "round": r + 1, "question": f"what is in round {r}?", "gt_index": 3,
              "rank": 1 if r % 2 == 0 else 4, "top5": [3, 7, 1, 0, 9] if r % 2 == 0 else [7, 1, 0, 3, 9]}
        if r == 0:
            ex["question"] = PWNED_QUESTION
        if r < 3:
            ex["top_answers"] = [f"answer {i} <b>bold</b>" for i in ex["top5"]]
        out.append(ex)
    return out


def make_fake_run(root: Path) -> tuple[Path, dict[str, Path]]:
    """A run directory like `fromage-bench eval --precisions fp32,bf16,int8` writes, plus an image root."""
    run_dir = root / "run"
    (run_dir / "predictions").mkdir(parents=True)
    images = root / "images"
    images.mkdir()
    colours = [(220, 40, 40), (40, 160, 60), (40, 60, 220), (230, 200, 40), (160, 40, 200), (40, 200, 200),
               (120, 120, 120), (250, 120, 20)]
    for i, colour in enumerate(colours):
        img = Image.new("RGB", (160, 120), colour)
        img.paste((255, 255, 255), (10 * i, 20, 10 * i + 30, 60))
        img.save(images / f"p{i}.png")
    (images / "p_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.new("RGB", (64, 64), (90, 30, 140)).save(images / "v0.jpg")

    records = []
    for precision in ("fp32", "bf16", "int8"):
        scale = {"fp32": 1.0, "bf16": 0.6, "int8": 1.4}[precision]
        name = f"predictions/vist_retrieval-1cap-paper-{precision}.jsonl"
        (run_dir / name).write_text("".join(json.dumps(p) + "\n" for p in _vist_predictions()))
        rec = {"kind": "eval", "task": "vist_retrieval", "setting": "1cap", "protocol": "paper", "precision": precision,
               "status": "ok", "metrics": VIST_METRICS[precision], "paper": VIST_PAPER, "n_examples": 98,
               "n_skipped": 2, "skipped": {"missing image": 1, "corrupt image": 1},
               "skipped_examples": ["s77: missing image", "s78: corrupt image"], "extra": {},
               "cost": _cost(precision, scale), "predictions_file": name}
        if precision != "fp32":
            rec["drift"] = {"against": "fp32",
                            **{m: v - VIST_METRICS["fp32"][m] for m, v in VIST_METRICS[precision].items()}}
        records.append(rec)
    for precision in ("fp32", "bf16"):
        name = f"predictions/visdial_ranking-10r-standard-{precision}.jsonl"
        (run_dir / name).write_text("".join(json.dumps(p) + "\n" for p in _visdial_predictions()))
        # no "drift" field here: the report computes it against fp32 itself
        records.append({"kind": "eval", "task": "visdial_ranking", "setting": "10r", "protocol": "standard",
                        "precision": precision, "status": "ok", "metrics": VISDIAL_METRICS[precision],
                        "paper": VISDIAL_PAPER, "n_examples": 6, "n_skipped": 0, "skipped": {},
                        "skipped_examples": [], "extra": {}, "cost": _cost(precision, 2.0),
                        "predictions_file": name})
    records.append({"kind": "eval", "task": "visdial_ranking", "setting": "10r", "protocol": None,
                    "precision": "int8", "status": "skipped", "reason": INT8_REASON})
    for precision, fraction in (("fp32", 0.41), ("bf16", 0.52)):
        records.append({"kind": "profile", "scenario": "decode", "precision": precision, "status": "ok",
                        "params": {"batch_size": 1, "context_tokens": 64, "new_tokens": 32},
                        "cost": {"seconds": {"median": 0.8, "min": 0.79, "max": 0.83, "all": [0.79, 0.8, 0.83]},
                                 "tokens_per_second": 40.0, "memory": {"cpu_rss_bytes": 5 * GB},
                                 "weight_bytes": 4 * GB, "load_seconds": 3.0},
                        "roofline": {"weight_bytes": 4 * GB, "bandwidth_bytes_per_second": 400 * GB,
                                     "roofline_tokens_per_second": 100.0, "fraction_of_roofline": fraction}})
    records.append({"kind": "profile", "scenario": "decode", "precision": "int8", "status": "skipped",
                    "reason": INT8_REASON, "params": {"batch_size": 1}})
    for path, seconds in ((None, 0.09), ("naive_per_option", 0.3)):
        records.append({"kind": "profile", "scenario": "option_scoring", "precision": "bf16", "status": "ok",
                        "params": {"options": 100, **({"path": path} if path else {})},
                        "cost": {"seconds": {"median": seconds}, "options_per_second": 100 / seconds},
                        "projection": {"visdial_val_rounds": 20640, "projected_minutes": seconds * 20640 / 60}})
    (root / "data").mkdir()  # a data root with no miniworld manifest: the report treats it as the paper's data
    config = {"tasks": "vist_retrieval:1cap,visdial_ranking:10r", "out": str(run_dir),
              "data_root": str(root / "data"),
              "model_dir": "fromage_model/<weights & co>", "device": "cpu", "precisions": ["fp32", "bf16", "int8"]}
    environment = {"python": "3.11.7", "platform": "Linux", "cpu": "Fake <CPU> & co", "cpu_count": 2,
                   "memory_bytes": 8 * GB, "gpus": [], "packages": {"torch": "2.13.0"},
                   "code": {"commit": "abc1234def", "dirty": False}}
    write_results(run_dir, {"created": "2026-11-27T23:30:00Z", "config": config, "environment": environment,
                            "records": records})
    return run_dir, {"vist_retrieval": images, "visdial_ranking": images}


# -- a reproduce run (two models, the paper's tables), hand-made -------------------------------------------------
HOSTILE_SOURCE = "clip<img src=x onerror=alert(3)>&co"
CLIP_SKIP = "the clip family cannot score continuations <no LM>"
# (model, setting) -> protocol -> R@1, R@5, R@10 (VIST); hand-chosen, distinct everywhere
VIST_OURS = {("clip", s): {"paper": (5.0 + i, 20.0 + i, 30.0 + i), "corrected": (6.0 + i, 21.0 + i, 31.0 + i)}
             for i, s in enumerate(("1cap", "5cap", "5cap4img"))}
VIST_OURS.update({("fromage", s): {"paper": (10.0 + i, 40.0 + i, 60.0 + i), "corrected": (11.5 + i, 41.5 + i, 61.5 + i)}
                  for i, s in enumerate(("1cap", "5cap", "5cap4img"))})
VIST_CHANCE = {"R@1": 100 / 14, "R@5": 500 / 14, "R@10": 1000 / 14}
IR_OURS = {"clip": {"paper": (25.0, 75.0, 100.0), "corrected": (50.0, 75.0, 100.0)},
           "fromage": {"paper": (75.0, 100.0, 100.0), "corrected": (50.0, 100.0, 100.0)}}
RANK_OURS = {"paper": {"NDCG": 8.5, "MRR": 11.25, "R@1": 2.5, "R@5": 12.5, "R@10": 37.5},
             "corrected": {"NDCG": 14.75, "MRR": 3.5, "R@1": 0.0, "R@5": 5.0, "R@10": 12.5}}
STDERR = {"R@1": 1.25, "R@5": 2.5}  # fromage 5cap4img, paper protocol


def _vist_record(model: str, setting: str, protocol: str) -> dict:
    r1, r5, r10 = VIST_OURS[(model, setting)][protocol]
    rec = {"kind": "eval", "model": model, "task": "vist_retrieval", "setting": setting, "protocol": protocol,
           "precision": "fp32", "status": "ok", "metrics": {"R@1": r1, "R@5": r5, "R@10": r10, "MRR": 1.0},
           "chance": dict(VIST_CHANCE), "n_examples": 6, "n_skipped": 0, "extra": {"pool_size": 18}}
    if (model, setting, protocol) == ("fromage", "5cap4img", "paper"):
        rec["uncertainty"] = {"method": "bootstrap", "resamples": 1000, "seed": 0, "unit": "story",
                              "stderr": dict(STDERR), "ci95": {"R@1": [27.5, 32.5], "R@5": [50.0, 60.0]}}
    return rec


def make_reproduce_document(data_root: Path) -> dict:
    """A combined results document as `reproduce` writes it: CLIP and FROMAGe on VIST (3 settings) and VisDial,
    both protocols; CLIP's answer ranking skipped; one record with a bootstrap standard error."""
    records = [_vist_record(m, s, p) for m in ("clip", "fromage") for s in ("1cap", "5cap", "5cap4img")
               for p in ("paper", "corrected")]
    for model, by_protocol in IR_OURS.items():
        for protocol, (r1, r5, r10) in by_protocol.items():
            records.append({"kind": "eval", "model": model, "task": "visdial_retrieval", "setting": "val",
                            "protocol": protocol, "precision": "fp32", "status": "ok",
                            "metrics": {"R@1": r1, "R@5": r5, "R@10": r10}, "n_examples": 4, "n_skipped": 0,
                            "chance": {"R@1": 25.0, "R@5": 100.0, "R@10": 100.0}, "extra": {"pool_size": 4}})
    for protocol, metrics in RANK_OURS.items():
        records.append({"kind": "eval", "model": "fromage", "task": "visdial_ranking", "setting": "val",
                        "protocol": protocol, "precision": "fp32", "status": "ok", "metrics": dict(metrics),
                        "n_examples": 8, "n_skipped": 0, "extra": {"dialogues": 4},
                        "chance": {"NDCG": 6.1, "MRR": 5.19, "R@1": 1.0, "R@5": 5.0, "R@10": 10.0}})
    records.append({"kind": "eval", "model": "clip", "task": "visdial_ranking", "setting": "val", "protocol": None,
                    "precision": "fp32", "status": "skipped", "reason": CLIP_SKIP})
    models = {"clip": {"family": "clip", "label": "clip", "source": HOSTILE_SOURCE, "name": "CLIP"},
              "fromage": {"family": "fromage", "label": "fromage", "source": "fromage-dir", "name": "FROMAGe"}}
    return {"created": "2026-12-01T00:00:00Z", "config": {"command": "reproduce", "data_root": str(data_root)},
            "environment": {}, "models": models, "records": records}


def write_miniworld_root(root: Path) -> Path:
    (root / "miniworld").mkdir(parents=True)
    (root / "miniworld" / "manifest.json").write_text('{"generator": "fromage-bench miniworld"}')
    return root


class _Doc(HTMLParser):
    """The <img> sources, and the rows of each table with an id: [(tag attrs, text)] per cell."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.imgs: list[dict] = []
        self.tables: dict[str, list[list[tuple[dict, str]]]] = {}
        self._table: str | None = None
        self._cell: tuple[dict, list[str]] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.imgs.append(attrs)
        elif tag == "table" and attrs.get("id"):
            self._table = attrs["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = (attrs, [])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._table and self._cell is not None:
            self.tables[self._table][-1].append((self._cell[0], "".join(self._cell[1]).strip()))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1].append(data)


def parse(text: str) -> _Doc:
    doc = _Doc()
    doc.feed(text)
    return doc


def decode_data_uri(src: str) -> Image.Image:
    match = re.fullmatch(r"data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)", src)
    assert match, src[:80]
    img = Image.open(io.BytesIO(base64.b64decode(match.group(2), validate=True)))
    img.load()
    return img


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run_dir, roots = make_fake_run(tmp_path_factory.mktemp("report"))
    path = write_report(run_dir, image_roots=roots)
    return run_dir, path, path.read_text(encoding="utf-8")


def _row(doc: _Doc, table: str, **match) -> list[tuple[dict, str]]:
    """The first row whose leading cells have the given texts (by position: task=0, setting=1, ...)."""
    positions = {"task": 0, "setting": 1, "protocol": 2, "metric": 3}
    for row in doc.tables[table]:
        texts = [t for _, t in row]
        if len(texts) > 4 and all(texts[positions[k]] == v for k, v in match.items()):
            return row
    raise AssertionError(f"no row {match} in {table}")


def _cell(row, css: str, precision: str) -> str:
    for attrs, text in row:
        if css in (attrs.get("class") or "").split() and attrs.get("data-precision") == precision:
            return text
    raise AssertionError(f"no {css} cell for {precision}")


def test_report_is_self_contained(report):
    run_dir, path, text = report
    assert path == run_dir / "report.html"
    assert text.startswith("<!DOCTYPE html>")
    lowered = text.lower()
    assert 'src="http' not in lowered and "<link" not in lowered and "<script" not in lowered
    assert "url(" not in lowered and "@import" not in lowered
    assert not re.search(r"(src|href)=\"(?!data:|#)", text), "only data: URIs and in-page anchors"


def test_every_image_is_a_decodable_data_uri(report):
    _, _, text = report
    doc = parse(text)
    assert len(doc.imgs) >= 4 + 10  # the four plots and a page of thumbnails
    kinds = set()
    for attrs in doc.imgs:
        img = decode_data_uri(attrs["src"])
        kinds.add(img.format)
        assert img.width > 0 and img.height > 0
        if img.format == "JPEG":
            assert max(img.size) <= 96
    assert kinds == {"PNG", "JPEG"}
    assert text.count('alt="Memory by precision"') == 1 and 'alt="Latency distribution"' in text
    assert 'alt="Accuracy vs memory"' in text and 'alt="Throughput by precision"' in text


def test_dataset_text_is_escaped(report):
    _, _, text = report
    assert "A cat &lt;script&gt;alert(1)&lt;/script&gt; &amp; a dog" in text
    assert "&lt;script&gt;document.title=&#39;PWNED&#39;&lt;/script&gt;" in text
    assert "<script" not in text and "<b>bold</b>" not in text and "answer 3 &lt;b&gt;bold&lt;/b&gt;" in text
    assert "Fake &lt;CPU&gt; &amp; co" in text and "fromage_model/&lt;weights &amp; co&gt;" in text


def test_accuracy_table_shows_paper_delta_and_drift(report):
    _, _, text = report
    doc = parse(text)
    row = _row(doc, "accuracy-table", task="vist_retrieval", metric="R@1")
    assert row[4][1] == "18.25"                        # the paper's number
    assert _cell(row, "value", "fp32") == "20.50"
    assert _cell(row, "delta", "fp32") == "+2.25"      # 20.50 - 18.25, by hand
    assert _cell(row, "delta", "bf16") == "+1.75"      # 20.00 - 18.25
    assert _cell(row, "drift", "fp32") == "ref"
    assert _cell(row, "drift", "bf16") == "-0.50"      # the record's drift
    assert _cell(row, "drift", "int8") == "-1.50"
    ndcg = _row(doc, "accuracy-table", task="visdial_ranking", metric="NDCG")
    assert _cell(ndcg, "delta", "fp32") == "-1.50"     # 15.00 - 16.50
    assert _cell(ndcg, "drift", "bf16") == "-0.25"     # computed by the report: 14.75 - 15.00
    skipped = _cell(ndcg, "skipped", "int8")
    assert skipped == f"skipped: {INT8_REASON}"


def test_cost_profile_and_skipped_sections(report):
    _, _, text = report
    doc = parse(text)
    cost_rows = [[t for _, t in row] for row in doc.tables["cost-table"]]
    header = cost_rows[0]
    assert {"Load s", "Weights", "Peak CUDA alloc (read this)", "Peak NVML device", "Peak RSS", "Examples/s",
            "Tokens/s", "Images/s", "p50 ms", "p90 ms", "p99 ms"} <= set(header)
    fp32_vist = next(r for r in cost_rows if r[:2] == ["fp32", "vist_retrieval:1cap"])
    assert fp32_vist[header.index("Weights")] == "4.00 GiB"
    assert fp32_vist[header.index("Tokens/s")] == "1,000.0"
    assert fp32_vist[header.index("p99 ms")] == "120.00"
    assert any(r[:2] == ["int8", "visdial_ranking:10r"] and f"skipped: {INT8_REASON}" in r for r in cost_rows)
    profile = [[t for _, t in row] for row in doc.tables["profile-table"]]
    assert any("41.0% of 100.0 tok/s" in r for r in profile)
    assert any(r[0] == "decode" and r[2] == "int8" and r[3].startswith("skipped") for r in profile[1:])
    projections = {r[1]: r[5] for r in profile if r[0] == "option_scoring"}  # 0.09 s and 0.3 s x 20640 rounds
    assert projections == {"options=100": "31.0 min VisDial val (20,640 rounds)",
                           "options=100, path=naive_per_option": "103.2 min VisDial val (20,640 rounds)"}
    skipped = [[t for _, t in row] for row in doc.tables["skipped-table"]]
    assert any("missing image: 1" in " ".join(r) and "corrupt image: 1" in " ".join(r) for r in skipped)
    assert "s77: missing image" in text
    assert html.escape(f"cell skipped: {INT8_REASON}") in text


def test_examples_mark_target_and_show_placeholders(report):
    _, _, text = report
    assert text.count('class="thumb hit"') >= 3            # the right photo is marked ...
    assert '<span class="mark">\u2713</span>' in text       # ... with a tick
    assert 'title="image not found: p_missing">p_missing<' in text
    assert 'title="image not found: p_bad">p_bad<' in text  # corrupt: a placeholder too
    assert text.count('class="example"') == 10              # 5 stories + 5 dialogue rounds
    assert "Q: what is in round 3?" in text and "option #7" in text
    assert '<li class="hit">answer 3 &lt;b&gt;bold&lt;/b&gt; <span class="muted">(#3)</span> \u2713</li>' in text


def test_missing_images_and_predictions_never_fail(tmp_path):
    run_dir, _ = make_fake_run(tmp_path)
    path = write_report(run_dir, image_roots={"vist_retrieval": tmp_path / "does-not-exist"})
    text = path.read_text()
    assert "image not found: p0" in text and "data:image/jpeg" not in text
    for f in (run_dir / "predictions").iterdir():
        f.unlink()
    text = main_report(run_dir).read_text()       # no image roots, no predictions: still a report
    assert 'id="accuracy-table"' in text and 'class="example"' not in text


def test_write_is_atomic(tmp_path, monkeypatch):
    run_dir, roots = make_fake_run(tmp_path)
    path = main_report(run_dir, [f"vist_retrieval={roots['vist_retrieval']}"])
    assert sorted(p.name for p in run_dir.iterdir()) == ["predictions", "report.html", "results.json"]
    before = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        write_report(run_dir)
    assert path.read_bytes() == before                # readers never see a torn report
    assert sorted(p.name for p in run_dir.iterdir()) == ["predictions", "report.html", "results.json"]


def test_odd_records_render(tmp_path):
    """Records with fields missing or of the wrong type, and garbage prediction lines: still a report."""
    run_dir = tmp_path / "odd"
    (run_dir / "predictions").mkdir(parents=True)
    (run_dir / "predictions" / "x.jsonl").write_text(
        'not json\n[1, 2]\n{"story_id": 1, "target": 5, "top": "p1"}\n'
        '{"story_id": 2, "target": 5, "topk": [{"id": 5, "score": 0.9}, {"id": 6}], "captions": 7}\n'
        '{"question": "q?", "gt_index": "x", "top": [1, "two", null]}\n'
        '{"image": "a/../../etc/passwd", "generated": "<i>caption</i>", "references": "one ref"}\n')
    records = [
        {"kind": "eval", "task": "weird", "setting": None, "protocol": "paper", "precision": "fp16", "status": "ok",
         "metrics": {"R@1": None, "note": "n/a", "MRR": float("nan")}, "paper": None, "cost": None,
         "predictions_file": "predictions/x.jsonl"},
        {"kind": "eval", "task": "weird", "precision": "fp32", "status": "ok", "metrics": {"MRR": 3}},
        {"kind": "eval", "task": "other", "precision": "int8", "status": "skipped"},
        {"kind": "profile", "scenario": "prefill", "precision": "fp16", "status": "ok"},
        {"kind": "profile", "precision": "bf16", "status": "ok", "cost": {"seconds": {}}, "params": None},
        "not a record",
    ]
    write_results(run_dir, {"created": None, "config": None, "environment": {"code": None, "gpus": None},
                            "records": records})
    text = write_report(run_dir, image_roots={"weird": tmp_path}).read_text()
    assert 'id="accuracy-table"' in text and 'id="profile-table"' in text
    assert "&lt;i&gt;caption&lt;/i&gt;" in text and "<i>" not in text
    assert "image not found: a/../../etc/passwd" in text   # never read outside the image root
    for attrs in parse(text).imgs:
        decode_data_uri(attrs["src"])


def _pytest_benchmark_json(path: Path) -> Path:
    """The shape pytest-benchmark's --benchmark-json writes (only the fields the report reads)."""
    path.write_text(json.dumps({
        "machine_info": {"cpu": {"brand_raw": "Test CPU <b>"}}, "datetime": "2026-11-28T00:00:00",
        "benchmarks": [
            {"name": "test_answer_ranking<script>", "stats": {"min": 0.25, "mean": 0.3},
             "extra_info": {"naive_seconds": 3.0, "speedup": 12.0, "target": 10.0}},
            {"name": "test_generation", "stats": {"min": 0.5, "mean": 0.6},
             "extra_info": {"naive_seconds": 2.0, "speedup": 4.0, "target": 5.0}}]}))
    return path


def test_speedup_table_from_pytest_benchmark_json(tmp_path):
    run_dir, _ = make_fake_run(tmp_path / "run")
    text = main_report(run_dir).read_text()
    assert 'id="speedup-table"' not in text                       # no benchmarks: no section
    _pytest_benchmark_json(run_dir / "benchmarks.json")          # found next to results.json by default
    doc = _Doc()
    doc.feed(main_report(run_dir).read_text())
    rows = [[t for _, t in row] for row in doc.tables["speedup-table"]]
    assert rows[0][:5] == ["Benchmark", "Fast path s", "Original-style s", "Speed-up", "Target"]
    assert rows[1:] == [["test_answer_ranking<script>", "0.250", "3.000", "12.0x", "10x", "met"],
                    ["test_generation", "0.500", "2.000", "4.0x", "5x", "missed"]]
    assert "<script>" not in main_report(run_dir).read_text().split('id="speedup-table"')[1]


def test_bad_benchmarks_file_is_one_clear_error(tmp_path, capsys):
    from fromage_bench.cli import main

    run_dir, _ = make_fake_run(tmp_path / "run")
    bad = tmp_path / "bench.json"
    bad.write_text('{"machine_info": {}}')
    before = (run_dir / "report.html").read_text() if (run_dir / "report.html").exists() else None
    assert main(["report", str(run_dir), "--benchmarks", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "pytest-benchmark" in err[0]
    assert ((run_dir / "report.html").read_text() if (run_dir / "report.html").exists() else None) == before
    assert main(["report", str(run_dir), "--benchmarks", str(tmp_path / "none.json")]) == 2
    assert "benchmarks file not found" in capsys.readouterr().err


def test_memory_columns_say_which_to_read_with_the_baseline_and_missing_nvml(tmp_path):
    """A GPU cell of the per-cell tracker: the allocated peak is the one to read, its baseline is beside it, and
    a per-process figure NVML could not give is "n/a" with the reason, not a blank; an old file says its
    reserved and NVML peaks are process high-water marks."""
    memory = {"cuda_max_allocated_bytes": 14 * GB, "cuda_max_reserved_bytes": 15 * GB,
              "nvml_device_used_bytes": 16 * GB, "cpu_rss_bytes": 2 * GB,
              "baseline": {"cuda_allocated_bytes": 13 * GB, "cuda_reserved_bytes": 13 * GB, "cpu_rss_bytes": GB},
              "nvml_process_unavailable": "this process (pid 7) is not in NVML's process list"}
    record = {"kind": "eval", "task": "visdial_ranking", "setting": "10r", "protocol": "standard",
              "precision": "bf16", "status": "ok", "metrics": {"NDCG": 1.0}, "paper": {}, "n_examples": 1,
              "n_skipped": 0, "skipped": {}, "skipped_examples": [], "extra": {},
              "cost": {"wall_seconds": 1.0, "weight_bytes": 13 * GB, "memory": memory}}
    new_dir, old_dir = tmp_path / "new", tmp_path / "old"
    old_record = json.loads(json.dumps(record))
    del old_record["cost"]["memory"]["baseline"], old_record["cost"]["memory"]["nvml_process_unavailable"]
    for run_dir, rec in ((new_dir, record), (old_dir, old_record)):
        run_dir.mkdir()
        write_results(run_dir, {"created": "2026-12-01T00:00:00Z", "config": {}, "environment": {}, "records": [rec]})
    text = write_report(new_dir).read_text()
    rows = parse(text).tables["cost-table"]
    header = [t for _, t in rows[0]]
    row = rows[1]
    assert [h for h in header if h.startswith("Peak")] == [
        "Peak CUDA alloc (read this)", "Peak CUDA reserved", "Peak NVML process", "Peak NVML device", "Peak RSS"]
    assert row[header.index("Before cell")][1] == "13.00 GiB"
    assert row[header.index("Peak CUDA alloc (read this)")][1] == "14.00 GiB"
    assert row[header.index("Peak NVML process")][1] == "n/a"
    assert memory["nvml_process_unavailable"].replace("'", "&#39;") in text  # the reason, on hover (escaped)
    assert "from a reset allocator" in text
    old_text = write_report(old_dir).read_text()
    old_header = [t for _, t in parse(old_text).tables["cost-table"][0]]
    assert "Before cell" not in old_header and "Peak NVML process" not in old_header
    assert "high-water marks" in old_text


def test_a_precision_this_cpu_emulates_says_so_next_to_its_cost(tmp_path):
    """fp16 on a CPU without fp16 arithmetic: its speed is the emulation's, and the cost table says so in the
    precision's cell and above the table; bf16 in hardware, and any precision of a GPU run, carry no mark."""
    from fromage_bench.cpu_precision import low_precision_support

    support = low_precision_support({"source": "/proc/cpuinfo", "instruction_sets": ["avx2", "avx512_bf16"]})
    record = {"kind": "eval", "task": "visdial_ranking", "setting": "val", "protocol": "corrected", "status": "ok",
              "metrics": {"MRR": 1.0}, "paper": {}, "n_examples": 1, "n_skipped": 0, "skipped": {},
              "skipped_examples": [], "extra": {}, "cost": {"wall_seconds": 1.0}}
    records = [dict(record, precision=p) for p in ("fp32", "bf16", "fp16")]
    texts = {}
    for name, gpus in (("cpu", []), ("gpu", [{"name": "a GPU"}])):
        run_dir = tmp_path / name
        run_dir.mkdir()
        write_results(run_dir, {"created": "2026-12-01T00:00:00Z", "config": {}, "records": records,
                                "environment": {"cpu_low_precision": support, "gpus": gpus}})
        texts[name] = write_report(run_dir).read_text(encoding="utf-8")
    rows = parse(texts["cpu"]).tables["cost-table"]
    precision_cells = [row[0][1] for row in rows[1:]]
    assert precision_cells == ["fp32", "bf16", "fp16 (emulated)"]
    assert "fp16 on this CPU: no native fp16" in texts["cpu"]
    assert "emulated" not in texts["gpu"]


HOSTILE = '<script>alert(1)</script>"onerror=alert(2) x="'


def test_template_escapes_hostile_task_setting_caption_and_reason(tmp_path):
    """The templates escape by default: a task, setting, caption, image id and skip reason full of markup stay
    text (decoded back to the same string by an HTML parser), in element text and in attributes alike."""
    run_dir = tmp_path / "hostile"
    (run_dir / "predictions").mkdir(parents=True)
    (run_dir / "predictions" / "p.jsonl").write_text(json.dumps(
        {"image": f"img{HOSTILE}", "generated": f"cap{HOSTILE}", "references": [f"ref{HOSTILE}"]}) + "\n")
    task, setting = f"task{HOSTILE}", f"setting{HOSTILE}"
    records = [
        {"kind": "eval", "status": "ok", "task": task, "setting": setting, "protocol": "p", "precision": "fp32",
         "metrics": {"BLEU-4": 1.0}, "n_examples": 1, "n_skipped": 0, "predictions_file": "predictions/p.jsonl",
         "cost": {"load_seconds": 1.0, "examples_per_second": 2.0, "examples_unit": f"unit{HOSTILE}"}},
        {"kind": "eval", "status": "skipped", "task": task, "setting": setting, "protocol": "p", "precision": "int8",
         "reason": f"reason{HOSTILE}"}]
    write_results(run_dir, {"created": "2026-12-01T00:00:00Z", "config": {}, "environment": {}, "records": records})
    text = write_report(run_dir).read_text(encoding="utf-8")

    assert "<script" not in text and '"onerror=' not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    doc = parse(text)
    skipped = [cells for cells in doc.tables["skipped-table"][1:] if cells[3][1] == "int8"][0]
    assert [t for _, t in skipped[:2]] == [task, setting]
    assert skipped[4][1] == f"cell skipped: reason{HOSTILE}"
    placeholder_titles = re.findall(r'class="placeholder" title="([^"]*)"', text)  # a raw quote would end it
    assert [html.unescape(t) for t in placeholder_titles] == [f"image not found: img{HOSTILE}"]
    accuracy = doc.tables["accuracy-table"][2]
    assert [t for _, t in accuracy[:3]] == [task, setting, "p"]
    plain = html.unescape(re.sub(r"<[^>]+>", "", text))
    assert f"cap{HOSTILE}" in plain and f"ref{HOSTILE}" in plain


# -- the paper's tables first -----------------------------------------------------------------------------------
def _sections(text: str) -> list[str]:
    return re.findall(r'<section id="([^"]+)"', text)


def _texts(doc: _Doc, table: str) -> list[list[str]]:
    return [[t for _, t in row] for row in doc.tables[table]]


@pytest.fixture(scope="module")
def reproduce_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce")
    run_dir = root / "out"
    run_dir.mkdir()
    write_results(run_dir, make_reproduce_document(write_miniworld_root(root / "data")))
    return write_report(run_dir).read_text(encoding="utf-8")


def test_report_leads_with_the_paper_tables_and_chance_on_other_data(reproduce_report):
    text = reproduce_report
    assert _sections(text)[0] == "tables" and _sections(text)[1] == "summary"
    doc = parse(text)
    table1 = _texts(doc, "paper-table1")
    assert table1[0][:3] == ["Model", "Setting", "R@1"] and table1[1][:3] == ["(p)", "(c)", "paper"]
    # CLIP first as in the paper, then FROMAGe, then the chance row; by hand from VIST_OURS and the paper's table
    assert table1[2] == ["CLIP", "1cap", "5.00", "6.00", "11.90", "20.00", "21.00", "25.50", "30.00", "31.00",
                         "32.20", "\u2014"]
    fromage = next(r for r in table1 if r[:2] == ["FROMAGe", "5cap4img"])
    assert fromage[2:5] == ["12.00 \u00b1 1.25", "13.50", "18.20"]  # ± the record's bootstrap standard error
    assert fromage[5:8] == ["42.00 \u00b1 2.50", "43.50", "42.70"]
    chance = next(r for r in table1 if r[:2] == ["chance (random ranking)", "5cap4img"])
    assert chance[2:5] == ["7.14", "7.14", "\u2014"] and chance[8] == "71.43"
    ranking = _texts(doc, "paper-table2_ranking")
    clip = next(r for r in ranking if r[0] == "CLIP")
    assert clip[2:5] == ["skipped", "skipped", "\u2014"]  # the paper has no CLIP answer ranking either
    assert clip[-1] == f"skipped: {CLIP_SKIP}"                           # the reason, escaped
    assert html.escape(CLIP_SKIP) in text and "<no LM>" not in text
    assert html.escape(HOSTILE_SOURCE, quote=False) in text and "<img src=x" not in text  # the summary's models
    # other data: no difference to the paper anywhere, chance in the long table instead
    tables_html = text.split('<section id="tables">')[1].split("</section>")[0]
    assert 'class="pos"' not in tables_html and 'class="neg"' not in tables_html
    assert "not the paper" in tables_html and "miniworld" in tables_html
    accuracy = doc.tables["accuracy-table"]
    assert [t for _, t in accuracy[1]][:3] == ["ours", "chance", "drift"]
    assert not any("delta" in (a.get("class") or "") for row in accuracy for a, _ in row)
    row = next(r for r in accuracy if [t for _, t in r][:5] == ["clip", "vist_retrieval", "1cap", "paper", "R@1"])
    assert [t for a, t in row if "chance" in (a.get("class") or "")] == ["7.14"]


def test_long_table_is_folded_and_skips_are_per_model(reproduce_report):
    text = reproduce_report
    folded = text.split('<section id="accuracy">')[1].split("</section>")[0]
    assert folded.startswith("<h2>Every metric</h2><details><summary>") and 'id="accuracy-table"' in folded
    assert "</table>" in folded.split("</details>")[0]
    rows = _texts(parse(text), "accuracy-table")
    clip_ranking = [r for r in rows if r[:2] == ["clip", "visdial_ranking"]]
    assert clip_ranking and all(f"skipped: {CLIP_SKIP}" in r for r in clip_ranking)
    assert not any(r[:2] == ["fromage", "visdial_ranking"] and any(c.startswith("skipped") for c in r) for r in rows)
    cost = _texts(parse(text), "cost-table")
    assert ["fp32", "clip visdial_ranking:val"] in [r[:2] for r in cost]  # each model's cells have their own rows
    assert ["fp32", "fromage visdial_ranking:val"] in [r[:2] for r in cost]


def test_paper_tables_show_the_difference_on_the_paper_data(tmp_path):
    data = tmp_path / "data"
    data.mkdir()  # no manifest, no limit, and VisDial with its 2,064 val dialogues
    document = make_reproduce_document(data)
    for r in document["records"]:
        if r["task"] == "visdial_retrieval":
            r["extra"]["pool_size"] = 2063
            r["n_skipped"] = 1
    run_dir = tmp_path / "out"
    run_dir.mkdir()
    write_results(run_dir, document)
    text = write_report(run_dir).read_text(encoding="utf-8")
    doc = parse(text)
    fromage = next(r for r in _texts(doc, "paper-table1") if r[:2] == ["FROMAGe", "1cap"])
    assert fromage[2:5] == ["10.00-1.30", "11.50", "11.30"]  # 10.00 - 11.30 under the paper protocol, by hand
    assert [t for _, t in doc.tables["accuracy-table"][1]][:3] == ["ours", "\u0394 paper", "drift"]
    assert "the paper&#39;s datasets" in text


def test_accuracy_vs_memory_has_a_panel_per_task_and_nothing_overlaps(monkeypatch):
    """One panel per task; no text next to points; no legend, title or axes overlaps another (rendered extents)."""
    from reports import plots

    figures = []
    monkeypatch.setattr(plots, "_to_data_uri", lambda fig: figures.append(fig) or "data:image/png;base64,")
    same_memory = [("fp32", 4 * GB, 20.0), ("bf16", 2 * GB, 20.0), ("fp16", 2 * GB, 20.1), ("int8", GB, 19.0)]
    panels = {"vist_retrieval": {f"{s} {p}": same_memory for s in ("1cap", "5cap", "5cap4img")
                                 for p in ("paper", "corrected")},
              "visdial_retrieval": {"val paper": same_memory[:2]}, "captioning": {"coco standard": same_memory}}
    assert plots.accuracy_vs_memory(panels, {"vist_retrieval": "R@1", "visdial_retrieval": "R@1",
                                             "captioning": "BLEU-4"})
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = figures[0]
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    assert [ax.get_title() for ax in fig.axes] == ["vist_retrieval (R@1)", "visdial_retrieval (R@1)",
                                                   "captioning (BLEU-4)"]
    assert not any(ax.texts for ax in fig.axes)  # no labels beside the points
    from matplotlib.transforms import Bbox

    boxes = [fig.legends[0].get_window_extent(renderer)]  # the precision markers' legend
    for ax in fig.axes:  # each panel: its plot area with its title, its x label, its legend
        boxes += [Bbox.union([ax.get_window_extent(renderer), ax.title.get_window_extent(renderer)]),
                  ax.xaxis.label.get_window_extent(renderer), ax.get_legend().get_window_extent(renderer)]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)
