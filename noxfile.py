"""Sessions: `nox -s eval` (the main job), `nox -s tests` (the suite); bench, oldest and regression besides."""
import os

import nox

# uv where it is installed (`pip install 'nox[uv]'`): it installed this project in 7 s where pip took 35 s, both
# with empty caches (README, first run); plain venv + pip otherwise
nox.options.default_venv_backend = "uv|venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests"]

# Pinned in the package's own install, so that its unpinned `torch` requirement is met by the CPU wheel on
# disk instead of pulling a multi-GB CUDA build. GPU users install their own torch.
TORCH = "torch==2.13.0"
OLDEST_TRANSFORMERS = "transformers==5.0.0"  # the floor in pyproject.toml


def install(session: nox.Session, extras: str = "test,demo") -> None:
    """torch and the package with `extras` (demo: the Gradio chat's tests run in the suite). The eval and
    regression sessions take none: they run no test. One resolver run."""
    packages = [TORCH, "-e", f".[{extras}]" if extras else "."]
    if session.venv_backend == "uv":
        # uv reads no pip settings: pass on pip's find-links (where a machine keeps wheels such as the CPU
        # torch); uv does not byte-compile unless asked
        links = [f for link in os.environ.get("PIP_FIND_LINKS", "").split() for f in ("--find-links", link)]
        session.install(*links, *packages)
    else:
        # pip would byte-compile every file of every package (torch alone has thousands), where Python compiles
        # the few it imports on first use: that halved the eval session's install here
        session.install("--no-compile", *packages)


@nox.session
def tests(session: nox.Session) -> None:
    install(session)
    session.run("pytest", *session.posargs)


@nox.session
def oldest(session: nox.Session) -> None:
    """The suite against the lowest transformers that pyproject.toml allows, so that floor stays true."""
    install(session)
    session.install(OLDEST_TRANSFORMERS)
    session.run("pytest", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Fast paths against the original scripts' way of working, same model and inputs (pytest-benchmark)."""
    install(session)
    os.makedirs("runs/bench", exist_ok=True)  # pytest-benchmark writes its JSON but makes no directory (a fresh clone)
    session.run("pytest", "benchmarks", "--benchmark-only", "--benchmark-json=runs/bench/benchmarks.json",
                 "-p", "no:cacheprovider", *session.posargs)


@nox.session(name="eval")
def eval_(session: nox.Session) -> None:
    """The embedded default: miniworld data, stand-in backbones, a trained FROMAGe, every task x precision."""
    install(session, extras="")
    session.run("fromage-bench", "embedded", *session.posargs)


@nox.session
def regression(session: nox.Session) -> None:
    """A fresh embedded-default run compared against the baseline committed in baselines/embedded/.
    Speed and memory tolerances are loose: shared CI machines are noisy; metrics must match within 0.5."""
    install(session, extras="")
    session.run("fromage-bench", "embedded", "--out", "runs/regression", "--no-progress")
    # posargs reach compare: CI adds --report FORMAT=PATH for its job summary, artefacts and JUnit (docs/ci.md)
    session.run("fromage-bench", "compare", "baselines/embedded/results.json", "runs/regression",
                "--metric-tol", "0.5", "--speed-tol", "60%", "--memory-tol", "25%", *session.posargs)
