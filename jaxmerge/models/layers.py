"""The building blocks of a Llama-style decoder layer, as Flax NNX modules.

A layer is pre-norm: ``x + attention(rms_norm(x))`` then ``x + mlp(rms_norm(x))`` (Touvron et
al. 2023, "LLaMA"). Attention is grouped-query (Ainslie et al. 2023, "GQA"): query head ``h``
reads key/value head ``h // (num_heads // num_kv_heads)``, as transformers' ``repeat_kv``.
The MLP is SwiGLU (Shazeer 2020): ``down(silu(gate(x)) * up(x))``.

Every module takes ``dtype`` (the computation dtype) and ``param_dtype`` (the storage dtype).
The numerics follow transformers' eager PyTorch code so that float32 logits agree to ~1e-5:
RMSNorm normalises in float32, RoPE cos/sin are float32 cast to ``dtype``, and the softmax
runs in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmerge.models.config import ModelConfig
from jaxmerge.models.rope import apply_rope, inverse_frequencies

KeyValue = tuple[jax.Array, jax.Array]


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019): ``scale * x / sqrt(mean(x²) + eps)``.

    The normalisation runs in float32 and is cast back to the input dtype before the scale is
    applied, as in transformers' ``LlamaRMSNorm``. ``scale`` starts at ones.
    """

    def __init__(self, features: int, *, eps: float, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(self.dtype)
        return self.scale[...].astype(self.dtype) * normed


def attention_mask(query_slots: jax.Array, key_valid: jax.Array,
                   sliding_window: int | None = None) -> jax.Array:
    """Which keys each query may attend to: ``[batch, queries, keys]`` bool.

    Key ``s`` is visible from query slot ``q`` when ``s <= q`` (causal), the slot holds a real
    token (``key_valid``), and, with a sliding window ``w``, when ``s > q - w``.

    Args:
      query_slots: ``[queries]`` slot index of each query.
      key_valid: ``[batch, keys]`` bool, False at padding.
      sliding_window: the window, or None for full causal attention.
    """
    key_slots = jnp.arange(key_valid.shape[1])
    visible = key_slots[None, :] <= query_slots[:, None]
    if sliding_window is not None:
        visible &= key_slots[None, :] > query_slots[:, None] - sliding_window
    return visible[None, :, :] & key_valid[:, None, :]


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          mask: jax.Array) -> jax.Array:
    """Grouped-query softmax attention, ``softmax(q kᵀ / sqrt(head_dim)) v``.

    Args:
      query: ``[batch, queries, num_heads, head_dim]``.
      key: ``[batch, keys, num_kv_heads, head_dim]``.
      value: like ``key``.
      mask: ``[batch, queries, keys]`` bool (True = attend). A query that sees no key gets
        the mean of the values (finite, no NaN).

    Returns:
      ``[batch, queries, num_heads, head_dim]``.
    """
    batch, queries, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    grouped = query.reshape(batch, queries, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", grouped, key) * (head_dim ** -0.5)
    scores = jnp.where(mask[:, None, None], scores.astype(jnp.float32),
                       jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", weights, value)
    return out.reshape(batch, queries, num_heads, head_dim)


class Attention(nnx.Module):
    """Multi-head self-attention with RoPE, GQA, optional Qwen3 q/k norms and a KV cache."""

    def __init__(self, config: ModelConfig, layer: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.sliding_window = config.sliding_windows[layer]
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        width = config.hidden_size
        self.q_proj = nnx.Linear(width, config.num_heads * config.head_dim,
                                 use_bias=config.qkv_bias, **kwargs)
        self.k_proj = nnx.Linear(width, config.num_kv_heads * config.head_dim,
                                 use_bias=config.qkv_bias, **kwargs)
        self.v_proj = nnx.Linear(width, config.num_kv_heads * config.head_dim,
                                 use_bias=config.qkv_bias, **kwargs)
        self.o_proj = nnx.Linear(config.num_heads * config.head_dim, width,
                                 use_bias=config.o_bias, **kwargs)
        if config.qk_norm:
            norm = dict(eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
            self.q_norm = RMSNorm(config.head_dim, **norm)
            self.k_norm = RMSNorm(config.head_dim, **norm)

    def __call__(self, x: jax.Array, positions: jax.Array, key_valid: jax.Array,
                 cache: KeyValue | None = None,
                 cache_length: jax.Array | int = 0) -> tuple[jax.Array, KeyValue]:
        """Attends from ``x`` to itself, or to the cache once ``x``'s keys are written into it.

        Args:
          x: ``[batch, seq, hidden]``.
          positions: ``[batch, seq]`` RoPE positions.
          key_valid: ``[batch, keys]`` bool: ``keys = seq`` without a cache, else the cache's
            slot count (with ``x``'s slots already marked).
          cache: this layer's ``(keys, values)``, ``[batch, max_length, kv_heads, head_dim]``.
          cache_length: slots already written; ``x`` goes to slots ``[cache_length, +seq)``.

        Returns:
          ``[batch, seq, hidden]`` and the ``(keys, values)`` attended to (the updated cache).
        """
        config = self.config
        batch, seq, _ = x.shape
        query = self.q_proj(x).reshape(batch, seq, config.num_heads, config.head_dim)
        key = self.k_proj(x).reshape(batch, seq, config.num_kv_heads, config.head_dim)
        value = self.v_proj(x).reshape(batch, seq, config.num_kv_heads, config.head_dim)
        if config.qk_norm:
            query, key = self.q_norm(query), self.k_norm(key)
        inv_freq = inverse_frequencies(config.rope, config.head_dim)
        query = apply_rope(query, positions, inv_freq)
        key = apply_rope(key, positions, inv_freq)
        if cache is not None:
            start = (0, cache_length, 0, 0)
            key = jax.lax.dynamic_update_slice(cache[0], key.astype(cache[0].dtype), start)
            value = jax.lax.dynamic_update_slice(cache[1], value.astype(cache[1].dtype), start)
        query_slots = cache_length + jnp.arange(seq)
        mask = attention_mask(query_slots, key_valid, self.sliding_window)
        out = dot_product_attention(query, key.astype(query.dtype), value.astype(query.dtype),
                                    mask)
        return self.o_proj(out.reshape(batch, seq, -1)), (key, value)


class MLP(nnx.Module):
    """SwiGLU feed-forward: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kwargs = dict(use_bias=config.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = nnx.Linear(config.hidden_size, config.intermediate_size, **kwargs)
        self.up_proj = nnx.Linear(config.hidden_size, config.intermediate_size, **kwargs)
        self.down_proj = nnx.Linear(config.intermediate_size, config.hidden_size, **kwargs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """``x + self_attn(input_layernorm(x))``, then ``x + mlp(post_attention_layernorm(x))``."""

    def __init__(self, config: ModelConfig, layer: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        norm = dict(eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, **norm)
        self.self_attn = Attention(config, layer, dtype=dtype, param_dtype=param_dtype,
                                   rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)
        self.mlp = MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, key_valid: jax.Array,
                 cache: KeyValue | None = None,
                 cache_length: jax.Array | int = 0) -> tuple[jax.Array, KeyValue]:
        """See :meth:`Attention.__call__`; returns the new residual stream and keys/values."""
        attended, key_value = self.self_attn(self.input_layernorm(x), positions, key_valid,
                                             cache, cache_length)
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), key_value
