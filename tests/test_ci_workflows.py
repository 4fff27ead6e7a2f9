"""docs/ci/*.yml: the GitHub Actions workflow and the GitLab CI job parse, and their commands, run as a script,
publish the regression reports and fail the job on a regression.

The commands run for real (`nox -s regression -- --report ...`, the noxfile's session, `fromage-bench compare`,
the job-summary step) with three substitutes on PATH: `python -m pip` and `apt-get` do nothing (the suite's
environment is installed), `nox` runs the noxfile's session function in this interpreter (installs skipped),
and the session's `fromage-bench embedded` (minutes) copies a tiny eval run made once here (a tiny model,
six VIST stories, fp32)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from xml.etree import ElementTree

import pytest
import yaml

from fromage_bench.cli import main
from fromage_bench.synth.vist import write_vist
from tasks.metrics import mean_reciprocal_rank, mean_rank, recall_at_k

REPO = Path(__file__).resolve().parent.parent
GITHUB = REPO / "docs" / "ci" / "github-regression.yml"
GITLAB = REPO / "docs" / "ci" / "gitlab-regression.yml"

FAKE_NOX = textwrap.dedent('''\
    """nox, as far as the CI files use it: `nox -s NAME [-- POSARGS]` runs noxfile.py's session NAME."""
    import os, shutil, subprocess, sys, types
    sessions = {}
    nox = types.ModuleType("nox")
    nox.options = types.SimpleNamespace()
    nox.Session = object
    def session(func=None, **kw):
        if func is None:
            return lambda f: session(f, **kw)
        sessions[kw.get("name", func.__name__)] = func
        return func
    nox.session = session
    sys.modules["nox"] = nox

    class Session:
        venv_backend = "venv"
        def __init__(self, posargs):
            self.posargs = posargs
        def install(self, *args):
            print("[substitute] install skipped:", *args)
        def run(self, *args):
            if args[:2] == ("fromage-bench", "embedded"):  # minutes of work: a tiny run made beforehand
                out = args[args.index("--out") + 1]
                print("[substitute] fromage-bench embedded -> copy of", os.environ["TINY_RUN"])
                shutil.rmtree(out, ignore_errors=True)
                shutil.copytree(os.environ["TINY_RUN"], out)
                return
            command = [sys.executable, "-m", "fromage_bench", *args[1:]] if args[0] == "fromage-bench" else list(args)
            code = subprocess.call(command)
            if code:
                print(f"nox > Command {' '.join(args)} failed with exit code {code}")
                sys.exit(1)

    argv = sys.argv[1:]
    posargs = argv[argv.index("--") + 1:] if "--" in argv else []
    name = argv[argv.index("-s") + 1]
    noxfile = {"__name__": "noxfile"}
    exec(compile(open(os.environ["NOXFILE"]).read(), os.environ["NOXFILE"], "exec"), noxfile)
    sessions[name](Session(posargs))
    ''')


def _substitutes(bin_dir: Path) -> Path:
    bin_dir.mkdir()
    (bin_dir / "nox").write_text(f"#!{sys.executable}\n" + FAKE_NOX)
    (bin_dir / "apt-get").write_text('#!/bin/sh\necho "[substitute] apt-get $*"\n')
    # python -m pip: nothing to install; any other python is this interpreter
    (bin_dir / "python").write_text(f'#!/bin/sh\nif [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "[substitute] pip $*"; '
                                    f'exit 0; fi\nexec {sys.executable} "$@"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


@pytest.fixture(scope="module")
def workspace(tiny_dir, tmp_path_factory):
    """A checkout-like directory: the baseline a tiny eval made, the substitutes, the tiny run they copy."""
    root = tmp_path_factory.mktemp("ci")
    data = root / "data"
    write_vist(data, n=6, seed=1)
    tiny_run = root / "tiny-run"
    assert main(["eval", "--model-dir", str(tiny_dir), "--data-root", str(data), "--out", str(tiny_run), "--tasks",
                 "vist_retrieval:5cap4img", "--precisions", "fp32", "--device", "cpu", "--no-progress"]) == 0
    work = root / "checkout"
    (work / "baselines").mkdir(parents=True)
    shutil.copytree(tiny_run, work / "baselines" / "embedded")
    env = {**os.environ, "PATH": f"{_substitutes(root / 'bin')}{os.pathsep}{os.environ['PATH']}",
           "TINY_RUN": str(tiny_run), "NOXFILE": str(REPO / "noxfile.py"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return work, env


def _plant_a_better_baseline(baseline: Path) -> None:
    """A baseline whose stories all ranked their target first: the tiny run is a regression against it."""
    doc = json.loads((baseline / "results.json").read_text())
    for record in doc["records"]:
        path = baseline / record["predictions_file"]
        predictions = [{**json.loads(line), "rank": 1} for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps(p) + "\n" for p in predictions))
        ranks = [1] * len(predictions)
        record["metrics"] = {**{f"R@{k}": v for k, v in recall_at_k(ranks, (1, 5, 10)).items()},
                             "MRR": mean_reciprocal_rank(ranks), "mean_rank": mean_rank(ranks)}
    (baseline / "results.json").write_text(json.dumps(doc))


def _github_steps(workflow: dict) -> tuple[dict, list[dict]]:
    job = workflow["jobs"]["embedded-regression"]
    return job.get("env", {}), job["steps"]


def run_github_job(workflow: dict, work: Path, env: dict) -> tuple[list[tuple[str, int | None]], Path, list[str]]:
    """Each `run:` step in order as GitHub runs it (`bash -e -o pipefail`), a failed step skipping the later ones
    but those with `if: always()`. Returns ([(step, exit code or None if skipped)], the job summary file, the
    upload-artifact step's paths)."""
    job_env, steps = _github_steps(workflow)
    summary = work / "step-summary.md"
    summary.write_text("")
    results, artefacts, failed = [], [], False
    for step in steps:
        name = step.get("name") or step.get("uses") or step["run"]
        if "uses" in step:
            if step["uses"].startswith("actions/upload-artifact"):
                artefacts = step["with"]["path"].split()
            continue
        if failed and step.get("if") != "always()":
            results.append((name, None))
            continue
        code = subprocess.call(["bash", "--noprofile", "--norc", "-e", "-o", "pipefail", "-c", step["run"]], cwd=work,
                               env={**env, **job_env, **step.get("env", {}), "GITHUB_STEP_SUMMARY": str(summary)})
        results.append((name, code))
        failed = failed or code != 0
    return results, summary, artefacts


def run_gitlab_job(job: dict, work: Path, env: dict) -> int:
    """before_script then script in one shell, stopping at the first failing command, as GitLab's runner does."""
    script = "\n".join(job["before_script"] + job["script"])
    return subprocess.call(["bash", "-e", "-c", script], cwd=work, env={**env, **job.get("variables", {})})


def test_both_files_parse_and_run_the_regression_on_a_pull_request():
    workflow = yaml.safe_load(GITHUB.read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert "pull_request" in triggers
    job_env, steps = _github_steps(workflow)
    runs = [s["run"] for s in steps if "run" in s]
    assert any("nox -s regression" in r for r in runs)
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()" and "runs/regression/compare/" in upload["with"]["path"].split()
    assert any("GITHUB_STEP_SUMMARY" in r for r in runs)

    job = yaml.safe_load(GITLAB.read_text())["embedded-regression"]
    assert any('merge_request_event' in rule["if"] for rule in job["rules"])
    assert any("nox -s regression" in line for line in job["script"])
    assert job["artifacts"]["when"] == "always"
    assert job["artifacts"]["reports"]["junit"] == f"{job['variables']['REPORTS']}/compare.xml"
    # the reports the jobs publish are the ones their compare writes
    for text in (runs, job["script"]):
        assert all(f"{fmt}=$REPORTS/compare.{ext}" in " ".join(text)
                   for fmt, ext in (("markdown", "md"), ("json", "json"), ("junit", "xml")))
    assert job_env["REPORTS"] == job["variables"]["REPORTS"] == "runs/regression/compare"


def test_the_github_workflow_publishes_the_reports_and_fails_on_a_regression(workspace):
    work, env = workspace
    workflow = yaml.safe_load(GITHUB.read_text())
    steps, summary, artefacts = run_github_job(workflow, work, env)
    assert all(code == 0 for _, code in steps), steps
    assert summary.read_text().startswith("## fromage-bench compare: ✅ 0 regression(s)")
    assert all((work / path).exists() for path in artefacts)
    assert json.loads((work / "runs/regression/compare/compare.json").read_text())["exit_code"] == 0

    _plant_a_better_baseline(work / "baselines" / "embedded")
    steps, summary, artefacts = run_github_job(workflow, work, env)
    codes = dict(steps)
    assert codes["Embedded regression"] == 1 and codes["Job summary"] == 0  # the summary step runs anyway
    assert summary.read_text().startswith("## fromage-bench compare: ❌")
    assert all((work / path).exists() for path in artefacts)
    suite = ElementTree.parse(work / "runs/regression/compare/compare.xml").getroot()
    assert suite.get("failures") == "2"  # both protocols' records of the tiny run


def test_the_gitlab_job_fails_on_a_regression_and_leaves_its_artefacts(workspace):
    work, env = workspace
    job = yaml.safe_load(GITLAB.read_text())["embedded-regression"]
    shutil.rmtree(work / "runs", ignore_errors=True)
    _plant_a_better_baseline(work / "baselines" / "embedded")
    assert run_gitlab_job(job, work, env) == 1
    assert all((work / path).exists() for path in job["artifacts"]["paths"])
    assert ElementTree.parse(work / job["artifacts"]["reports"]["junit"]).getroot().get("failures") == "2"
