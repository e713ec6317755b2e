"""Rotary position embeddings (Su et al. 2021, "RoFormer"), in the half-rotation layout of
Hugging Face Llama: the first and second halves of a head form the (x, y) pairs.

``inv_freq_i = theta^(-2i/d)`` for ``i < d/2``; a token at position ``p`` is rotated by the
angles ``p * inv_freq``. Scaled variants change ``inv_freq`` only:

- ``linear``: ``inv_freq / factor`` (position interpolation, Chen et al. 2023).
- ``llama3`` (Llama 3.1+): wavelengths ``2π/inv_freq`` above ``original_max / low_freq_factor``
  are divided by ``factor``, those below ``original_max / high_freq_factor`` are kept, and the
  ones between are interpolated with ``s = (original_max / wavelength - low) / (high - low)``:
  ``(1 - s) * inv_freq / factor + s * inv_freq``.

The frequencies are float32 numpy constants computed at trace time, as transformers computes
them in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.models.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """The ``head_dim // 2`` rotation frequencies (float32) of ``rope``."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / np.float32(rope.theta) ** exponents).astype(np.float32)
    if rope.rope_type == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32)
    if rope.rope_type == "llama3":
        return _llama3_scaling(inv_freq, rope)
    return inv_freq


def _llama3_scaling(inv_freq: np.ndarray, rope: RopeConfig) -> np.ndarray:
    """Llama 3.1 frequency-dependent scaling of ``inv_freq`` (see the module docstring)."""
    context = rope.original_max_position_embeddings
    low_freq_wavelength = context / rope.low_freq_factor
    high_freq_wavelength = context / rope.high_freq_factor
    wavelength = np.float32(2 * np.pi) / inv_freq
    scaled = np.where(wavelength > low_freq_wavelength, inv_freq / rope.factor, inv_freq)
    smooth = (context / wavelength - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rotate_half(x: jax.Array) -> jax.Array:
    """``[x1, x2] -> [-x2, x1]`` over the last axis (halves, not interleaved pairs)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates queries or keys by their positions.

    Args:
      x: ``[batch, seq, heads, head_dim]``.
      positions: ``[batch, seq]`` integer positions.
      inv_freq: ``[head_dim // 2]`` frequencies from :func:`inverse_frequencies`.

    Returns:
      ``x`` rotated, in ``x``'s dtype (cos and sin are computed in float32, then cast).
    """
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos = jnp.cos(angles).astype(x.dtype)
    sin = jnp.sin(angles).astype(x.dtype)
    return x * cos + rotate_half(x) * sin
