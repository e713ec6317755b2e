"""Diagonal Fisher information of causal LMs, for Fisher-aware merging (METHODS.md §6–§7).

F_j = E_{(x,y)∈D}[(∂ log p(y|x; θ)/∂θ_j)²], log p summed over the response tokens, at the
model's own parameters. Library use (any ``apply_fn(params, batch) -> logits``)::

  from jaxmerge.fisher import data, fisher_diagonal

  tokenized = data.tokenize(data.read_jsonl("val.jsonl"), tokenizer, max_length=512)
  batches = data.make_batches(tokenized, batch_size=8, max_length=512)
  fisher, stats = fisher_diagonal(apply_fn, params, batches, mode="per_example")

A checkpoint's Fisher, written for ``python -m jaxmerge.main --method=fisher --fisher=DIR``::

  tensors, stats = fisher_for_checkpoint("expert", "val.jsonl")
  write_fisher("expert-fisher", tensors, {"model": "expert", **stats.as_dict()})

Command line: ``python -m jaxmerge.fisher --model=DIR --data=FILE.jsonl --output=DIR``.

This package defines no flags (the command line's are in :mod:`jaxmerge.fisher.__main__`).
The Fisher-merging *method* is :func:`jaxmerge.fisher_merging` (``--method=fisher``).
"""

from jaxmerge.fisher import data
from jaxmerge.fisher.data import Example, Tokenized, make_batches, read_jsonl, tokenize
from jaxmerge.fisher.estimate import (
    MODES,
    RECORD_FILE,
    FisherStats,
    fisher_diagonal,
    fisher_for_checkpoint,
    response_log_likelihood,
    write_fisher,
)

__all__ = [
    "MODES",
    "RECORD_FILE",
    "Example",
    "FisherStats",
    "Tokenized",
    "data",
    "fisher_diagonal",
    "fisher_for_checkpoint",
    "make_batches",
    "read_jsonl",
    "response_log_likelihood",
    "tokenize",
    "write_fisher",
]

