"""The diagonal Fisher information of a causal LM at its own parameters (METHODS.md §6–§7).

Definition, over a validation set D of N examples (x = prompt, y = response)::

    F_j = E_{(x,y)∈D}[(∂ log p(y|x; θ) / ∂θ_j)²],
    log p(y|x; θ) = Σ_{t ∈ response} log softmax(logits_{t-1})[token_t],

i.e. next-token log-probabilities summed over the response tokens only; prompt tokens and
padding contribute nothing (see :mod:`jaxmerge.fisher.data` for which tokens are scored).

Modes (``mode=``):

- ``per_example`` (default, the definition): F = (1/N) Σ_i g_i², g_i = ∇_θ log p(y_i|x_i; θ),
  the per-example gradients computed by ``jax.vmap(jax.grad(·))`` over the examples of each
  micro-batch. Memory: ``batch_size`` gradient copies of the parameters.
- ``per_batch`` (a cheaper approximation): F ≈ (1/N) Σ_b G_b², G_b = Σ_{i∈b} g_i, the gradient
  of a micro-batch's summed log-likelihood, one backward pass per micro-batch and one gradient
  copy. G_b² = Σ_{i∈b} g_i² + Σ_{i≠k∈b} g_i g_k: it equals ``per_example`` exactly when
  ``batch_size`` is 1, and otherwise adds the cross terms.

Both accumulate in float32 (gradients of bfloat16 parameters are upcast before squaring) and run
one jitted step per micro-batch, compiled once per padded batch shape.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.errors import CheckpointError, ConfigError
from jaxmerge.fisher import data as data_lib

MODES = ("per_example", "per_batch")
"""The estimators: the definition (default) and the per-micro-batch approximation."""

RECORD_FILE = "jaxmerge_fisher.json"
"""The JSON record written beside a Fisher checkpoint's safetensors."""

ApplyFn = Callable[[Any, Mapping[str, jax.Array]], jax.Array]


@dataclasses.dataclass(frozen=True)
class FisherStats:
    """What an estimate covered.

    Attributes:
      mode: ``per_example`` or ``per_batch``.
      num_examples: N, the examples averaged over (filler rows excluded).
      num_tokens: the scored (response) tokens over all examples.
      num_batches: micro-batches run.
      batch_shapes: the distinct padded ``[batch, length]`` shapes (one compilation each).
      seconds: wall time of the estimate, compilation included.
    """

    mode: str
    num_examples: int
    num_tokens: int
    num_batches: int
    batch_shapes: tuple[tuple[int, int], ...]
    seconds: float

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self),
                "batch_shapes": [list(shape) for shape in self.batch_shapes]}


def response_log_likelihood(logits: jax.Array, input_ids: jax.Array,
                            target_mask: jax.Array) -> jax.Array:
    """log p(y|x) per sequence: Σ_{t≥1} target_mask[t] · log softmax(logits[t-1])[input_ids[t]].

    Args:
      logits: ``[batch, seq, vocab]`` next-token logits (upcast to float32).
      input_ids: ``[batch, seq]`` token ids.
      target_mask: ``[batch, seq]``, True at the scored tokens (column 0 is ignored).

    Returns:
      ``float32[batch]``.
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = jnp.asarray(input_ids)[:, 1:]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    log_probs = picked - jax.nn.logsumexp(logits, axis=-1)
    return jnp.sum(jnp.where(jnp.asarray(target_mask)[:, 1:], log_probs, 0.0), axis=-1)


def _batch_log_likelihood(apply_fn: ApplyFn, params, batch) -> jax.Array:
    logits = apply_fn(params, data_lib.model_inputs(batch))
    return response_log_likelihood(logits, batch["input_ids"], batch["target_mask"])


def _masked_square_sum(grads, example_mask: jax.Array):
    """Σ_i example_mask_i · g_i² over the leading (example) axis, in float32."""

    def reduce(g):
        mask = example_mask.reshape((-1,) + (1,) * (g.ndim - 1))
        return jnp.sum(jnp.where(mask, jnp.square(g.astype(jnp.float32)), 0.0), axis=0)

    return jax.tree.map(reduce, grads)


def _squared_gradients(apply_fn: ApplyFn, mode: str, params, batch):
    """The micro-batch's contribution to N·F: Σ_i g_i² (per_example) or G_b² (per_batch)."""
    example_mask = batch["example_mask"]
    if mode == "per_example":
        def example_log_likelihood(params, example):
            single = jax.tree.map(lambda value: value[None], example)
            return _batch_log_likelihood(apply_fn, params, single)[0]

        examples = {key: value for key, value in batch.items() if key != "example_mask"}
        grads = jax.vmap(jax.grad(example_log_likelihood), in_axes=(None, 0))(params, examples)
        return _masked_square_sum(grads, example_mask)

    def summed_log_likelihood(params):
        log_likelihoods = _batch_log_likelihood(apply_fn, params, batch)
        return jnp.sum(jnp.where(example_mask, log_likelihoods, 0.0))

    grads = jax.grad(summed_log_likelihood)(params)
    return jax.tree.map(lambda g: jnp.square(g.astype(jnp.float32)), grads)


