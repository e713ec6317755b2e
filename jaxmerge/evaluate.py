"""Evaluating a causal LM on a JSONL set: response log-likelihood and exact-match accuracy.

Examples are :class:`jaxmerge.fisher.data.Example` (or a JSONL path, read with
:func:`jaxmerge.fisher.data.read_jsonl`) and are tokenised exactly as for the Fisher
(:mod:`jaxmerge.fisher.data`: prompt with special tokens or the chat template, response + EOS).

- :func:`log_likelihood`: log p(y|x) = Σ_{response tokens} log p(token | previous tokens) per
  example; its mean over examples and per response token.
- :func:`exact_match`: greedy decoding (:func:`jaxmerge.models.generate`) of each prompt; an
  answer is correct when ``normalize(generated) == normalize(response)``, ``normalize`` being
  :meth:`str.strip` (leading/trailing whitespace only; case and inner spacing count). The
  generated text is decoded up to the first EOS, skipping special tokens.

Example::

  model = jaxmerge.models.load_model("merged")
  tokenizer = transformers.AutoTokenizer.from_pretrained("merged")
  print(log_likelihood(model, tokenizer, "val.jsonl").mean)
  print(exact_match(model, tokenizer, "val.jsonl", max_new_tokens=16).accuracy)
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Sequence

import jax
import numpy as np

from jaxmerge.errors import ConfigError
from jaxmerge.fisher import data as data_lib
from jaxmerge.fisher.estimate import response_log_likelihood


@dataclasses.dataclass(frozen=True)
class LogLikelihood:
    """Response log-likelihoods (natural log).

    Attributes:
      mean: mean over examples of log p(y|x).
      per_token: Σ log p(y|x) / Σ response tokens (minus the per-token cross-entropy).
      per_example: ``float64[N]`` log p(y_i|x_i).
      num_tokens: ``int[N]`` scored tokens per example.
    """

    mean: float
    per_token: float
    per_example: np.ndarray
    num_tokens: np.ndarray


@dataclasses.dataclass(frozen=True)
class ExactMatch:
    """Exact-match accuracy of greedy answers.

    Attributes:
      accuracy: the fraction of correct answers.
      correct: per example, whether the answer matched.
      predictions: per example, the decoded greedy answer (before normalisation).
      references: per example, the expected response.
    """

    accuracy: float
    correct: list[bool]
    predictions: list[str]
    references: list[str]


def normalize(text: str) -> str:
    """The exact-match normalisation: leading and trailing whitespace removed."""
    return text.strip()


def _examples(examples) -> list[data_lib.Example]:
    if isinstance(examples, str | pathlib.Path):
        return data_lib.read_jsonl(examples)
    examples = list(examples)
    if not examples:
        raise ConfigError("no examples to evaluate")
    return examples


def _apply_and_params(model, params):
    """``(apply_fn, params)`` of a :class:`jaxmerge.models.CausalLM` or an ``apply_fn``."""
    from jaxmerge import models

    if isinstance(model, models.CausalLM):
        apply_fn, own = models.functional(model)
        return apply_fn, own if params is None else params
    if not callable(model) or params is None:
        raise ConfigError("log_likelihood needs a CausalLM, or an apply_fn and its params")
    return model, params


@functools.partial(jax.jit, static_argnums=0)
def _batch_log_likelihood(apply_fn, params, batch):
    logits = apply_fn(params, data_lib.model_inputs(batch))
    return response_log_likelihood(logits, batch["input_ids"], batch["target_mask"])


def log_likelihood(model, tokenizer, examples, *, params=None, batch_size: int = 8,
                   max_length: int | None = 512, chat_template: bool = False,
                   append_eos: bool = True) -> LogLikelihood:
    """Response log-likelihoods of ``examples`` under a model.

    Args:
      model: a :class:`jaxmerge.models.CausalLM`, or any ``apply_fn(params, batch) -> logits``
        (then ``params`` is required).
      tokenizer: a transformers tokenizer.
      examples: a JSONL path or a list of :class:`jaxmerge.fisher.data.Example`.
      params: the parameters (default the model's own).
      batch_size: examples per forward pass (default 8).
      max_length: most tokens per example (default 512, right truncation; None: no limit).
      chat_template: wrap prompts in the tokenizer's chat template (default False).
      append_eos: end responses with EOS, scored (default True).

    Returns:
      A :class:`LogLikelihood`.
    """
    apply_fn, params = _apply_and_params(model, params)
    tokenized = data_lib.tokenize(_examples(examples), tokenizer, max_length=max_length,
                                  chat_template=chat_template, append_eos=append_eos)
    values = []
    for batch in data_lib.make_batches(tokenized, batch_size, max_length=max_length):
        rows = data_lib.num_examples(batch)
        values.append(np.asarray(_batch_log_likelihood(apply_fn, params, batch))[:rows])
    per_example = np.concatenate(values).astype(np.float64)
    num_tokens = np.asarray([example.num_targets for example in tokenized])
    return LogLikelihood(mean=float(per_example.mean()),
                         per_token=float(per_example.sum() / max(num_tokens.sum(), 1)),
                         per_example=per_example, num_tokens=num_tokens)


def _eos_ids(tokenizer, eos_token_id) -> tuple[int, ...]:
    if eos_token_id is None:
        eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, int | np.integer):
        return (int(eos_token_id),)
    return tuple(int(token) for token in eos_token_id)


def _left_padded(prompts: Sequence[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    length = data_lib.bucket_length(max(len(prompt) for prompt in prompts))
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, length - len(prompt):] = prompt
            mask[row, length - len(prompt):] = 1
    return ids, mask


def _answer(tokenizer, tokens: np.ndarray, eos_ids: tuple[int, ...]) -> str:
    tokens = [int(token) for token in tokens]
    for index, token in enumerate(tokens):
        if token in eos_ids:
            tokens = tokens[:index]
            break
    return tokenizer.decode(tokens, skip_special_tokens=True)


def exact_match(model, tokenizer, examples, *, max_new_tokens: int = 32, batch_size: int = 8,
                chat_template: bool = False, eos_token_id=None) -> ExactMatch:
    """Exact-match accuracy of the model's greedy answers to the prompts.

    Args:
      model: a :class:`jaxmerge.models.CausalLM`.
      tokenizer: a transformers tokenizer.
      examples: a JSONL path or a list of :class:`jaxmerge.fisher.data.Example`, all with a
        prompt (``{"prompt", "response"}`` lines).
      max_new_tokens: the most tokens generated per answer (default 32); an answer stops at
        EOS.
      batch_size: prompts decoded together (default 8; left-padded to a bucket length).
      chat_template: wrap prompts in the tokenizer's chat template (default False).
      eos_token_id: one id or several that end an answer (default the tokenizer's EOS).

    Returns:
      An :class:`ExactMatch`; ``normalize(prediction) == normalize(reference)`` decides.

    Raises:
      ConfigError: a ``{"text"}`` example (no prompt), or an empty prompt.
    """
    from jaxmerge import models

    examples = _examples(examples)
    if any(example.prompt is None for example in examples):
        raise ConfigError("exact_match needs {\"prompt\", \"response\"} examples, not "
                          "{\"text\"}")
    eos_ids = _eos_ids(tokenizer, eos_token_id)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts = [data_lib.prompt_ids(tokenizer, example.prompt, chat_template)
               for example in examples]
    if any(not prompt for prompt in prompts):
        raise ConfigError("exact_match needs a non-empty prompt for every example")
    predictions = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        # Fill the last batch up to batch_size with copies, so every batch has one shape.
        filled = chunk + [chunk[-1]] * (batch_size - len(chunk))
        ids, mask = _left_padded(filled, int(pad_id))
        tokens = np.asarray(models.generate(model, ids, mask, max_new_tokens,
                                            eos_token_id=eos_ids or None,
                                            pad_token_id=int(pad_id)))
        for row in range(len(chunk)):
            predictions.append(_answer(tokenizer, tokens[row, ids.shape[1]:], eos_ids))
    references = [example.response for example in examples]
    correct = [normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True)]
    return ExactMatch(accuracy=float(np.mean(correct)), correct=correct,
                      predictions=predictions, references=references)
