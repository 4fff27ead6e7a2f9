"""Sessions: `nox -s eval` (the main job), `nox -s tests` (the suite); bench, oldest and regression besides."""
import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests"]

# Pinned in the package's own install, so that its unpinned `torch` requirement is met by the CPU wheel on
# disk instead of pulling a multi-GB CUDA build. GPU users install their own torch.
TORCH = "torch==2.13.0"
OLDEST_TRANSFORMERS = "transformers==5.0.0"  # the floor in pyproject.toml


def install(session: nox.Session, extras: str = "test,demo") -> None:
    """torch and the package with `extras` (demo: the Gradio chat's tests run in the suite). The eval and
    regression sessions take none: they run no test. `--no-compile`: pip would byte-compile every file of every
    package (torch alone has thousands), where Python compiles the few it imports on first use; that halved
    the install of the eval session here (README, first run)."""
    session.install("--no-compile", TORCH, "-e", f".[{extras}]" if extras else ".")  # one resolver run


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
