"""Planning a merge from tensor headers alone, and failing early on bad input.

The plan checks every expert against the base (names, shapes, dtypes) before a
single tensor is read, decides what each output tensor is (merged, copied,
re-tied), and groups merged leaves that share shape and static facts so the
executor runs one compiled, vmapped call per group.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from jaxmerge.errors import ConfigError, MismatchError
from jaxmerge.leaves import LeafInfo, is_embedding_name


class Source(Protocol):
    """One model's tensors: a checkpoint directory or an in-memory pytree."""

    label: str

    def entries(self) -> Mapping[str, tuple[np.dtype, tuple[int, ...]]]:
        """Tensor name -> (dtype, shape), in storage order, from headers only."""

    def location(self, name: str) -> str:
        """Where a tensor lives, for error messages (a file path)."""

    def read(self, name: str, out: np.ndarray, rows: tuple[int, int] | None = None) -> None:
        """Reads the tensor (or rows ``[start, stop)`` of dim 0) into ``out``."""


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """What to do for one output tensor.

    Attributes:
      info: static facts, with ``info.shape`` the merged shape.
      out_shape: the written shape (larger than ``info.shape`` only in dim 0, when
        vocabulary sizes differ).
      out_dtype: the written dtype.
      rows: read only rows ``[0, rows)`` of every input (vocabulary mismatch), else None.
      tail: ``(model index, 0 = base)`` that supplies rows ``[rows, out_shape[0])``.
      alias_of: the tensor whose merged value this one repeats (tied lm_head), or None.
      copy: non-floating tensors are copied from the base unchanged.
      block: rows ``[start, stop)`` of the merged rows, when the executor merges a
        large leaf in row blocks (row-wise merges only); None for the whole leaf.
      padded: the entries of the flat slot a small whole leaf is merged in, its own
        first and zeros after (the executor pads small leaves into segments); None.
    """

    info: LeafInfo
    out_shape: tuple[int, ...]
    out_dtype: np.dtype
    rows: int | None = None
    tail: int | None = None
    alias_of: str | None = None
    copy: bool = False
    block: tuple[int, int] | None = None
    padded: int | None = None

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def read_rows(self) -> tuple[int, int] | None:
        """The rows of every input this (part of a) leaf reads, or None for all."""
        if self.block is not None:
            return self.block
        return None if self.rows is None else (0, self.rows)

    def row_blocks(self, rows_per_block: int) -> list[LeafPlan]:
        """This leaf as consecutive row blocks of at most ``rows_per_block`` rows."""
        total = self.info.shape[0]
        blocks = []
        for start in range(0, total, rows_per_block):
            stop = min(total, start + rows_per_block)
            info = dataclasses.replace(self.info, shape=(stop - start, *self.info.shape[1:]))
            blocks.append(dataclasses.replace(self, info=info, block=(start, stop)))
        return blocks

    @property
    def merged(self) -> bool:
        return not self.copy and self.alias_of is None


@dataclasses.dataclass
class Plan:
    """All output tensors in base order, the merged ones grouped for batching."""

    leaves: list[LeafPlan]
    groups: dict[tuple, list[LeafPlan]]
    warnings: list[str]
    config_overrides: dict

    @property
    def output_tensors(self) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
        return [(leaf.name, leaf.out_dtype, leaf.out_shape) for leaf in self.leaves]


