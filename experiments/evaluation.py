"""Test accuracy: greedy answers scored by each task's verifiable reward.

An answer is the greedy continuation of the prompt (:func:`experiments.sampling.decode`, equal
to :func:`jaxmerge.models.generate`) up to the first EOS or the task's decoding budget; its
score is :func:`experiments.tasks.reward` (math: last integer; tool: the first JSON object's
name and arguments; reasoning: exact match after whitespace normalisation). Accuracy is the
mean score over the split. With ``temperature`` the answers are samples instead (the reward
signal GRPO sees at the start of training).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments import sampling, tasks
from experiments.data import TaskData


def answers(graphdef, params, tokenizer, data: TaskData, split: str = "test", *,
            batch_size: int = 100, temperature: float | None = None, seed: int = 0
            ) -> list[str]:
    """The model's answers to every prompt of ``split`` (greedy unless ``temperature``)."""
    encoded = data.encoded[split]
    eos = int(tokenizer.eos_token_id)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
    texts: list[str] = []
    for start in range(0, len(encoded), batch_size):
        rows = np.arange(start, min(start + batch_size, len(encoded)))
        filled = np.concatenate([rows, np.full(batch_size - len(rows), rows[-1])])
        chunk = encoded.take(filled)
        tokens, _ = sampling.decode(
            graphdef, params, jnp.asarray(chunk.prompts), jnp.asarray(chunk.prompt_mask),
            jax.random.fold_in(jax.random.key(seed), start), temperature or 1.0,
            max_new_tokens=data.max_new_tokens, eos_id=eos, pad_id=pad,
            greedy=temperature is None)
        texts += sampling.answers(tokenizer, np.asarray(tokens)[:len(rows)], eos)
    return texts


def accuracy(graphdef, params, tokenizer, data: TaskData, split: str = "test",
             **options) -> float:
    """Mean reward of the model's answers on ``split`` (see :func:`answers` for options)."""
    predicted = answers(graphdef, params, tokenizer, data, split, **options)
    rewards = [tasks.reward(data.name, answer, reference)
               for answer, reference in zip(predicted, data.references(split), strict=True)]
    return float(np.mean(rewards))


def scores(graphdef, params, tokenizer, prepared: dict[str, TaskData], split: str = "test",
           **options) -> dict[str, float]:
    """task -> accuracy on ``split``, for every task."""
    return {name: accuracy(graphdef, params, tokenizer, data, split, **options)
            for name, data in prepared.items()}
