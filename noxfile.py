"""Sessions: `nox -s eval` (the main job), `nox -s tests` (the suite)."""
import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests"]

# Installed before the package so that its unpinned `torch` requirement is already met by the CPU
# wheel on disk, instead of pulling a multi-GB CUDA build. GPU users install their own torch.
TORCH = "torch==2.13.0"


def install(session: nox.Session) -> None:
    session.install(TORCH)
    session.install("-e", ".[test]")


@nox.session
def tests(session: nox.Session) -> None:
    install(session)
    session.run("pytest", *session.posargs)


@nox.session(name="eval")
def eval_(session: nox.Session) -> None:
    install(session)
    # Until the evaluation tasks land, the main job shows what the model stack does on a tiny model.
    session.run("fromage-bench", "make-tiny", "--out", "runs/tiny-model")
    for precision in ("fp32", "bf16", "fp16", "int8"):
        session.run("fromage-bench", "info", "--model-dir", "runs/tiny-model", "--precision", precision)
