"""results.json: one versioned schema for every task and profile scenario, written atomically.

Document: {"schema": "fromage-bench/results", "schema_version": 1, "created", "config", "environment",
"records": [...]}. Each record has "kind" ("eval" or "profile"), "precision", "status" ("ok" or "skipped"
with a "reason") and, for evals: "task", "setting", "protocol", "metrics", "paper", "n_examples",
"n_skipped", "skipped", "drift" (metric deltas against the highest precision of the same run), "cost"
(load time, wall time, throughput, latency percentiles, memory, weight bytes), "predictions_file";
for profiles: "scenario", "params", "cost". See docs/results-schema.md.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from model.files import atomic_write_text

SCHEMA = "fromage-bench/results"
SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"


def write_results(run_dir: Path, document: dict[str, Any]) -> Path:
    document = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **document}
    path = Path(run_dir) / RESULTS_FILE
    atomic_write_text(path, json.dumps(document, indent=2, sort_keys=False, default=_jsonable) + "\n")
    return path


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_results(path: str | Path) -> dict[str, Any]:
    from model.errors import FromageInputError, read_json

    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    document = read_json(path, "results file not found")
    if not isinstance(document, dict) or document.get("schema") != SCHEMA:
        raise FromageInputError(path, "not a fromage-bench results file")
    if document.get("schema_version") != SCHEMA_VERSION:
        raise FromageInputError(path, f"schema version {document.get('schema_version')} is not the supported "
                                f"{SCHEMA_VERSION}")
    return document


def load(path: str | Path):
    """A pandas DataFrame with one row per record; nested fields flattened ("metrics.R@1", "cost.load_seconds")."""
    import pandas as pd

    records = read_results(path)["records"]
    return pd.json_normalize(records, sep=".")


def to_csv(path: str | Path, out: str | Path) -> Path:
    load(path).to_csv(out, index=False)
    return Path(out)
