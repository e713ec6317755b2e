"""Decoding for training and evaluation: greedy or temperature sampling with a KV cache.

:func:`jaxmerge.models.generate` decodes greedily only; GRPO needs samples. This is the same
loop (prompt prefill into a preallocated :class:`jaxmerge.models.KVCache`, then one-token
decode steps in a ``lax.while_loop`` that stops once every row emitted EOS), over a plain
params pytree (so a training loop passes its current params without rebuilding modules), with
``token ~ Categorical(softmax(logits / temperature))`` drawn from a ``jax.random`` key, or the
argmax when ``greedy``. Greedy output equals :func:`jaxmerge.models.generate`'s.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmerge import models


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_id", "pad_id",
                                             "greedy"))
def decode(graphdef: nnx.GraphDef, params, prompts: jax.Array, prompt_mask: jax.Array,
           key: jax.Array, temperature: float = 1.0, *, max_new_tokens: int, eos_id: int,
           pad_id: int, greedy: bool = False) -> tuple[jax.Array, jax.Array]:
    """Continues left-padded prompts.

    Args:
      graphdef, params: the model (:func:`jaxmerge.models.split`).
      prompts: ``int32[batch, prompt_len]``, left-padded; ``prompt_mask`` 1 at real tokens.
      key: the sampling key (unused when ``greedy``).
      temperature: softmax temperature of the samples.
      max_new_tokens, eos_id, pad_id: stop after EOS or this many tokens; pad afterwards.
      greedy: argmax instead of sampling.

    Returns:
      ``(tokens, mask)``: ``int32[batch, max_new_tokens]`` continuations (``pad_id`` after
      EOS) and ``bool`` marking the generated tokens, EOS included.
    """
    model = models.merge(graphdef, params)
    batch, prompt_len = prompts.shape
    cache = models.init_cache(model.config, batch, prompt_len + max_new_tokens, model.dtype)
    positions = models.positions_from_mask(prompt_mask)
    logits, cache = model.decode(prompts, positions, prompt_mask.astype(bool), cache,
                                 last_only=True)

    def pick(logits, step):
        if greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        step_key = jax.random.fold_in(key, step)
        return jax.random.categorical(step_key, logits / temperature, axis=-1).astype(jnp.int32)

    first = pick(logits[:, -1], 0)
    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    mask = jnp.zeros((batch, max_new_tokens), bool).at[:, 0].set(True)
    finished = first == eos_id

    def not_done(carry):
        step, _, _, _, finished, _ = carry
        return (step < max_new_tokens) & ~jnp.all(finished)

    def step_fn(carry):
        step, tokens, mask, cache, finished, position = carry
        logits, cache = model.decode(tokens[:, step - 1][:, None], position[:, None],
                                     jnp.ones((batch, 1), bool), cache)
        token = jnp.where(finished, pad_id, pick(logits[:, -1], step))
        tokens = tokens.at[:, step].set(token)
        mask = mask.at[:, step].set(~finished)
        return step + 1, tokens, mask, cache, finished | (token == eos_id), position + 1

    carry = (jnp.int32(1), tokens, mask, cache, finished, positions[:, -1] + 1)
    _, tokens, mask, _, _, _ = jax.lax.while_loop(not_done, step_fn, carry)
    return tokens, mask


def answers(tokenizer, tokens, eos_id: int) -> list[str]:
    """Decoded continuations, cut at the first EOS, special tokens skipped."""
    texts = []
    for row in tokens.tolist():
        if eos_id in row:
            row = row[:row.index(eos_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts
