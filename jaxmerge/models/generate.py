"""Greedy decoding with a preallocated KV cache, one compiled program per shape.

The prompt (``[batch, prompt_len]``, left-padded) fills cache slots ``[0, prompt_len)``; each
new token then fills one slot inside a ``lax.while_loop`` whose body is a single one-token
decode step. A sequence that emits an end-of-sequence token is finished: later tokens are
``pad_token_id``. The loop stops early once every sequence is finished. The result matches
transformers' ``model.generate(..., do_sample=False)`` token for token, padded to
``prompt_len + max_new_tokens``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmerge.models.cache import init_cache
from jaxmerge.models.model import CausalLM, Params, merge, positions_from_mask, split


def generate(model: CausalLM, input_ids, attention_mask=None, max_new_tokens: int = 16,
             eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None) -> jax.Array:
    """Greedy continuation of a batch of prompts.

    Args:
      model: the model.
      input_ids: ``[batch, prompt_len]`` token ids, left-padded.
      attention_mask: ``[batch, prompt_len]``, 1 at real tokens, 0 at (left) padding;
        default all ones.
      max_new_tokens: tokens to generate per sequence.
      eos_token_id: one id or several; a sequence stops after emitting one. None: never stop.
      pad_token_id: written after a sequence stopped; default the first EOS id, else 0.

    Returns:
      ``[batch, prompt_len + max_new_tokens]`` int32: the prompts and their continuations.

    Raises:
      ValueError: right padding (the last prompt column must be a real token in every row),
        an empty prompt, or ``max_new_tokens < 1``.
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.bool_)
    attention_mask = jnp.asarray(attention_mask).astype(jnp.bool_)
    if input_ids.ndim != 2 or input_ids.shape[1] == 0 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids must be [batch, prompt_len > 0] and attention_mask the "
                         f"same shape, got {input_ids.shape} and {attention_mask.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not _is_left_padded(attention_mask):
        raise ValueError("generate needs left padding: the last prompt token of every row "
                         "must be real (attention_mask[:, -1] == 1)")
    eos_ids = _as_tuple(eos_token_id)
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    graphdef, params = split(model)
    return _generate(graphdef, params, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                     eos_ids=eos_ids, pad_id=int(pad_token_id))


def _is_left_padded(attention_mask: jax.Array) -> bool:
    """Whether every row ends in a real token (True when the mask is traced, unknown)."""
    try:
        return bool(np.all(np.asarray(attention_mask[:, -1])))
    except jax.errors.TracerArrayConversionError:
        return True


def _as_tuple(eos_token_id) -> tuple[int, ...]:
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, int | np.integer):
        return (int(eos_token_id),)
    return tuple(int(token) for token in eos_token_id)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_ids", "pad_id"))
def _generate(graphdef: nnx.GraphDef, params: Params, input_ids: jax.Array,
              attention_mask: jax.Array, *, max_new_tokens: int, eos_ids: tuple[int, ...],
              pad_id: int) -> jax.Array:
    model = merge(graphdef, params)
    batch, prompt_len = input_ids.shape
    cache = init_cache(model.config, batch, prompt_len + max_new_tokens, model.dtype)
    positions = positions_from_mask(attention_mask)
    logits, cache = model.decode(input_ids, positions, attention_mask, cache, last_only=True)
    is_eos = lambda tokens: jnp.isin(tokens, jnp.asarray(eos_ids or (-1,), jnp.int32))

    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    finished = is_eos(first)
    generated = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    next_position = positions[:, -1] + 1

    def not_done(carry):
        step, _, _, finished, _ = carry
        return (step < max_new_tokens) & ~jnp.all(finished)

    def decode_step(carry):
        step, generated, cache, finished, position = carry
        previous = generated[:, step - 1]
        logits, cache = model.decode(previous[:, None], position[:, None],
                                     jnp.ones((batch, 1), jnp.bool_), cache)
        token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        token = jnp.where(finished, pad_id, token)
        generated = generated.at[:, step].set(token)
        return step + 1, generated, cache, finished | is_eos(token), position + 1

    carry = (jnp.int32(1), generated, cache, finished, next_position)
    _, generated, _, _, _ = jax.lax.while_loop(not_done, decode_step, carry)
    return jnp.concatenate([input_ids, generated], axis=1)
