"""Statistical tests of the random methods (DARE, DELLA) and their key derivation.

The masks cannot match another library's RNG bit for bit, so these check the
distribution: keep rate, unbiasedness of the rescale, independence across
experts and leaves, and that a leaf's mask depends only on (seed, name, expert).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmerge
from jaxmerge import ops
from jaxmerge.algebra import LeafContext
from jaxmerge.executor import leaf_keys
from jaxmerge.leaves import LeafInfo


def context(taus, name="model.layers.0.mlp.up_proj.weight", seed=0):
    keys = leaf_keys(jax.random.key(seed), name, taus.shape[0])
    info = LeafInfo.from_name(name, taus.shape[1:])
    return LeafContext(taus, jnp.zeros(taus.shape[1:]), keys, {}, {}, jnp.int32(0), info)


def test_dare_keep_rate_and_unbiased_rescale():
    p = 0.8
    draws = 400  # 400 "experts" holding the same τ: 400 independent masks in one call
    tau = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)
    taus = jnp.broadcast_to(tau, (draws, *tau.shape))
    sparse = np.asarray(jax.jit(lambda t: ops.dare(p).apply(t, context(t)))(taus))
    kept = sparse != 0
    n = kept.size
    # Keep rate 1 − p within 5 standard deviations.
    assert abs(kept.mean() - (1 - p)) < 5 * np.sqrt(p * (1 - p) / n)
    # Survivors are rescaled by exactly 1 / (1 − p).
    np.testing.assert_allclose(sparse[kept], np.broadcast_to(tau, sparse.shape)[kept] / (1 - p),
                               rtol=1e-6)
    # Unbiased: the mean over draws approaches τ (per-entry std of the mean ≈ |τ|·2/√400).
    mean = sparse.mean(axis=0)
    z = (mean - tau) / (np.abs(tau) * np.sqrt(p / (1 - p) / draws) + 1e-12)
    assert np.abs(z).max() < 5.5
    assert abs(z.mean()) < 5 / np.sqrt(z.size)


def test_dare_masks_independent_across_experts_and_leaves():
    shape = (128, 64)
    a = np.asarray(jax.jit(lambda k: ops.dare_masks(k, 0.5, shape))(
        leaf_keys(jax.random.key(0), "model.layers.0.mlp.up_proj.weight", 2)))
    b = np.asarray(jax.jit(lambda k: ops.dare_masks(k, 0.5, shape))(
        leaf_keys(jax.random.key(0), "model.layers.1.mlp.up_proj.weight", 2)))
    for x, y in [(a[0], a[1]), (a[0], b[0])]:
        agreement = np.mean(x == y)  # 0.5 for independent fair coins
        assert abs(agreement - 0.5) < 5 * 0.5 / np.sqrt(x.size)


def test_dare_extremes():
    taus = jnp.asarray(np.random.default_rng(1).normal(size=(2, 10, 10)), jnp.float32)
    zero = ops.dare(1.0).apply(taus, context(taus))
    assert np.all(np.asarray(zero) == 0) and np.all(np.isfinite(np.asarray(zero)))
    keep_all = ops.dare(0.0).apply(taus, context(taus))
    np.testing.assert_array_equal(np.asarray(keep_all), np.asarray(taus))


def test_della_keep_rate_follows_rank_and_is_unbiased():
    density, epsilon, draws = 0.4, 0.15, 300
    row = np.linspace(0.01, 1.0, 50, dtype=np.float32)[np.random.default_rng(2).permutation(50)]
    tau = np.tile(row, (8, 1))
    taus = jnp.broadcast_to(tau, (draws, *tau.shape))
    sparse = np.asarray(jax.jit(lambda t: ops.della_mask(density, epsilon).apply(t, context(t)))(
        taus))
    ranks = np.argsort(np.argsort(row))
    expected_p = density - epsilon + 2 * epsilon * ranks / (row.size - 1)
    observed_p = (sparse != 0).mean(axis=(0, 1))
    tolerance = 5 * np.sqrt(expected_p * (1 - expected_p) / (draws * 8))
    assert np.all(np.abs(observed_p - expected_p) < tolerance)
    mean = sparse.mean(axis=(0, 1))
    np.testing.assert_allclose(mean, row, rtol=0.15)


def test_masks_do_not_depend_on_leaf_order_or_batching():
    rng = np.random.default_rng(3)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(5)]
    base = {n: rng.normal(size=(16, 8)).astype(np.float32) for n in names}
    experts = [{n: v + rng.normal(size=v.shape).astype(np.float32) for n, v in base.items()}
               for _ in range(2)]
    method = jaxmerge.dare_ties(0.7)
    whole = jaxmerge.merge(method, base, experts, key=11)
    one_by_one = jaxmerge.merge(method, base, experts, key=11, chunk_bytes=1)
    reordered = jaxmerge.merge(method, dict(reversed(base.items())),
                               [dict(reversed(e.items())) for e in experts], key=11)
    for n in names:
        np.testing.assert_array_equal(np.asarray(whole[n]), np.asarray(one_by_one[n]))
        np.testing.assert_array_equal(np.asarray(whole[n]), np.asarray(reordered[n]))
    other_seed = jaxmerge.merge(method, base, experts, key=12)
    assert not np.array_equal(np.asarray(whole[names[0]]), np.asarray(other_seed[names[0]]))


def _mix32(x):
    x = np.asarray(x, np.uint64) & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _uniform_bits_reference(key, shape, row_offset):
    """uniform_bits in NumPy with exact 64-bit positions (int64 arithmetic)."""
    w0, w1 = (int(w) for w in np.asarray(jax.random.key_data(key)).astype(np.uint32))
    row_size = int(np.prod(shape[1:]))
    position = row_offset * row_size + np.arange(int(np.prod(shape)), dtype=np.uint64)
    high, low = position >> 32, position & 0xFFFFFFFF
    seed = _mix32(((high * 0x9E3779B9) & 0xFFFFFFFF) ^ w0) ^ w1
    return (_mix32(((low * 0x85EBCA6B) & 0xFFFFFFFF) ^ seed) >> 8).reshape(shape)


def test_uniform_bits_follow_the_flat_position_past_two_to_the_32():
    """Bits are a function of (key, flat position): the same for a leaf flattened or in
    2-D, and for a row block whose positions cross 2**32 (the 64-bit count)."""
    key = jax.random.key(7)
    bits = jax.jit(ops.uniform_bits, static_argnums=1)
    whole = np.asarray(bits(key, (20, 512)))
    np.testing.assert_array_equal(np.asarray(bits(key, (20 * 512,))).reshape(20, 512), whole)
    np.testing.assert_array_equal(whole, _uniform_bits_reference(key, (20, 512), 0))
    rows_to_the_edge = 2**32 // 4096 - 3  # rows of 4096 entries: this block crosses 2**32
    crossing = np.asarray(bits(key, (6, 4096), jnp.int32(rows_to_the_edge)))
    np.testing.assert_array_equal(crossing,
                                  _uniform_bits_reference(key, (6, 4096), rows_to_the_edge))
    far = 2**31 - 1  # the largest row offset: position ≈ 2**43
    np.testing.assert_array_equal(np.asarray(bits(key, (2, 4096), jnp.int32(far))),
                                  _uniform_bits_reference(key, (2, 4096), far))
    # Past 2**32 the bits do not repeat those of the first positions (no 32-bit wrap).
    first = _uniform_bits_reference(key, (3, 4096), 0)
    assert np.mean(crossing[3:] == first) < 0.01


def test_uniform_bits_are_uniform_and_uncorrelated_between_neighbours():
    bits = np.asarray(jax.jit(ops.uniform_bits, static_argnums=1)(jax.random.key(5), (256, 512)))
    assert bits.max() < 2**24
    # Uniform: chi-square over 64 equal bins (63 dof; 5-sigma bound ≈ 63 + 5·√126).
    counts = np.bincount(bits.ravel() >> 18, minlength=64)
    expected = bits.size / 64
    assert np.sum((counts - expected) ** 2 / expected) < 63 + 5 * np.sqrt(126)
    u = bits.astype(np.float64) / 2**24 - 0.5
    bound = 5 / np.sqrt(u.size)
    for a, b in [(u[:, 1:], u[:, :-1]), (u[1:], u[:-1])]:  # next column, next row
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < bound
    # A row block starting at row 100 draws exactly rows 100.. of the whole leaf.
    block = np.asarray(jax.jit(ops.uniform_bits, static_argnums=1)(jax.random.key(5), (20, 512),
                                                                    100))
    np.testing.assert_array_equal(block, bits[100:120])


def test_keys_are_derived_only_by_merges_that_use_them(monkeypatch):
    """``LeafContext.keys`` is derived where a piece reads it: task arithmetic's compiled
    calls never trace the derivation, DARE's do, and its masks are unchanged."""
    from jaxmerge import executor

    rng = np.random.default_rng(5)
    base = {"model.layers.0.mlp.up_proj.weight": rng.normal(size=(6, 8)).astype(np.float32)}
    experts = [{k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in base.items()}
               for _ in range(2)]
    expected = jaxmerge.merge(jaxmerge.dare_linear(0.5), base, experts, key=3)
    derivations = []
    real = executor.derive_keys
    monkeypatch.setattr(executor, "derive_keys",
                        lambda *args: (derivations.append(args[2]), real(*args))[1])
    jaxmerge.merge(jaxmerge.task_arithmetic(), base, experts, key=3)
    assert derivations == []
    again = jaxmerge.merge(jaxmerge.dare_linear(0.5), base, experts, key=3)
    assert derivations and set(derivations) == {2}
    for name in base:
        np.testing.assert_array_equal(np.asarray(again[name]), np.asarray(expected[name]))


def test_leaf_context_replace_keeps_the_other_fields():
    info = LeafInfo.from_name("model.layers.0.mlp.up_proj.weight", (2, 3))
    calls = []
    ctx = LeafContext(jnp.ones((2, 2, 3)), jnp.zeros((2, 3)), lambda: calls.append(1) or 7,
                      {}, {}, jnp.int32(0), info)
    other = ctx._replace(taus=jnp.zeros((2, 2, 3)))
    assert other.base is ctx.base and other.info is info and not calls
    assert other.keys == 7 and calls == [1]
    assert ctx._replace(keys=5).keys == 5
    with pytest.raises(TypeError):
        ctx._replace(nothing=1)
