"""Validation data for the Fisher and for evaluation: JSONL -> tokens -> padded batches.

Each line of the JSONL file is one example, either

- ``{"prompt": P, "response": R}``: P is context only, R is scored; or
- ``{"text": T}``: every token of T after the first is scored (plain language modelling).

Tokenisation (:func:`tokenize`) with the checkpoint's own tokenizer:

- prompt tokens: ``tokenizer(P)`` with the tokenizer's special tokens (e.g. a BOS), or, with
  ``chat_template=True``, the tokenizer's chat template applied to ``[{"role": "user",
  "content": P}]`` with ``add_generation_prompt=True`` (the template writes its own special
  tokens);
- response tokens: ``tokenizer(R, add_special_tokens=False)`` followed by the EOS token
  (``append_eos=True``, the default, when the tokenizer has one), so log p(y|x) includes
  stopping. P and R are tokenised separately and concatenated: put any separating space in
  R (``" Paris"``) or in P;
- text tokens: ``tokenizer(T)`` with special tokens; the first token is never scored.

Sequences longer than ``max_length`` lose their last tokens (right truncation), so a long
prompt can leave no scored token. The example still counts in the Fisher's average (its
log-likelihood is an empty sum, zero).

A batch (:func:`make_batches`) is a dict of NumPy arrays, right-padded to a bucket length:

- ``input_ids``: ``int32[B, T]``, padding ``pad_id``;
- ``attention_mask``: ``int32[B, T]``, 1 at real tokens;
- ``target_mask``: ``bool[B, T]``, True at the scored (response) tokens. Token ``t`` is
  predicted by the logits at position ``t - 1``, so ``target_mask[:, 0]`` is always False and
  log p(y|x) = Σ_{t≥1} target_mask[t] · log softmax(logits[t-1])[input_ids[t]];
- ``example_mask``: ``bool[B]``, False at filler rows that pad the last micro-batch to ``B``
  (a filler row has one real token and no target, so it adds nothing).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence

import numpy as np

from jaxmerge.errors import CheckpointError, ConfigError

TARGET_KEYS = ("target_mask", "example_mask")
"""Batch keys that describe the scoring, not the model input (never passed to ``apply_fn``)."""

MIN_BUCKET = 16
"""The shortest padded length; longer buckets double (16, 32, 64, ...)."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One validation example.

    Attributes:
      prompt: the context, not scored; None for a ``{"text"}`` line.
      response: the scored text (the whole text of a ``{"text"}`` line).
    """

    prompt: str | None
    response: str


@dataclasses.dataclass(frozen=True)
class Tokenized:
    """One tokenised example.

    Attributes:
      input_ids: the token ids, prompt then response (after truncation).
      first_target: index of the first scored token; tokens ``input_ids[first_target:]`` are
        scored, and ``first_target >= 1``.
      truncated: whether tokens were cut to fit ``max_length``.
    """

    input_ids: tuple[int, ...]
    first_target: int
    truncated: bool = False

    @property
    def num_targets(self) -> int:
        """The number of scored tokens."""
        return max(len(self.input_ids) - self.first_target, 0)


def _example(record, where: str) -> Example:
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object with \"prompt\" and \"response\" "
                          f"or \"text\", got {type(record).__name__}")
    has_pair = "prompt" in record or "response" in record
    if has_pair and "text" in record:
        raise ConfigError(f"{where}: has both \"text\" and \"prompt\"/\"response\"; give one")
    if not has_pair and "text" not in record:
        raise ConfigError(f"{where}: missing \"prompt\" and \"response\", or \"text\" "
                          f"(keys found: {sorted(record)})")
    keys = ("prompt", "response") if has_pair else ("text",)
    missing = [key for key in keys if key not in record]
    if missing:
        raise ConfigError(f"{where}: missing \"{missing[0]}\" (a line with \"prompt\" needs "
                          f"\"response\" and vice versa)")
    for key in keys:
        if not isinstance(record[key], str):
            raise ConfigError(f"{where}: \"{key}\" must be a string, got "
                              f"{type(record[key]).__name__}")
    if has_pair:
        return Example(prompt=record["prompt"], response=record["response"])
    return Example(prompt=None, response=record["text"])


def read_jsonl(path, max_examples: int | None = None) -> list[Example]:
    """Reads a JSONL file of ``{"prompt", "response"}`` or ``{"text"}`` objects.

    Blank lines are skipped; other keys are ignored.

    Args:
      path: the file.
      max_examples: keep the first ``max_examples`` examples (default all).

    Raises:
      ConfigError: a missing or empty file, or a bad line (invalid JSON, not an object,
        missing or non-string fields), naming the file and the line number.
    """
    path = pathlib.Path(path)
    if max_examples is not None and max_examples < 1:
        raise ConfigError(f"max_examples must be at least 1, got {max_examples}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"data file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read data file {path}: {error}") from error
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if max_examples is not None and len(examples) >= max_examples:
            break
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{where}: invalid JSON ({error.msg} at column "
                              f"{error.colno})") from None
        examples.append(_example(record, where))
    if not examples:
        raise ConfigError(f"data file {path} has no examples (one JSON object per line)")
    return examples


def load_tokenizer(model_dir):
    """The checkpoint's tokenizer, ``transformers.AutoTokenizer`` from local files only.

    Raises:
      CheckpointError: the directory has no loadable tokenizer.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise CheckpointError(f"{model_dir}: no usable tokenizer ({error})") from error


