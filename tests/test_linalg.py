"""jaxmerge.linalg: top-k SVD accuracy across spectra, the exact fallback, batching, polar.

Bounds checked against float64 numpy.linalg.svd: when the randomised path is
accepted, the angle between computed and true top-k singular subspaces is at
most the tolerance (plus float32 rounding), and the rank-k reconstruction is
within the same relative error; when it cannot certify that, it falls back to
the exact SVD and says so (``used_exact``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxmerge import linalg

KEY = jax.random.PRNGKey(7)
FLOAT32_NOISE = 2e-5  # a few float32 ulps, relative to σ₁, after a handful of products


def with_spectrum(rng, shape, singular_values):
    """A float32 matrix with exactly these singular values (random singular vectors)."""
    m, n = shape
    r = len(singular_values)
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    return ((u * np.asarray(singular_values)) @ v.T).astype(np.float32)


def subspace_sine(a, b):
    """sin of the largest principal angle between the column spans of a and b (both m×k)."""
    qa, _ = np.linalg.qr(np.asarray(a, np.float64))
    qb, _ = np.linalg.qr(np.asarray(b, np.float64))
    cosines = np.linalg.svd(qa.T @ qb, compute_uv=False)
    return float(np.sqrt(max(0.0, 1.0 - np.min(cosines) ** 2)))


def exact_top(a, k):
    u, s, vt = np.linalg.svd(np.asarray(a, np.float64), full_matrices=False)
    return u[:, :k], s[:k], vt[:k]


def spectra(rng, shape):
    r = min(shape)
    decay = 10.0 * 0.5 ** np.arange(r)
    return {
        "geometric decay": decay,
        "spike over noise": np.concatenate([[8.0, 5.0], np.full(r - 2, 0.5)]),
        "rank-deficient": np.concatenate([[4.0, 2.0, 1.0], np.zeros(r - 3)]),
        "RL-like: head + flat residual": np.concatenate([[6.0], 0.6 + 0.01 * rng.random(r - 1)]),
    }


@pytest.mark.parametrize("shape", [(96, 64), (64, 160)])
@pytest.mark.parametrize("k", [1, 2])
def test_randomized_topk_within_tolerance_or_falls_back(shape, k):
    rng = np.random.default_rng(0)
    for label, singular_values in spectra(rng, shape).items():
        a = with_spectrum(rng, shape, singular_values)
        top = jax.jit(lambda x: linalg.topk_svd(x, k, KEY, svd="randomized"))(a)
        u, s, vt = exact_top(a, k)
        assert np.all(np.isfinite(top.u)) and np.all(np.isfinite(top.vt)), label
        np.testing.assert_allclose(np.asarray(top.s), s, rtol=1e-4, atol=1e-6, err_msg=label)
        bound = 1e-4 + FLOAT32_NOISE * s[0] / (s[k - 1] - (singular_values[k] if k < len(
            singular_values) else 0))
        assert subspace_sine(top.u, u) <= bound, label
        assert subspace_sine(np.asarray(top.vt).T, vt.T) <= bound, label
        reconstruction = np.asarray(top.reconstruct(), np.float64)
        error = np.linalg.norm(reconstruction - (u * s) @ vt) / np.linalg.norm(a)
        assert error <= 3 * bound, label
        if not bool(top.used_exact):
            assert 1 <= int(top.iterations) <= 16, label


def test_clear_gap_converges_in_few_iterations_without_fallback():
    rng = np.random.default_rng(1)
    a = with_spectrum(rng, (200, 120), np.concatenate([[10.0], np.full(119, 0.5)]))
    top = linalg.topk_svd(a, 1, KEY, svd="randomized")
    assert not bool(top.used_exact)
    assert int(top.iterations) <= 4


@pytest.mark.parametrize("label,singular_values", [
    ("near-degenerate top pair", np.concatenate([[5.0, 5.0 * (1 - 1e-7)], np.full(78, 1.0)])),
    ("flat noise", None),
])
def test_uncertifiable_spectra_fall_back_to_exact(label, singular_values):
    rng = np.random.default_rng(2)
    shape = (120, 80)
    if singular_values is None:
        a = rng.standard_normal(shape).astype(np.float32)
    else:
        a = with_spectrum(rng, shape, singular_values)
    top = linalg.topk_svd(a, 1, KEY, svd="randomized")
    assert bool(top.used_exact), label
    assert int(top.iterations) <= 3, label  # gives up early instead of spending the budget
    u, s, vt = linalg.exact_svd(jnp.asarray(a))
    np.testing.assert_array_equal(np.asarray(top.s), np.asarray(s[:1]))
    np.testing.assert_array_equal(np.asarray(top.reconstruct()),
                                  np.asarray(linalg.TopK(u[:, :1], s[:1], vt[:1], True,
                                                         0).reconstruct()))


def test_zero_matrix_gives_zero_head_and_no_nan():
    for svd in linalg.SVD_MODES:
        top = linalg.topk_svd(jnp.zeros((64, 48)), 2, KEY, svd=svd)
        assert np.all(np.asarray(top.s) == 0), svd
        assert np.all(np.isfinite(np.asarray(top.u))) and np.all(np.isfinite(np.asarray(top.vt)))
        assert np.all(np.asarray(top.reconstruct()) == 0), svd


def test_vmapped_and_nested_vmapped_equal_one_by_one():
    rng = np.random.default_rng(3)
    stack = np.stack([[with_spectrum(rng, (80, 48), np.concatenate(
        [[6.0 + i + j], np.full(47, 0.4)])) for j in range(3)] for i in range(4)])
    keys = jax.random.split(KEY, 12).reshape(4, 3, 2)

    def one(a, key):
        return linalg.topk_svd(a, 1, key, svd="randomized")

    nested = jax.jit(jax.vmap(jax.vmap(one)))(stack, keys)
    flat = jax.jit(jax.vmap(one))(stack.reshape(12, 80, 48), keys.reshape(12, 2))
    for i in range(4):
        for j in range(3):
            single = jax.jit(one)(stack[i, j], keys[i, j])
            for field in ("u", "s", "vt"):
                np.testing.assert_array_equal(getattr(nested, field)[i, j],
                                              getattr(single, field))
                np.testing.assert_array_equal(getattr(flat, field)[3 * i + j],
                                              getattr(single, field))


def test_any_key_agrees_with_exact_to_tolerance():
    rng = np.random.default_rng(4)
    a = with_spectrum(rng, (100, 70), np.concatenate([[9.0, 4.0], np.full(68, 0.3)]))
    heads = [np.asarray(linalg.topk_svd(a, 1, jax.random.PRNGKey(seed), svd="randomized")
                        .reconstruct()) for seed in range(5)]
    u, s, vt = exact_top(a, 1)
    for head in heads:
        assert np.linalg.norm(head - (u * s) @ vt) <= 1e-4 * np.linalg.norm(a)


def test_auto_mode_choice():
    assert linalg.uses_randomized(1, (576, 576))
    assert not linalg.uses_randomized(1, (24, 32))  # too small to pay
    assert not linalg.uses_randomized(192, (576, 576))  # TSV-sized ranks: exact
    assert linalg.uses_randomized(40, (576, 576), svd="randomized")
    assert not linalg.uses_randomized(1, (576, 576), svd="exact")
    with pytest.raises(ValueError):
        linalg.uses_randomized(1, (8, 8), svd="fast")
    with pytest.raises(ValueError):
        linalg.topk_svd(jnp.ones((4, 3)), 4)


def test_exact_svd_retries_with_qr_driver_when_divide_and_conquer_fails(monkeypatch):
    rng = np.random.default_rng(5)
    a = jnp.asarray(rng.standard_normal((3, 20, 12)).astype(np.float32))
    real_svd = lax.linalg.svd
    calls = []

    def failing_gesdd(x, *args, algorithm=None, **kwargs):
        calls.append(algorithm)
        u, s, vt = real_svd(x, *args, algorithm=algorithm, **kwargs)
        if algorithm is None:  # pretend divide-and-conquer did not converge
            return jnp.full_like(u, jnp.nan), jnp.full_like(s, jnp.nan), jnp.full_like(vt, jnp.nan)
        return u, s, vt

    monkeypatch.setattr(lax.linalg, "svd", failing_gesdd)
    u, s, vt = jax.jit(jax.vmap(linalg.exact_svd))(a)
    assert lax.linalg.SvdAlgorithm.QR in calls
    assert np.all(np.isfinite(np.asarray(u)))
    # Reconstructed in float64 NumPy: a jnp matmul at default precision would use TF32
    # on a GPU (~1e-3 error) and test the matmul, not the SVD.
    u, s, vt = (np.asarray(x, np.float64) for x in (u, s, vt))
    np.testing.assert_allclose((u * s[:, None, :]) @ vt, np.asarray(a), atol=1e-5)


def test_polar_gram_and_cosine():
    rng = np.random.default_rng(6)
    for shape in [(30, 12), (12, 30)]:
        a = rng.standard_normal(shape).astype(np.float32)
        p = np.asarray(linalg.polar(jnp.asarray(a)), np.float64)
        u, _, vt = np.linalg.svd(a.astype(np.float64), full_matrices=False)
        # float32 SVDs: LAPACK on a CPU is within ~1e-6, cuSOLVER on a GPU within ~3e-6.
        np.testing.assert_allclose(p, u @ vt, atol=5e-6)
        small = min(shape)
        gram = p.T @ p if shape[0] > shape[1] else p @ p.T
        np.testing.assert_allclose(gram, np.eye(small), atol=5e-6)
    x = rng.standard_normal((4, 5, 6)).astype(np.float32)
    flat = x.reshape(4, -1).astype(np.float64)
    np.testing.assert_allclose(np.asarray(linalg.gram(jnp.asarray(x))), flat @ flat.T, rtol=1e-5)
    batched = jax.vmap(linalg.gram)(jnp.stack([x, 2 * x]))
    np.testing.assert_allclose(np.asarray(batched[1]), 4 * flat @ flat.T, rtol=1e-5)
    expected = flat[0] @ flat[1] / (np.linalg.norm(flat[0]) * np.linalg.norm(flat[1]) + 1e-8)
    np.testing.assert_allclose(float(linalg.frobenius_cos(x[0], x[1])), expected, rtol=1e-5)
    assert float(linalg.frobenius_cos(np.zeros(3), np.ones(3))) == 0.0