def _accumulate(apply_fn: ApplyFn, mode: str, params, total, batch):
    contribution = _squared_gradients(apply_fn, mode, params, batch)
    return jax.tree.map(jnp.add, total, contribution)


@functools.lru_cache(maxsize=16)
def _accumulate_step(apply_fn: ApplyFn, mode: str):
    """The jitted accumulation step of ``apply_fn`` and ``mode``, kept between calls so a
    second Fisher of the same model (another expert, the same shapes) compiles nothing."""
    return jax.jit(functools.partial(_accumulate, apply_fn, mode), donate_argnums=1)


def _prepare(batch) -> dict:
    """A batch with an ``example_mask`` (all True if absent) and a ``target_mask``."""
    batch = dict(batch)
    for key in ("input_ids", "target_mask"):
        if key not in batch:
            raise ConfigError(f"a Fisher batch needs {key!r} (keys found: {sorted(batch)})")
    size = np.shape(batch["input_ids"])[0]
    if "example_mask" not in batch:
        batch["example_mask"] = np.ones(size, np.bool_)
    return batch


def fisher_diagonal(apply_fn: ApplyFn, params, batches: Iterable[Mapping[str, Any]], *,
                    mode: str = "per_example", progress: bool = False) -> tuple[Any, FisherStats]:
    """The diagonal Fisher of ``apply_fn`` at ``params`` over ``batches`` (module docstring).

    Works for any pure ``apply_fn(params, inputs) -> logits [batch, seq, vocab]``, e.g.
    ``jaxmerge.models.functional(model)``. ``inputs`` is the batch without its scoring keys
    ``target_mask`` and ``example_mask``.

    Args:
      apply_fn: the model's forward pass, differentiable in ``params``.
      params: a pytree of floating arrays (any dtype; the Fisher is float32).
      batches: micro-batches, e.g. from :func:`jaxmerge.fisher.data.make_batches`: dicts of
        ``[batch, ...]`` arrays with ``input_ids``, ``target_mask`` (True at scored tokens,
        which are predicted from the previous position), the model's other inputs (e.g.
        ``attention_mask``), and optionally ``example_mask`` (False at filler rows; default all
        True). Every array has the examples on its leading axis.
      mode: ``per_example`` (default, the definition) or ``per_batch`` (cheaper
        approximation); micro-batches of one example make them equal.
      progress: show a tqdm progress bar over examples on stderr.

    Returns:
      ``(fisher, stats)``: a float32 pytree shaped like ``params`` and a :class:`FisherStats`.

    Raises:
      ConfigError: an unknown mode, a malformed batch, or no examples.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown Fisher mode {mode!r} (known: {', '.join(MODES)})")
    from tqdm.auto import tqdm

    start = time.perf_counter()
    step = _accumulate_step(apply_fn, mode)
    total = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    known = (sum(data_lib.num_examples(_prepare(b)) for b in batches)
             if isinstance(batches, Sequence) else None)
    examples = tokens = count = 0
    shapes: dict[tuple[int, int], None] = {}
    with tqdm(total=known, unit="example", desc=f"Fisher ({mode})", disable=not progress,
              dynamic_ncols=True) as bar:
        for batch in batches:
            batch = _prepare(batch)
            total = step(params, total, batch)
            size = data_lib.num_examples(batch)
            example_mask = np.asarray(batch["example_mask"], np.bool_)
            scored = np.asarray(batch["target_mask"], np.bool_)[:, 1:]
            tokens += int(scored[example_mask].sum())
            examples += size
            count += 1
            shapes[tuple(int(d) for d in np.shape(batch["input_ids"])[:2])] = None
            bar.update(size)
    if examples == 0:
        raise ConfigError("the Fisher needs at least one example; the data has none")
    fisher = jax.block_until_ready(jax.tree.map(lambda t: t / examples, total))
    stats = FisherStats(mode=mode, num_examples=examples, num_tokens=tokens, num_batches=count,
                        batch_shapes=tuple(shapes), seconds=time.perf_counter() - start)
    return fisher, stats


# --------------------------------------------------------------------------- checkpoints


def _align(tensors: dict[str, np.ndarray], checkpoint, tie_word_embeddings: bool
           ) -> dict[str, np.ndarray]:
    """The Fisher under exactly the checkpoint's tensor names, in its order.

    A tied checkpoint that still stores ``lm_head.weight`` gets the embedding's Fisher there
    (the same parameter); stored non-parameters (old RoPE ``inv_freq`` buffers) get zeros.
    """
    aligned = {}
    for name, entry in checkpoint.tensors.items():
        if name in tensors:
            value = tensors[name]
        elif name == "lm_head.weight" and tie_word_embeddings:
            value = tensors["model.embed_tokens.weight"]
        else:
            value = np.zeros(entry.shape, np.float32)
        if tuple(value.shape) != tuple(entry.shape):
            raise CheckpointError(f"Fisher of {name!r} has shape {list(value.shape)} but the "
                                  f"checkpoint stores {list(entry.shape)}")
        aligned[name] = value
    missing = sorted(set(tensors) - set(aligned))
    if missing:
        raise CheckpointError(f"{checkpoint.directory}: parameters {missing[:4]} are not "
                              "stored in the checkpoint")
    return aligned


def fisher_for_checkpoint(model_dir, data, *, mode: str = "per_example", batch_size: int = 8,
                          max_length: int = 512, max_examples: int | None = None,
                          chat_template: bool = False, append_eos: bool = True,
                          param_dtype: str = "float32", tokenizer_dir=None,
                          progress: bool = False) -> tuple[dict[str, np.ndarray], FisherStats]:
    """The diagonal Fisher of a Hugging Face checkpoint on a JSONL validation set.

    Loads the model with :func:`jaxmerge.models.load_model` and its tokenizer with
    ``transformers.AutoTokenizer``, tokenises as :mod:`jaxmerge.fisher.data` describes and runs
    :func:`fisher_diagonal`.

    Args:
      model_dir: the checkpoint (Llama, Mistral, Qwen2, Qwen3; safetensors + config.json).
      data: a JSONL path, or a list of :class:`jaxmerge.fisher.data.Example`.
      mode: ``per_example`` (default) or ``per_batch``.
      batch_size: examples per micro-batch (default 8).
      max_length: most tokens per example (default 512; longer ones are right-truncated).
      max_examples: use the first ``max_examples`` examples (default all).
      chat_template: wrap prompts in the tokenizer's chat template (default False).
      append_eos: end responses with EOS (default True).
      param_dtype: ``float32`` (default) or ``bfloat16`` parameters and computation; the
        accumulation is float32 either way.
      tokenizer_dir: where the tokenizer is (default ``model_dir``).
      progress: show a progress bar.

    Returns:
      ``(tensors, stats)``: float32 ``{hf_name: array}`` with exactly the checkpoint's tensor
      names and shapes, in its order, and the :class:`FisherStats`.

    Raises:
      ConfigError: bad data or settings; CheckpointError: a bad checkpoint or tokenizer.
    """
    from jaxmerge import models
    from jaxmerge.io.safetensors_io import Checkpoint

    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if param_dtype not in dtypes:
        raise ConfigError(f"param_dtype must be one of {sorted(dtypes)}, got {param_dtype!r}")
    examples = (data_lib.read_jsonl(data, max_examples) if isinstance(data, str | pathlib.Path)
                else list(data)[:max_examples])
    tokenizer = data_lib.load_tokenizer(tokenizer_dir or model_dir)
    tokenized = data_lib.tokenize(examples, tokenizer, max_length=max_length,
                                  chat_template=chat_template, append_eos=append_eos)
    _warn_unscored(tokenized)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = data_lib.make_batches(tokenized, batch_size, max_length=max_length,
                                    pad_id=int(pad_id))
    model = models.load_model(model_dir, dtype=dtypes[param_dtype])
    vocab = model.config.vocab_size
    largest = max(max(example.input_ids) for example in tokenized)
    if largest >= vocab:
        raise CheckpointError(f"the tokenizer produced token id {largest} but the model's "
                              f"vocabulary has {vocab} entries")
    apply_fn, params = models.functional(model)
    fisher, stats = fisher_diagonal(apply_fn, params, batches, mode=mode, progress=progress)
    with Checkpoint.open(model_dir) as checkpoint:
        tensors = _align(models.params_to_hf(fisher), checkpoint,
                         model.config.tie_word_embeddings)
    return tensors, stats


def _warn_unscored(tokenized: Sequence[data_lib.Tokenized]) -> None:
    empty = sum(1 for example in tokenized if example.num_targets == 0)
    truncated = sum(1 for example in tokenized if example.truncated)
    if truncated:
        logging.warning("%d of %d examples were truncated to max_length", truncated,
                        len(tokenized))
    if empty:
        logging.warning("%d of %d examples have no scored token (empty or truncated "
                        "response); they count as zero gradients", empty, len(tokenized))


def write_fisher(output, tensors: Mapping[str, np.ndarray], record: Mapping | None = None, *,
                 dtype: str = "float32", overwrite: bool = False,
                 max_shard_size: int = 5 * 10**9) -> pathlib.Path:
    """Writes a Fisher checkpoint: safetensors under the model's tensor names, and a record.

    The directory holds ``model.safetensors`` (or HF-style shards and their index beyond
    ``max_shard_size`` bytes, default 5 GB) and :data:`RECORD_FILE` (``record`` plus the
    format, dtype and jaxmerge version). It is built in a staging directory and renamed into
    place (:func:`jaxmerge.io.hf.atomic_output`), and reads back with
    :class:`jaxmerge.io.safetensors_io.Checkpoint`, so a merge streams it beside its expert.

    Args:
      output: the directory to create.
      tensors: ``{hf_name: array}``, e.g. from :func:`fisher_for_checkpoint`.
      record: what to record (model, data, stats, ...); JSON-serialisable.
      dtype: ``float32`` (default) or ``bfloat16``.
      overwrite: replace an existing ``output``.

    Returns:
      The output path.

    Raises:
      ConfigError: ``output`` exists without ``overwrite``, or a bad dtype.
    """
    import json

    import ml_dtypes

    from jaxmerge.io import hf
    from jaxmerge.io.safetensors_io import ShardedWriter
    from jaxmerge.version import __version__

    dtypes = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
    if dtype not in dtypes:
        raise ConfigError(f"Fisher dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    target = dtypes[dtype]
    full = {"format": "jaxmerge diagonal Fisher", "dtype": dtype,
            "jaxmerge_version": __version__, **(record or {})}
    specs = [(name, target, tuple(np.shape(array))) for name, array in tensors.items()]
    with hf.atomic_output(output, overwrite) as staging:
        with ShardedWriter(staging, specs, max_shard_size,
                           metadata={"jaxmerge": "diagonal Fisher"}) as writer:
            for name, array in tensors.items():
                writer.write(name, np.asarray(array, np.float32).astype(target))
        (staging / RECORD_FILE).write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
    return pathlib.Path(output)
