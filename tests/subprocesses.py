"""Running this checkout's CLI in a child process, and killing one mid-run (the resume tests)."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]


def child_env() -> dict[str, str]:
    """The environment of a child running this checkout's code on one thread."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def sigkill_when(cmd: list[str], ready: Callable[[], bool], what: str, timeout: float) -> None:
    """Start `cmd`, wait until `ready()` (failing if the child ends first or `timeout` seconds pass) and SIGKILL
    it, as a machine losing power or the OOM killer would."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, f"the child ended before {what}: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} in {timeout:.0f} s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
