"""Concurrent chunk calls and the BLAS thread limit (jaxmerge.cpu_threads)."""

import contextlib
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import threadpoolctl

import jaxmerge
from jaxmerge import cpu_threads, executor, methods
from jaxmerge.errors import JaxmergeError
from tests.subprocesses import ROOT, subprocess_env


def models(n=3, seed=0, layers=6):
    """``layers`` same-shape matrices of each of two shapes, and a vector: every group
    spans several chunks under a small budget."""
    rng = np.random.default_rng(seed)

    def params():
        return {"layers": [{"w": rng.standard_normal((48, 16), np.float32),
                            "v": rng.standard_normal((16, 40), np.float32)}
                           for _ in range(layers)],
                "norm": rng.standard_normal(16, np.float32)}

    return params(), [params() for _ in range(n)]


def leaves(tree):
    return jax.tree.leaves(jax.tree.map(np.asarray, tree))


def test_default_compute_threads():
    cores = cpu_threads.available_cores()
    assert cpu_threads.default_compute_threads("cpu") == min(2, cores)
    assert cpu_threads.default_compute_threads("gpu") == 1
    assert cpu_threads.default_compute_threads("tpu") == 1


def test_blas_threads_share_the_cores():
    cores = cpu_threads.available_cores()
    assert cpu_threads.blas_threads_per_call(1) == cores
    assert cpu_threads.blas_threads_per_call(2) == max(1, cores // 2)
    assert cpu_threads.blas_threads_per_call(10 * cores) == 1


def _blas_threads() -> dict[str, int]:
    return {lib["filepath"]: lib["num_threads"] for lib in threadpoolctl.threadpool_info()
            if lib["user_api"] == "blas"}


def test_blas_threads_limits_and_restores():
    with cpu_threads.blas_threads(1):
        inside = _blas_threads()
    after = _blas_threads()
    assert inside and all(n == 1 for n in inside.values())
    assert any("scipy" in path for path in inside)  # the library jaxlib's LAPACK calls
    with cpu_threads.blas_threads(1):
        pass
    assert _blas_threads() == after


@pytest.mark.parametrize("name", ["tsv", "iso_cts", "resmerge", "ties", "dare_ties"])
def test_results_do_not_depend_on_compute_threads(name):
    """Bit-identical merges with 1, 2 and 3 chunk calls at once (DARE's masks included)."""
    base, experts = models(seed=1)
    merge = methods.build(name, {})
    runs = [leaves(jaxmerge.merge(merge, base, experts, key=3, chunk_bytes=20_000,
                                  compute_threads=threads)) for threads in (1, 2, 3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            np.testing.assert_array_equal(a, b)


def test_compute_threads_run_chunks_at_once(monkeypatch):
    """With 2 threads two chunk calls overlap in time, on two threads, and the results
    still come back in stream order (each leaf gets its own merge)."""
    intervals = []
    launch = executor._Ahead.launch

    def slow_launch(self, chunk, arrays):
        start = time.perf_counter()
        time.sleep(0.15)
        result = launch(self, chunk, arrays)
        intervals.append((start, time.perf_counter(), threading.current_thread().name))
        return result

    monkeypatch.setattr(executor._Ahead, "launch", slow_launch)
    base, experts = models(seed=2)
    merged = jaxmerge.merge(jaxmerge.task_arithmetic(), base, experts, chunk_bytes=20_000,
                            compute_threads=2)
    intervals.sort()
    assert len(intervals) >= 4
    assert any(later[0] < earlier[1] for earlier, later in zip(intervals, intervals[1:]))
    assert len({name for *_, name in intervals}) == 2
    expected = jax.tree.map(lambda b, *e: b + sum(x - b for x in e), base, *experts)
    for a, b in zip(leaves(merged), leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_one_compute_thread_runs_on_the_caller(monkeypatch):
    names = set()
    launch = executor._Ahead.launch

    def recording(self, chunk, arrays):
        names.add(threading.current_thread().name)
        return launch(self, chunk, arrays)

    monkeypatch.setattr(executor._Ahead, "launch", recording)
    jaxmerge.merge(jaxmerge.task_arithmetic(), *models(), chunk_bytes=20_000,
                   compute_threads=1)
    assert names == {threading.current_thread().name}


def _recording_blas_threads(seen):
    """A merge whose compiled call makes a LAPACK call (an SVD), then records the BLAS
    libraries' thread counts from inside (a host callback)."""

    def record(singular_values):
        seen.append(_blas_threads())
        return np.zeros((), np.float32)

    def recording(x, ctx):
        singular = jnp.linalg.svd(x.reshape(x.shape[0], -1), compute_uv=False)
        return x.mean(axis=0) + jax.pure_callback(
            record, jax.ShapeDtypeStruct((), jnp.float32), singular, vmap_method="sequential")

    return jaxmerge.rowwise(recording)


def test_merge_calls_run_under_the_blas_limit():
    """Inside a compiled merge that uses LAPACK, the BLAS libraries have
    cores // compute_threads threads; after the merge, their old settings."""
    seen = []
    before = _blas_threads()
    jaxmerge.merge(_recording_blas_threads(seen), *models(), compute_threads=2)
    assert seen and _blas_threads() == before
    expected = cpu_threads.blas_threads_per_call(2)
    assert all(n == expected for threads in seen for n in threads.values())


def test_one_compute_thread_leaves_the_blas_settings_alone():
    """One chunk call at a time: the executor does not touch BLAS (a limit the caller
    set stays in force)."""
    seen = []
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        jaxmerge.merge(_recording_blas_threads(seen), *models(), compute_threads=1)
    assert seen and all(n == 1 for threads in seen for n in threads.values())


def test_merges_without_lapack_never_load_it():
    """TIES and task arithmetic never load scipy's LAPACK (jaxlib loads it when it first
    lowers a LAPACK call; ~0.1 s of a CLI run); TSV does, and then runs under the limit."""
    script = """
import sys
import numpy as np
import jaxmerge
rng = np.random.default_rng(0)
base = {"w": rng.normal(size=(32, 16)).astype(np.float32)}
experts = [{"w": base["w"] + rng.normal(size=(32, 16)).astype(np.float32)} for _ in range(3)]
for merge in (jaxmerge.ties(), jaxmerge.task_arithmetic(), jaxmerge.dare_ties()):
    jaxmerge.merge(merge, base, experts, compute_threads=2)
print("after ties:", "scipy.linalg.cython_lapack" in sys.modules)
jaxmerge.merge(jaxmerge.tsv(), base, experts, compute_threads=2)
print("after tsv:", "scipy.linalg.cython_lapack" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, env=subprocess_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert "after ties: False" in done.stdout and "after tsv: True" in done.stdout


def test_the_lapack_limit_waits_for_lapack(monkeypatch):
    """LapackThreadLimit sets nothing until the library is loaded, then limits once and
    restores at the end of its block."""
    entered = []

    @contextlib.contextmanager
    def fake_blas_threads(threads):
        entered.append(threads)
        yield
        entered.append("restored")

    monkeypatch.setattr(cpu_threads, "blas_threads", fake_blas_threads)
    loaded = [False]
    monkeypatch.setattr(cpu_threads, "lapack_loaded", lambda: loaded[0])
    with cpu_threads.LapackThreadLimit(3) as limit:
        limit.apply()
        assert entered == []
        loaded[0] = True
        limit.apply()
        limit.apply()
        assert entered == [3]
    assert entered == [3, "restored"]


def test_a_failing_call_on_a_compute_thread_reaches_the_caller():
    def broken(x, ctx):
        raise ValueError("leaf function failed")

    with pytest.raises(ValueError, match="leaf function failed"):
        jaxmerge.merge(jaxmerge.rowwise(broken), *models(), chunk_bytes=20_000,
                       compute_threads=2)


def test_compute_threads_must_be_positive():
    with pytest.raises(JaxmergeError, match="compute threads must be >= 1"):
        jaxmerge.merge(jaxmerge.task_arithmetic(), *models(), compute_threads=0)
