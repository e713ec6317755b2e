"""A preallocated key/value cache for incremental decoding.

Slot ``s`` of the cache holds the keys and values of the ``s``-th token fed to the model
(prompt padding included), so the causal and sliding-window masks compare slot indices, as
transformers compares cache indices. ``valid`` marks the slots that hold real tokens (left
padding is invalid); ``length`` is the number of slots written so far.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxmerge.models.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer keys and values, ``[batch, max_length, num_kv_heads, head_dim]`` each.

    Attributes:
      keys: one array per layer.
      values: one array per layer.
      valid: ``[batch, max_length]`` bool: the slot holds a real (non-padding) token.
      length: int32 scalar: slots ``[0, length)`` are written.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    valid: jax.Array
    length: jax.Array

    @property
    def max_length(self) -> int:
        """The number of slots."""
        return self.valid.shape[1]


def init_cache(config: ModelConfig, batch_size: int, max_length: int,
               dtype=jnp.float32) -> KVCache:
    """An empty cache of ``max_length`` slots (zeros, nothing valid, length 0)."""
    shape = (batch_size, max_length, config.num_kv_heads, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    return KVCache(
        keys=zeros,
        values=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        valid=jnp.zeros((batch_size, max_length), jnp.bool_),
        length=jnp.zeros((), jnp.int32),
    )
