"""A decoder-only causal LM (Llama, Mistral, Qwen2, Qwen3) as a Flax NNX module, and its
functional forms.

Two ways to run it:

- the module: ``logits = model(input_ids, attention_mask)`` (eager, or under ``nnx.jit``);
- pure functions over a plain pytree of parameters: ``graphdef, params = split(model)`` then
  ``logits = apply(graphdef, params, batch)``, or ``apply_fn, params = functional(model)`` and
  ``apply_fn(params, batch)``. ``params`` is a nested dict of arrays (layers keyed by int), so
  ``jax.grad``, ``jax.jit`` and ``jax.tree.map`` act on it directly. :func:`forward` is the
  jitted entry point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmerge.models.cache import KVCache
from jaxmerge.models.config import ModelConfig
from jaxmerge.models.layers import DecoderLayer, RMSNorm

Params = dict[str, Any]
"""A model's parameters as a nested dict of arrays (``nnx.to_pure_dict`` of its state)."""


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """RoPE positions from a padding mask, as transformers' ``generate`` derives them.

    ``cumsum(mask) - 1`` at real tokens and 0 at padding, so a left-padded sequence starts at
    position 0 and a right-padded one is numbered as if unpadded.
    """
    mask = attention_mask.astype(jnp.int32)
    return jnp.where(mask > 0, jnp.cumsum(mask, axis=-1) - 1, 0)


class CausalLM(nnx.Module):
    """Token embedding, ``num_layers`` pre-norm decoder layers, final RMSNorm, output head.

    With ``tie_word_embeddings`` there is no ``lm_head``: logits are ``h @ embed_tokensᵀ``.

    Args:
      config: the architecture.
      dtype: the computation dtype (default float32).
      param_dtype: the parameter dtype (default float32).
      rngs: initialisers' random streams (``nnx.Rngs(0)``); weights are usually loaded over
        them, see :func:`jaxmerge.models.load_model`.
    """

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype,
                                      param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([
            DecoderLayer(config, layer, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for layer in range(config.num_layers)
        ])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype,
                            param_dtype=param_dtype)
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False,
                                      dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """Next-token logits for every position.

        Args:
          input_ids: ``[batch, seq]`` int token ids.
          attention_mask: ``[batch, seq]``, 1 at real tokens and 0 at padding (left or right);
            default all ones. Padding is never attended to; logits at padding are meaningless.
          positions: ``[batch, seq]`` RoPE positions; default :func:`positions_from_mask`.

        Returns:
          ``[batch, seq, vocab]`` float32 logits.
        """
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.bool_)
        if positions is None:
            positions = positions_from_mask(attention_mask)
        with self._matmul_precision():
            hidden = self.embed_tokens(input_ids)
            key_valid = attention_mask.astype(jnp.bool_)
            for layer in self.layers:
                hidden, _ = layer(hidden, positions, key_valid)
            return self.logits(hidden)

    def _matmul_precision(self):
        """Full float32 matrix products for a float32 model, on every backend.

        JAX's default lets a GPU run float32 products in TF32 (logits ~1e-2 off
        transformers, whose float32 default is exact); a TPU in bfloat16 passes. A CPU
        computes float32 products exactly either way. bf16 models keep the default.
        """
        if jnp.dtype(self.dtype) == jnp.float32:
            return jax.default_matmul_precision("highest")
        return contextlib.nullcontext()

    def logits(self, hidden: jax.Array) -> jax.Array:
        """The output head on the final layer's hidden states: float32 logits."""
        hidden = self.norm(hidden)
        if self.config.tie_word_embeddings:
            table = self.embed_tokens.embedding[...].astype(self.dtype)
            logits = hidden @ table.T
        else:
            logits = self.lm_head(hidden)
        return logits.astype(jnp.float32)

    def decode(self, input_ids: jax.Array, positions: jax.Array, token_valid: jax.Array,
               cache: KVCache, last_only: bool = False) -> tuple[jax.Array, KVCache]:
        """Feeds ``input_ids`` into the next ``seq`` cache slots and returns their logits.

        Args:
          input_ids: ``[batch, seq]``.
          positions: ``[batch, seq]`` RoPE positions.
          token_valid: ``[batch, seq]`` bool, False at padding.
          cache: the cache, with room for ``seq`` more slots.
          last_only: return the logits of the last slot only (``[batch, 1, vocab]``).

        Returns:
          float32 logits and the updated cache.
        """
        seq = input_ids.shape[1]
        valid = jax.lax.dynamic_update_slice(cache.valid, token_valid.astype(jnp.bool_),
                                             (0, cache.length))
        with self._matmul_precision():
            hidden = self.embed_tokens(input_ids)
            keys, values = [], []
            for layer, layer_keys, layer_values in zip(self.layers, cache.keys, cache.values,
                                                       strict=True):
                hidden, (new_keys, new_values) = layer(hidden, positions, valid,
                                                       (layer_keys, layer_values), cache.length)
                keys.append(new_keys)
                values.append(new_values)
            if last_only:
                hidden = hidden[:, -1:]
            new_cache = KVCache(keys=tuple(keys), values=tuple(values), valid=valid,
                                length=cache.length + seq)
            return self.logits(hidden), new_cache


def split(model: CausalLM) -> tuple[nnx.GraphDef, Params]:
    """The model's static structure and its parameters as a nested dict of arrays."""
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def merge(graphdef: nnx.GraphDef, params: Params) -> CausalLM:
    """Rebuilds the module from :func:`split`'s output (arrays are shared, not copied)."""
    return nnx.merge(graphdef, params)


def apply(graphdef: nnx.GraphDef, params: Params, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Pure forward pass: ``batch`` has ``input_ids`` and optionally ``attention_mask`` and
    ``positions``; returns float32 logits ``[batch, seq, vocab]``. Differentiable in
    ``params``."""
    model = merge(graphdef, params)
    return model(batch["input_ids"], batch.get("attention_mask"), batch.get("positions"))


@dataclasses.dataclass(frozen=True)
class ApplyFn:
    """:func:`apply` bound to one graph definition: ``apply_fn(params, batch) -> logits``.

    Equal (and hashing equal) for models of the same architecture, so jitted code that takes
    it as a static argument compiles once for all of them (e.g. one Fisher per expert).
    """

    graphdef: Any

    def __call__(self, params: Params, batch: Mapping[str, jax.Array]) -> jax.Array:
        return apply(self.graphdef, params, batch)


def functional(model: CausalLM) -> tuple[Callable[[Params, Mapping[str, jax.Array]], jax.Array],
                                         Params]:
    """``(apply_fn, params)`` with ``apply_fn(params, batch) -> logits`` a pure function.

    Example (gradients of a next-token loss)::

      apply_fn, params = functional(model)
      grads = jax.grad(lambda p: loss(apply_fn(p, batch), batch))(params)
    """
    graphdef, params = split(model)
    return ApplyFn(graphdef), params


@functools.partial(jax.jit, static_argnums=0)
def _jitted_apply(graphdef, params, batch):
    return apply(graphdef, params, batch)


def forward(model: CausalLM, input_ids, attention_mask=None, positions=None) -> jax.Array:
    """Jit-compiled ``model(input_ids, attention_mask, positions)`` (one compile per shape)."""
    graphdef, params = split(model)
    batch = {"input_ids": jnp.asarray(input_ids)}
    if attention_mask is not None:
        batch["attention_mask"] = jnp.asarray(attention_mask)
    if positions is not None:
        batch["positions"] = jnp.asarray(positions)
    return _jitted_apply(graphdef, params, batch)
