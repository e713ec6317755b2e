"""jaxmerge.hashing: the mixer and the counter-hash key derivation (fold_in)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmerge import hashing


def words(key) -> np.ndarray:
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    return np.asarray(jax.random.key_data(key) if typed else key)


@pytest.mark.parametrize("make", [
    lambda: jax.random.key(7),
    lambda: jax.random.key(7, impl="rbg"),
    lambda: jax.random.PRNGKey(7),  # raw key data
])
def test_fold_in_keeps_the_kind_of_key_and_is_deterministic(make):
    key = make()
    derived = hashing.fold_in(key, 3)
    assert derived.dtype == key.dtype and derived.shape == key.shape
    assert words(derived).shape == words(key).shape
    np.testing.assert_array_equal(words(derived), words(hashing.fold_in(make(), 3)))
    assert not np.array_equal(words(derived), words(key))
    jax.random.uniform(derived, (2,))  # usable by jax.random


def test_fold_in_under_jit_and_vmap_equals_one_by_one():
    key = jax.random.key(1)
    data = jnp.arange(5, dtype=jnp.uint32)
    batched = jax.jit(jax.vmap(lambda d: jax.random.key_data(hashing.fold_in(key, d))))(data)
    for i in range(5):
        np.testing.assert_array_equal(batched[i], words(hashing.fold_in(key, i)))
    top = np.uint32(0xFFFFFFFF)
    assert not np.array_equal(words(hashing.fold_in(key, top)), words(hashing.fold_in(key, 0)))


def test_every_input_bit_changes_about_half_the_output_bits():
    """Avalanche: flipping any one bit of the data or of either key word flips each
    output bit with probability ~1/2 (averaged over 256 random inputs)."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 2**32, 256, dtype=np.uint64).astype(np.uint32)
    key_words = rng.integers(0, 2**32, (256, 2), dtype=np.uint64).astype(np.uint32)

    @jax.jit
    def derive(key_words, data):
        return jax.vmap(hashing.fold_in)(key_words, data)

    base = np.asarray(derive(key_words, data))
    for bit in range(32):
        flip = np.uint32(1 << bit)
        for changed in (derive(key_words, data ^ flip),
                        derive(key_words ^ np.array([flip, 0], np.uint32), data),
                        derive(key_words ^ np.array([0, flip], np.uint32), data)):
            diff = np.unpackbits((np.asarray(changed) ^ base).view(np.uint8)).mean()
            assert 0.44 < diff < 0.56, (bit, diff)


def test_derived_keys_give_uniform_independent_streams():
    """The first uniform of 4096 keys folded from consecutive integers: uniform (a
    chi-square over 16 bins) and uncorrelated from one key to the next."""
    key = jax.random.key(0)
    keys = jax.vmap(lambda i: hashing.fold_in(key, i))(jnp.arange(4096))
    values = np.asarray(jax.vmap(lambda k: jax.random.uniform(k))(keys))
    counts = np.histogram(values, bins=16, range=(0, 1))[0]
    chi2 = ((counts - 256) ** 2 / 256).sum()
    assert chi2 < 37.7  # 99.9 % point of chi-square with 15 degrees of freedom
    assert abs(np.corrcoef(values[:-1], values[1:])[0, 1]) < 0.06


def test_mix32_is_a_bijection_on_a_sample():
    x = jnp.arange(1 << 16, dtype=jnp.uint32) * jnp.uint32(65537)
    assert len(np.unique(np.asarray(hashing.mix32(x)))) == 1 << 16
