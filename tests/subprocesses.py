"""Running jaxmerge's command-line programs from tests, as a user would."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def subprocess_env() -> dict[str, str]:
    """This process's environment without ``XLA_FLAGS``: the tests' no-optimisation flags
    (tests/conftest.py) are for in-process runs; a subprocess compiles like a user's run.
    Nor ``PYTHONUNBUFFERED``: a program must flush its own output (a pipe is buffered)."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.pop("PYTHONUNBUFFERED", None)
    return env


def run_module(module: str, *args, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m module --progress=false --compilation_cache= *args`` in the repository
    root; returns the finished process (stdout and stderr captured as text)."""
    command = [sys.executable, "-m", module, "--progress=false", "--compilation_cache=",
               *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env=subprocess_env())
