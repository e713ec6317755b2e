"""Helpers shared by the command lines (jaxmerge.main, jaxmerge.analyze); no flags here,
so each CLI module defines its own flags without clashing."""

from __future__ import annotations

import logging
import os
import pathlib
import re
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from jaxmerge.errors import ConfigError, JaxmergeError

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6,
          "G": 10**9, "T": 10**12}


def parse_size(text: str, flag: str) -> int:
    """'5GB' -> 5_000_000_000, '2GiB' -> 2·2³⁰, '1e9' -> 10⁹."""
    match = _SIZE_RE.match(text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS:
        raise ConfigError(f"--{flag}={text!r} is not a size like 5GB, 500MB or 2GiB")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ConfigError(f"--{flag} must be positive, got {text!r}")
    return value


def enable_compilation_cache(directory: str) -> None:
    """Turns on JAX's persistent compilation cache in ``directory`` (if non-empty)."""
    if not directory:
        return
    import jax

    path = pathlib.Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        logging.warning("compilation cache %s unavailable (%s); compiling from scratch", path,
                        error)
        return
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def run_command(run: Callable[[Sequence[str]], int], argv: Sequence[str]) -> int:
    """Runs a command line's ``run(argv)`` the way every jaxmerge CLI reports failures.

    User errors (:class:`JaxmergeError`) print one ``error: ...`` line and exit 2, an
    interrupt exits 130; warnings print as ``warning: ...``; no traceback for either.
    """
    logging.basicConfig(format="warning: %(message)s", level=logging.WARNING, force=True)
    try:
        return run(argv)
    except JaxmergeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130


def run_program(main: Callable[[Sequence[str]], int]) -> None:
    """Runs a command line's ``main`` under ``absl.app`` and ends the process right after.

    A one-process run skips the interpreter's teardown (:func:`exit_now`): by then every
    file is closed, synced and renamed, and unloading JAX and XLA's CPU client would add
    ~0.15 s, a tenth of a small merge. A multi-process run exits normally, so that
    ``jax.distributed`` shuts down in step with the other processes. Freed memory is
    kept for reuse (:func:`retain_freed_memory`), and the garbage collector runs less
    (:func:`quiet_garbage_collector`).
    """
    from absl import app

    retain_freed_memory()
    quiet_garbage_collector()

    def main_then_exit(argv):
        code = main(argv)
        from jaxmerge import distributed

        if not distributed.initialized():
            exit_now(code)
        return code

    app.run(main_then_exit)


_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
RETAINED_ALLOCATION_BYTES = 1 << 30
"""Allocations up to this size are served from, and freed back to, the process's heap."""


def retain_freed_memory() -> bool:
    """Has glibc's malloc keep freed memory for the next allocation (command lines only).

    By default glibc returns every freed block over its (adaptive) mmap threshold, and
    the heap's top, to the kernel, so the next chunk's buffers of the same size, XLA's
    temporaries included, are faulted in and zeroed anew: up to ~900 k page faults
    and ~1 s of system time in a 4 s TIES merge of SmolLM2 + 3 experts (2 cores),
    varying from run to run. With allocations up to
    :data:`RETAINED_ALLOCATION_BYTES` kept in the heap and the heap never trimmed,
    ~120 k faults. Peak memory is unchanged: what is kept is what was in use before.
    Returns whether it applied (glibc only; elsewhere nothing changes).
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, RETAINED_ALLOCATION_BYTES)
                and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def quiet_garbage_collector() -> None:
    """Moves everything imported so far out of the cyclic garbage collector's sweeps
    (``gc.freeze``) and has it run a tenth as often. A merge makes few reference
    cycles; the collector's sweeps over JAX's objects took ~3 % of the CPU time of a
    first task-arithmetic merge of SmolLM2 + 3 experts (−0.03 s of 1.35 s)."""
    import gc

    gc.freeze()
    first, second, third = gc.get_threshold()
    gc.set_threshold(first * 10, second, third)


def exit_now(code: int) -> NoReturn:
    """Flushes the log and the standard streams, then ends the process with ``code``
    without running the interpreter's teardown (``os._exit``)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
