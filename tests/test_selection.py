"""Exact order statistics inside one leaf (``ops.kth_smallest_abs``).

The selection sorts arrays of at most ``ops._SORT_SELECT_MAX`` entries; larger ones
bisect float32 bit patterns, inside a bracket taken from a hashed sample when they
have more than ``4 * ops._SAMPLE`` entries. The tests cover the three ways, and force
the bracket's fallback.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxmerge
from jaxmerge import ops
from tests import numpy_reference as ref

LARGE = (160, 128)  # 20480 entries > 4 * 4096: the sampled bracket is used
MEDIUM = (64, 100)  # 6400 entries: bisection over the whole range, no sample
SMALL = (7, 9)  # sorted


def expected_kth(x, rank):
    return np.sort(np.abs(np.asarray(x, np.float64)).ravel())[rank]


def kth(x, rank):
    return float(jax.jit(ops.kth_smallest_abs)(jnp.asarray(x), rank))


def sparse(rng, shape, fraction):
    return np.where(rng.random(shape) < fraction, rng.normal(size=shape), 0).astype(np.float32)


def distributions(shape, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.normal(scale=0.02, size=shape).astype(np.float32)
    bf16 = lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float32)  # noqa: E731
    return {
        "gaussian": rng.normal(scale=1e-3, size=shape).astype(np.float32),
        "bf16 difference (many ties)": bf16(base + rng.normal(scale=1e-3, size=shape)) - bf16(base),
        "98% zeros": sparse(rng, shape, 0.02),
        "70% zeros": sparse(rng, shape, 0.3),
        "with +inf": np.where(rng.random(shape) < 0.1, np.inf,
                              rng.normal(size=shape)).astype(np.float32),
        "denormals": (rng.normal(size=shape) * 1e-39).astype(np.float32),
        "all equal": np.full(shape, -0.25, np.float32),
        "heavy tail": (rng.standard_cauchy(size=shape) * 1e3).astype(np.float32),
    }


def test_the_sizes_take_the_three_ways():
    assert np.prod(SMALL) <= ops._SORT_SELECT_MAX < np.prod(MEDIUM) <= 4 * ops._SAMPLE
    assert np.prod(LARGE) > 4 * ops._SAMPLE


@pytest.mark.parametrize("shape", [SMALL, MEDIUM, LARGE], ids=["small", "medium", "large"])
@pytest.mark.parametrize("name", list(distributions(SMALL)))
def test_kth_smallest_abs_is_exact(shape, name):
    x = distributions(shape)[name]
    size = x.size
    for rank in sorted({0, 1, size // 2, ops.ties_rank(size, 0.2), size - 2, size - 1}):
        assert kth(x, rank) == expected_kth(x, rank), (name, rank)


def test_sample_positions_are_distinct_and_in_range():
    for size in (4 * ops._SAMPLE + 1, 20480, 1536 * 576, 49152 * 576, 2**31 - 1):
        positions = ops.sample_positions(size)
        assert len(np.unique(positions)) == ops._SAMPLE
        assert positions.min() >= 0 and positions.max() < size


def bracket(x, rank):
    bits = jax.lax.bitcast_convert_type(jnp.abs(jnp.asarray(x)), jnp.int32).reshape(1, -1)
    lo, hi = jax.jit(ops._bracket)(bits, jnp.int32(rank))
    return int(lo[0]), int(hi[0])


def as_bits(value):
    return int(np.float32(value).view(np.int32))


def test_bracket_is_narrow_on_dense_and_a_point_on_sparse_task_vectors():
    dense = distributions(LARGE)["gaussian"]
    rank = ops.ties_rank(dense.size, 0.2)
    lo, hi = bracket(dense, rank)
    answer = as_bits(expected_kth(dense, rank))
    assert lo <= answer <= hi
    assert hi - lo < 2**22  # ~8 bisection steps fewer than the full 31-bit range

    sparse = distributions(LARGE)["98% zeros"]
    assert bracket(sparse, ops.ties_rank(sparse.size, 0.2)) == (0, 0)  # no counting pass


@pytest.mark.parametrize("misled", ["low end", "high end"])
def test_a_misleading_sample_falls_back_to_the_full_range_and_stays_exact(misled):
    """Values planted at exactly the sampled positions push the sample's quantiles
    past the answer; the checked bracket must widen, and the result stay exact."""
    rng = np.random.default_rng(3)
    x = rng.uniform(1.0, 2.0, size=LARGE).astype(np.float32).ravel()
    planted = 1e6 if misled == "low end" else 1e-6
    x[ops.sample_positions(x.size)] = planted
    rank = x.size // 2
    lo, hi = bracket(x, rank)
    if misled == "low end":
        assert lo == 0  # the sample put lo above the answer; the check reset it
    else:
        assert hi == as_bits(np.inf)  # the sample put hi below the answer
    assert kth(x, rank) == expected_kth(x, rank)


def test_traced_ranks_under_vmap():
    stack = np.stack(list(distributions(LARGE, seed=5).values())[:4])
    ranks = np.array([0, 777, 10240, stack[0].size - 1])
    got = jax.jit(jax.vmap(ops.kth_smallest_abs))(jnp.asarray(stack), jnp.asarray(ranks))
    for i, rank in enumerate(ranks):
        assert float(got[i]) == expected_kth(stack[i], rank)


@pytest.mark.parametrize("shape", [SMALL, MEDIUM, LARGE], ids=["small", "medium", "large"])
def test_rows_bisect_together_and_each_stays_exact(shape):
    """One loop for all rows: a row resolved at once (mostly zeros) keeps its answer
    while the dense rows go on bisecting."""
    rows = np.stack(list(distributions(shape, seed=7).values()))
    for rank in sorted({0, ops.ties_rank(rows[0].size, 0.2), rows[0].size - 1}):
        got = np.asarray(jax.jit(ops.kth_smallest_abs_rows)(jnp.asarray(rows), rank))
        np.testing.assert_array_equal(got, [expected_kth(row, rank) for row in rows])


@pytest.mark.parametrize("sparsity", [0.0, 0.9], ids=["dense", "90% zeros"])
def test_ties_on_large_leaves_matches_the_reference(sparsity):
    """TIES trims per tensor with the in-leaf selection (three same-shape leaves,
    batched in one chunk) and equals the float64 reference exactly in its decisions."""
    rng = np.random.default_rng(11)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)]
    base = {n: (rng.integers(-256, 257, size=LARGE) / 256.0).astype(np.float32) for n in names}
    experts = []
    for _ in range(3):
        expert = {}
        for n in names:
            tau = rng.normal(scale=0.05, size=LARGE) * (rng.random(LARGE) >= sparsity)
            expert[n] = (base[n] + tau).astype(np.float32)
        experts.append(expert)
    merged = jaxmerge.merge(jaxmerge.ties(0.2), base, experts)
    for n in names:
        taus = np.stack([e[n].astype(np.float64) - base[n] for e in experts])
        expected = base[n] + ref.ties(taus, density=0.2, scale=1.0)
        np.testing.assert_allclose(np.asarray(merged[n]), expected, rtol=2e-5, atol=2e-6,
                                   err_msg=n)