def _is_floating(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype.name.startswith(("bfloat16", "float8"))


def _check_names(base: Source, other: Source, role: str) -> None:
    base_names, other_names = set(base.entries()), set(other.entries())
    missing = [n for n in base.entries() if n not in other_names]
    if missing:
        raise MismatchError(
            f"{role} {other.label} is missing tensor {missing[0]!r} that the base "
            f"{base.label} has" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    extra = [n for n in other.entries() if n not in base_names]
    if extra:
        raise MismatchError(
            f"{role} {other.label} has tensor {extra[0]!r} ({other.location(extra[0])}) that "
            f"the base {base.label} lacks"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )


def _mismatch(name, what, base: Source, other: Source, base_value, other_value) -> MismatchError:
    return MismatchError(
        f"tensor {name!r}: {what} {other_value} in {other.location(name)} differs from "
        f"{base_value} in the base {base.location(name)}"
    )


def _vocabulary_plan(name, sources: Sequence[Source], shapes) -> tuple[int, int, str | None]:
    """Rows merged, the model supplying the extra rows, and a warning, for vocab mismatches."""
    rows = [shape[0] for shape in shapes]
    common, largest = min(rows), max(rows)
    if common == largest:
        return common, 0, None
    tail = rows.index(largest)
    sizes = ", ".join(f"{source.label}: {r}" for source, r in zip(sources, rows))
    warning = (
        f"tensor {name!r}: vocabulary sizes differ ({sizes}); rows 0..{common - 1} are merged, "
        f"rows {common}..{largest - 1} are taken from {sources[tail].label}"
    )
    if len({r for r in rows if r > common}) > 1:
        warning += " (the other models' extra rows are dropped)"
    return common, tail, warning


def _tied_aliases(names: Sequence[str], entries, tie_word_embeddings: bool) -> dict[str, str]:
    """lm_head -> input embedding, for tied models whose checkpoint stores both."""
    if not tie_word_embeddings:
        return {}
    heads = [n for n in names if n.endswith("lm_head.weight")]
    embeddings = [n for n in names if is_embedding_name(n) and "lm_head" not in n]
    aliases = {}
    for head in heads:
        same_shape = [e for e in embeddings if entries[e][1] == entries[head][1]]
        if same_shape:
            aliases[head] = same_shape[0]
    return aliases


def build_plan(
    base: Source,
    experts: Sequence[Source],
    extras: Mapping[str, Sequence[Source]] | None = None,
    *,
    out_dtype: str | None = None,
    tie_word_embeddings: bool = False,
    vocab_size_key: int | None = None,
) -> Plan:
    """Validates the inputs from headers and plans every output tensor.

    Args:
      base: the base model θ₀.
      experts: the N ≥ 1 fine-tuned models.
      extras: per-expert extra inputs (e.g. Fisher), N sources per name, matching the base.
      out_dtype: dtype of merged floating tensors; None keeps each base tensor's dtype.
      tie_word_embeddings: the base config ties lm_head to the input embedding.
      vocab_size_key: the base config's ``vocab_size`` (updated if the vocabulary grows).

    Raises:
      ConfigError: no experts, or a bad dtype.
      MismatchError: names, shapes or dtypes disagree (naming tensor and file).
    """
    if not experts:
        raise ConfigError("at least one expert is needed (got N = 0)")
    extras = dict(extras or {})
    for extra_name, sources in extras.items():
        if len(sources) != len(experts):
            raise ConfigError(
                f"{len(sources)} {extra_name} inputs for {len(experts)} experts: "
                "give one per expert"
            )
    target = None if out_dtype is None else _parse_dtype(out_dtype)

    models = [base, *experts]
    for index, expert in enumerate(experts):
        _check_names(base, expert, f"expert {index + 1}")
    for extra_name, sources in extras.items():
        for source in sources:
            _check_names(base, source, extra_name)

    base_entries = base.entries()
    names = list(base_entries)
    aliases = _tied_aliases(names, base_entries, tie_word_embeddings)
    leaves, warnings, overrides = [], [], {}
    for name in names:
        dtype, shape = base_entries[name]
        shapes = [shape]
        for expert in experts:
            other_dtype, other_shape = expert.entries()[name]
            if other_dtype != dtype:
                raise _mismatch(name, "dtype", base, expert, dtype.name, other_dtype.name)
            if other_shape != shape and not (
                is_embedding_name(name) and len(shape) == 2 and other_shape[1:] == shape[1:]
            ):
                raise _mismatch(name, "shape", base, expert, shape, other_shape)
            shapes.append(other_shape)
        for extra_name, sources in extras.items():
            for source in sources:
                if source.entries()[name][1] != shape:
                    raise _mismatch(name, f"{extra_name} shape", base, source, shape,
                                    source.entries()[name][1])

        rows, tail, warning = _vocabulary_plan(name, models, shapes) if shape else (0, 0, None)
        mismatched = warning is not None
        if mismatched:
            warnings.append(warning)
            if extras:
                raise MismatchError(f"tensor {name!r}: vocabulary sizes differ; extra inputs "
                                    "need identical shapes")
            largest = max(s[0] for s in shapes)
            if vocab_size_key is not None and largest != vocab_size_key:
                overrides["vocab_size"] = largest
        out_shape = ((max(s[0] for s in shapes),) + tuple(shape[1:])) if mismatched else shape
        merged_shape = ((rows,) + tuple(shape[1:])) if mismatched else shape
        floating = _is_floating(dtype)
        leaves.append(LeafPlan(
            info=LeafInfo.from_name(name, merged_shape, dtype),
            out_shape=tuple(out_shape),
            out_dtype=(target if (target is not None and floating) else dtype),
            rows=rows if mismatched else None,
            tail=tail if mismatched else None,
            alias_of=aliases.get(name),
            copy=not floating,
        ))

    groups: dict[tuple, list[LeafPlan]] = {}
    for leaf in leaves:
        if leaf.merged:
            groups.setdefault(leaf.info.group_key(), []).append(leaf)
    return Plan(leaves=leaves, groups=groups, warnings=warnings, config_overrides=overrides)


_DTYPE_NAMES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16",
                "fp16": "float16", "half": "float16", "float32": "float32", "fp32": "float32",
                "float": "float32"}


def _parse_dtype(name: str) -> np.dtype:
    import ml_dtypes

    if name not in _DTYPE_NAMES:
        raise ConfigError(f"dtype must be one of bfloat16, float16, float32; got {name!r}")
    canonical = _DTYPE_NAMES[name]
    return np.dtype(ml_dtypes.bfloat16) if canonical == "bfloat16" else np.dtype(canonical)
