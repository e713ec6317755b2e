"""How a merge spends the CPU's cores: concurrent chunk calls, single-threaded LAPACK.

On the CPU backend XLA runs its own element-wise and matmul kernels on its intra-op
thread pool, but every SVD, QR or eigendecomposition is a LAPACK call into the BLAS
library scipy ships (jaxlib's CPU kernels take their LAPACK from
``scipy.linalg.cython_lapack``; OpenBLAS in the wheels). LAPACK's drivers parallelise
poorly at the sizes merges see: on a 2-core machine one 1536×576 float32 ``gesdd``
took 82 ms with OpenBLAS's 2 threads and 71 ms with 1, and two single-threaded ones
running at once took 77 ms together (38 ms each). Spectral merges (TSV, ISO-C,
ISO-CTS, STAR, SVC, ResMerge's exact fallbacks) are made of such calls, one matrix at
a time (:func:`jaxmerge.linalg.one_matrix_per_lapack_call`), so the executor runs
several chunk calls at once from its own threads (:func:`default_compute_threads`)
and keeps the BLAS library to ``cores // compute threads`` threads meanwhile
(:class:`LapackThreadLimit`), from the moment a merge first needs LAPACK: merges that
never do (task arithmetic, TIES, DARE) never load scipy, ~0.1 s of a 1.2 s CLI run.

Which thread runs a chunk changes nothing in its result. A LAPACK routine's rounding
could in principle depend on its BLAS thread count; the merges of SmolLM2 + 3 experts
(TSV, ISO-C, ISO-CTS, ResMerge, TIES, DARE-TIES) came out bit-identical before and
after this change, and ``tests/test_cpu_threads.py`` checks 1, 2 and 3 threads.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

MAX_DEFAULT_COMPUTE_THREADS = 2
"""Concurrent chunk calls by default (each holds one more chunk of inputs in memory)."""


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_compute_threads(backend: str) -> int:
    """Chunk calls to run at once on one device: up to 2 on the CPU, else 1
    (an accelerator queues its calls anyway). A mesh always runs one: its calls must
    be issued in the same order on every process (collectives)."""
    if backend != "cpu":
        return 1
    return min(MAX_DEFAULT_COMPUTE_THREADS, available_cores())


def blas_threads_per_call(compute_threads: int) -> int:
    """BLAS threads for each of ``compute_threads`` concurrent calls: the cores shared out."""
    return max(1, available_cores() // max(1, compute_threads))


@contextlib.contextmanager
def blas_threads(threads: int) -> Iterator[None]:
    """Limits the BLAS libraries (the one jaxlib's LAPACK kernels use among them) to
    ``threads`` threads inside the block, restoring their settings after it.

    Process-wide while it lasts: other threads' numpy / scipy linear algebra gets the
    same limit.
    """
    import scipy.linalg.cython_lapack  # noqa: F401 - loads the library jaxlib calls
    import threadpoolctl

    with threadpoolctl.threadpool_limits(limits=int(threads), user_api="blas"):
        yield


def lapack_loaded() -> bool:
    """Whether jaxlib has loaded the LAPACK library its CPU kernels call: it imports
    ``scipy.linalg.cython_lapack`` when it first lowers a program with a LAPACK call."""
    return "scipy.linalg.cython_lapack" in sys.modules


class LapackThreadLimit:
    """:func:`blas_threads` for the duration of a ``with`` block, entered only once
    LAPACK is in use.

    The owner calls :meth:`apply` before every call of a compiled program (after the
    program was lowered, so a program with a LAPACK call has loaded the library by
    then); the first such call after the library is loaded sets the limit, and the
    end of the block restores the old settings. Until then nothing is imported.
    """

    def __init__(self, threads: int):
        self._threads = int(threads)
        self._lock = threading.Lock()
        self._limits = contextlib.ExitStack()
        self._applied = False

    def __enter__(self) -> LapackThreadLimit:
        return self

    def apply(self) -> None:
        """Sets the limit if LAPACK is loaded and the limit is not set yet (thread-safe)."""
        if self._applied or not lapack_loaded():
            return
        with self._lock:
            if not self._applied:
                self._limits.enter_context(blas_threads(self._threads))
                self._applied = True

    def __exit__(self, *exc_info) -> None:
        with self._lock:
            self._limits.close()
            self._applied = False