def _ids(encoded) -> list[int]:
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    return [int(token) for token in ids]


def prompt_ids(tokenizer, prompt: str, chat_template: bool = False) -> list[int]:
    """The prompt's tokens: with the tokenizer's special tokens, or its chat template.

    With ``chat_template`` the prompt is one user turn and the template's generation prompt
    (the assistant header) is appended.

    Raises:
      ConfigError: ``chat_template`` but the tokenizer has none.
    """
    if not chat_template:
        return _ids(tokenizer(prompt))
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("chat_template requested but the tokenizer has no chat template")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return _ids(tokenizer(text, add_special_tokens=False))


def tokenize_example(example: Example, tokenizer, *, max_length: int | None = 512,
                     chat_template: bool = False, append_eos: bool = True) -> Tokenized:
    """Tokenises one example (see the module docstring for the exact rule).

    Args:
      example: the example.
      tokenizer: a transformers tokenizer.
      max_length: keep at most this many tokens (right truncation); None: no limit.
      chat_template: wrap the prompt in the tokenizer's chat template (prompt examples only).
      append_eos: end a response with the tokenizer's EOS token (prompt examples only).
    """
    if example.prompt is None:
        ids = _ids(tokenizer(example.response))
        first = 1
    else:
        context = prompt_ids(tokenizer, example.prompt, chat_template)
        response = _ids(tokenizer(example.response, add_special_tokens=False))
        eos = getattr(tokenizer, "eos_token_id", None)
        if append_eos and eos is not None:
            response.append(int(eos))
        ids = context + response
        first = max(len(context), 1)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids = ids[:max_length]
    return Tokenized(tuple(ids), first, truncated)


def tokenize(examples: Sequence[Example], tokenizer, *, max_length: int | None = 512,
             chat_template: bool = False, append_eos: bool = True) -> list[Tokenized]:
    """:func:`tokenize_example` over a list of examples (defaults: ``max_length=512``, no chat
    template, EOS appended to responses)."""
    if max_length is not None and max_length < 2:
        raise ConfigError(f"max_length must be at least 2, got {max_length}")
    return [tokenize_example(example, tokenizer, max_length=max_length,
                             chat_template=chat_template, append_eos=append_eos)
            for example in examples]


def bucket_length(length: int, max_length: int | None = None) -> int:
    """The padded length of a batch whose longest sequence has ``length`` tokens.

    The smallest of 16, 32, 64, ... that holds ``length``, capped at ``max_length`` (itself a
    bucket), so a run compiles one program per bucket, not per batch.
    """
    bucket = MIN_BUCKET
    while bucket < length:
        bucket *= 2
    if max_length is not None:
        bucket = min(bucket, max(max_length, length))
    return bucket


def make_batches(examples: Sequence[Tokenized], batch_size: int, *,
                 max_length: int | None = None, pad_id: int = 0) -> list[dict[str, np.ndarray]]:
    """Consecutive micro-batches of ``batch_size`` examples, in order, right-padded.

    Each batch is padded to :func:`bucket_length` of its longest sequence; the last batch is
    filled up to ``batch_size`` rows with filler rows (``example_mask`` False). See the module
    docstring for the keys.

    Raises:
      ConfigError: ``batch_size < 1``, or an example with no tokens.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        if any(not example.input_ids for example in chunk):
            raise ConfigError("an example tokenised to no tokens at all")
        length = bucket_length(max(len(example.input_ids) for example in chunk), max_length)
        input_ids = np.full((batch_size, length), pad_id, np.int32)
        attention = np.zeros((batch_size, length), np.int32)
        target = np.zeros((batch_size, length), np.bool_)
        attention[len(chunk):, 0] = 1  # filler rows: one real token, nothing scored
        for row, example in enumerate(chunk):
            size = len(example.input_ids)
            input_ids[row, :size] = example.input_ids
            attention[row, :size] = 1
            target[row, example.first_target:size] = True
        example_mask = np.arange(batch_size) < len(chunk)
        batches.append({"input_ids": input_ids, "attention_mask": attention,
                        "target_mask": target, "example_mask": example_mask})
    return batches


def model_inputs(batch) -> dict:
    """The batch without its scoring keys (:data:`TARGET_KEYS`): what ``apply_fn`` sees."""
    return {key: value for key, value in batch.items() if key not in TARGET_KEYS}


def num_examples(batch) -> int:
    """The number of real (non-filler) rows of a batch."""
    if "example_mask" in batch:
        return int(np.sum(np.asarray(batch["example_mask"])))
    return int(np.shape(batch["input_ids"])[0])
