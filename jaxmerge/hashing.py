"""Counter-based hashing behind jaxmerge's randomness: a 32-bit mixer and key derivation.

The random pieces (DARE-family masks, the randomised SVD's sketch) take their bits from a
hash of (key, position) instead of threefry: about ten integer operations an entry, and
programs that compile several times faster. Keys are derived the same way: :func:`fold_in`
stands in for ``jax.random.fold_in``, whose unrolled threefry rounds (one derivation per
leaf, expert and random piece) were ~40 % of the XLA compile time of a DARE-TIES merge.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_GOLDEN = 0x9E3779B9  # 2³²/φ: spreads consecutive integers over the 32-bit range
_STEP = 0x85EBCA6B


def mix32(x):
    """A 32-bit integer finaliser with full avalanche (the 'lowbias32' constants)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def fold_in(key, data):
    """A new key from ``key`` and the integer ``data``, as ``jax.random.fold_in`` gives.

    The key's data words and ``data`` are absorbed one after another by :func:`mix32`,
    then each output word is squeezed from that state, so every output word depends on
    every input word and on ``data``. The result is a key of the same kind: a typed key
    of the same implementation, or raw key data (``jax.random.PRNGKey``) of the same
    shape, usable by any ``jax.random`` function.
    """
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    words = jax.random.key_data(key) if typed else key
    flat = words.reshape(-1).astype(jnp.uint32)
    state = mix32(jnp.asarray(data, dtype=jnp.uint32) ^ jnp.uint32(_GOLDEN))
    for i in range(flat.shape[0]):
        state = mix32(state ^ flat[i])
    out = []
    for _ in range(flat.shape[0]):
        state = mix32(state + jnp.uint32(_STEP))
        out.append(state)
    derived = jnp.stack(out).reshape(words.shape).astype(words.dtype)
    return jax.random.wrap_key_data(derived, impl=jax.random.key_impl(key)) if typed else derived
