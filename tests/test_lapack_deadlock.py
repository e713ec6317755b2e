"""Regression: spectral merges must not deadlock XLA:CPU's thread pool (jaxlib 0.10.2).

A batched CPU LAPACK call (``lapack_sgesdd_ffi``, QR, eigh, ...) splits its batch
into tasks on the intra-op thread pool and blocks a pool thread until they finish;
two such calls running at once on a 2-thread pool (TSV's two polar factors) could
wait for each other forever (the stress script below hung in 4 of 12 runs on a
2-core machine with the old code, 0 of 24 with the fix).
:func:`jaxmerge.linalg.one_matrix_per_lapack_call` makes every LAPACK call on CPU
take a single matrix, which runs inline and never waits on the pool.
"""

import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from jaxmerge import linalg, spectral
from tests.subprocesses import subprocess_env


def lapack_calls(hlo: str) -> list[tuple[str, str]]:
    """(LAPACK kernel, operand shape) of every LAPACK custom call in an HLO module's text."""
    defined = dict(re.findall(r"(%[\w.\-]+) = (\w+\[[\d,]*\])", hlo))
    calls = re.findall(r'custom-call\((%[\w.\-]+).*?custom_call_target="(lapack_\w+)"', hlo)
    return [(target, defined[operand]) for operand, target in calls]


def lapack_operands(fn, *args) -> list[tuple[str, str]]:
    """:func:`lapack_calls` of ``fn``'s compiled CPU program."""
    return lapack_calls(jax.jit(fn).lower(*args).compile().as_text())


def _stacked():
    taus = jnp.ones((2, 3, 96, 32), jnp.float32)  # 2 leaves x 3 experts, as the executor stacks
    keys = jax.vmap(lambda i: jax.random.split(jax.random.key(i), 3))(jnp.arange(2))
    return taus, keys


@pytest.mark.parametrize("name,leaf_fn", [
    ("tsv", lambda taus, keys: spectral.tsv_merge(taus, keys)),
    ("iso_cts", lambda taus, keys: spectral.iso_cts_merge(taus, keys)),
    ("exact_svd", lambda taus, keys: linalg.exact_svd(taus)),
    ("singular_values", lambda taus, keys: linalg.singular_values(taus)),
])
def test_cpu_lapack_calls_take_one_matrix(name, leaf_fn):
    """Under the executor's vmap, every CPU LAPACK call gets a single matrix (no batch axis)."""
    calls = lapack_operands(jax.vmap(leaf_fn), *_stacked())
    assert calls, f"{name}: expected LAPACK calls in the program"
    batched = [(target, shape) for target, shape in calls if shape.count(",") != 1]
    assert not batched, f"{name}: batched CPU LAPACK calls can deadlock the pool: {batched}"


_STRESS = textwrap.dedent("""
    import os, faulthandler
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])  # XLA:CPU pool of 2 threads
    import jax, jax.numpy as jnp, numpy as np
    from jaxmerge import spectral
    faulthandler.dump_traceback_later({limit}, exit=True)  # a deadlock: exit 1 with stacks
    fn = jax.jit(jax.vmap(lambda taus, keys: spectral.tsv_merge(taus, keys)))
    taus = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3, 384, 128), np.float32))
    keys = jax.vmap(lambda i: jax.random.split(jax.random.key(i), 3))(jnp.arange(4))
    for _ in range({iterations}):
        np.asarray(fn(taus, keys))
    print("done")
""")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: no pool to deadlock")
def test_repeated_tsv_merge_does_not_deadlock():
    """The previously hanging pattern, repeated on a 2-thread pool (the old code hung in
    4 of 12 runs on a 2-core machine)."""
    script = _STRESS.format(limit=60, iterations=60)
    env = {**subprocess_env(), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0 and "done" in done.stdout, done.stderr[-3000:]


_EVERY_METHOD = textwrap.dedent("""
    import numpy as np
    import jaxmerge
    from jaxmerge import methods
    rng = np.random.default_rng(0)
    def params():  # two same-shape matrices (one vmapped group) and a vector
        return {"layers": [{"w": rng.standard_normal((96, 32), np.float32)} for _ in range(2)],
                "bias": rng.standard_normal(32, np.float32)}
    base, experts = params(), [params() for _ in range(3)]
    fishers = [{"layers": [{"w": np.ones((96, 32), np.float32)} for _ in range(2)],
                "bias": np.ones(32, np.float32)} for _ in experts]
    for name in methods.REGISTRY:
        merge = methods.build(name, {})
        if name in ("linear", "tsv"):
            merge = methods.calibrate(merge, "svc")
        chosen = experts[:2] if name == "slerp" else experts
        jaxmerge.merge(merge, base, chosen, extras={"fisher": fishers[:len(chosen)]}, key=0)
    print("merged")
""")


def test_no_method_compiles_a_batched_cpu_lapack_call(tmp_path):
    """Every registered method (and SVC) as the executor compiles it: the optimised CPU
    programs XLA dumps contain no LAPACK call on a stack of matrices."""
    env = {**subprocess_env(), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_dump_to={tmp_path} --xla_dump_hlo_as_text"}
    done = subprocess.run([sys.executable, "-c", _EVERY_METHOD], capture_output=True,
                          text=True, timeout=600, env=env)
    assert done.returncode == 0 and "merged" in done.stdout, done.stderr[-3000:]
    calls = []
    for path in tmp_path.glob("*after_optimizations.txt"):
        calls += [(path.name, target, shape) for target, shape in lapack_calls(path.read_text())]
    assert calls, "expected LAPACK calls in the spectral methods' programs"
    batched = [call for call in calls if call[2].count(",") != 1]
    assert not batched, f"batched CPU LAPACK calls can deadlock the pool: {batched[:5]}"


_CONCURRENT_STRESS = textwrap.dedent("""
    import os, faulthandler
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])  # XLA:CPU pool of 2 threads
    import numpy as np
    import jaxmerge
    from jaxmerge import methods
    faulthandler.dump_traceback_later({limit}, exit=True)  # a deadlock: exit 1 with stacks
    rng = np.random.default_rng(0)
    def params():  # 2 shape groups of 8 matrices: 1 leaf per chunk under the budget below
        return {{"layers": [{{"w": rng.standard_normal((192, 64), np.float32),
                              "v": rng.standard_normal((64, 192), np.float32)}}
                             for _ in range(8)]}}
    base, experts = params(), [params() for _ in range(3)]
    for name in {methods}:
        merge = methods.build(name, {{}})
        for _ in range({iterations}):
            jaxmerge.merge(merge, base, experts, key=0, chunk_bytes=200_000, compute_threads=2)
    print("done")
""")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: no pool to deadlock")
def test_concurrent_chunk_calls_do_not_deadlock():
    """Two chunk calls at once on a 2-thread pool (the CPU default), LAPACK-bound (TSV,
    ISO-CTS) and matmul-bound (ResMerge): 6 merges of 16 chunks each finish. 300 such
    merges on a 2-core machine, in three runs, all finished."""
    script = _CONCURRENT_STRESS.format(limit=90, iterations=2,
                                       methods=("tsv", "iso_cts", "resmerge"))
    env = {**subprocess_env(), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=150, env=env)
    assert done.returncode == 0 and "done" in done.stdout, done.stderr[-3000:]
