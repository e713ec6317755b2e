"""Streaming measurement of Hugging Face checkpoints: one record per tensor.

The executor that runs merges runs the diagnostics too: the checkpoints are
planned from their headers (names, shapes and dtypes checked before any tensor
is read), same-shape tensors are stacked and measured by one compiled
``jit(vmap(...))`` call per group, and the next group is read while the current
one computes. Two streaming passes: the update statistics over every floating
tensor (in row blocks where a tensor exceeds the memory budget), then the
spectral statistics over the matrix tensors.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Sequence

import jax
import numpy as np

from jaxmerge.algebra import LeafContext, Merge, StatsPass
from jaxmerge.analysis import statistics
from jaxmerge.errors import ConfigError
from jaxmerge.executor import DEFAULT_CHUNK_BYTES, Executor
from jaxmerge.leaves import LeafInfo
from jaxmerge.linalg import SVD_MODES
from jaxmerge.plan import Source, build_plan
from jaxmerge.sources import ArraySource, CheckpointSource, flatten_params


@dataclasses.dataclass
class TensorMeasurement:
    """The measurements of one tensor (numpy values; see :mod:`.statistics`).

    Attributes:
      info: name, shape, family and layer of the tensor.
      update: :func:`~jaxmerge.analysis.statistics.update_statistics` of the whole tensor.
      spectral: :func:`~jaxmerge.analysis.statistics.spectral_statistics`, or None
        for non-matrix tensors (and when spectral statistics were not asked for).
    """

    info: LeafInfo
    update: dict
    spectral: dict | None = None


@dataclasses.dataclass
class Measurements:
    """Everything measured on one base and its experts.

    Attributes:
      base, experts: the inputs (paths or labels).
      tensors: one :class:`TensorMeasurement` per measured tensor, in plan order.
      settings: eps, head_rank, energy_ranks and svd used.
      seconds: wall time of the two passes.
      bytes_read: tensor bytes read from disk.
    """

    base: str
    experts: list[str]
    tensors: list[TensorMeasurement]
    settings: dict
    seconds: float = 0.0
    bytes_read: int = 0

    @property
    def num_experts(self) -> int:
        return len(self.experts)


def _unused_apply(x, ctx):  # the executor only runs statistics passes here
    raise NotImplementedError("diagnostics do not merge")


def _always(info: LeafInfo) -> bool:
    del info
    return True


def _never(info: LeafInfo) -> bool:
    del info
    return False


def _is_matrix(info: LeafInfo) -> bool:
    return info.is_matrix


def _to_numpy(total, stats):
    del stats
    return jax.tree.map(np.asarray, total)


def update_pass(eps: float = statistics.UPDATE_EPS) -> StatsPass:
    """Per-leaf pass of :func:`~jaxmerge.analysis.statistics.update_statistics`."""

    def partial(x, ctx: LeafContext):
        return statistics.update_statistics(x, eps)

    return StatsPass(id="update_statistics", partial=partial, finalize=_to_numpy,
                     applies=_always, description="update statistics", per_leaf=True)


def spectral_pass(head_rank: int = 1, energy_ranks=statistics.ENERGY_RANKS,
                  svd: str = "auto") -> StatsPass:
    """Per-leaf pass of :func:`~jaxmerge.analysis.statistics.spectral_statistics` (matrices)."""

    def partial(x, ctx: LeafContext):
        return statistics.spectral_statistics(x, ctx.keys, head_rank, tuple(energy_ranks), svd)

    return StatsPass(id="spectral_statistics", partial=partial, finalize=_to_numpy,
                     applies=_is_matrix, description="spectral statistics", per_leaf=True)


def check_settings(eps: float, head_rank: int, energy_ranks: Sequence[int], svd: str) -> None:
    """Raises ConfigError naming the first bad setting."""
    if not eps >= 0:
        raise ConfigError(f"eps must be non-negative, got {eps}")
    if head_rank < 1:
        raise ConfigError(f"head_rank must be at least 1, got {head_rank}")
    if not energy_ranks or any(int(k) != k or k < 1 for k in energy_ranks):
        raise ConfigError(f"energy_ranks must be positive integers, got {list(energy_ranks)}")
    if svd not in SVD_MODES:
        raise ConfigError(f"svd must be one of {SVD_MODES}, got {svd!r}")


def measure_sources(
    base: Source,
    experts: Sequence[Source],
    *,
    eps: float = statistics.UPDATE_EPS,
    head_rank: int = 1,
    energy_ranks: Sequence[int] = statistics.ENERGY_RANKS,
    svd: str = "auto",
    spectral: bool = True,
    seed: int = 0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool = False,
    tie_word_embeddings: bool = False,
    vocab_size_key: int | None = None,
) -> tuple[list[TensorMeasurement], dict, float]:
    """Plans and measures: (tensors, settings, seconds). See :func:`measure_checkpoints`."""
    check_settings(eps, head_rank, energy_ranks, svd)
    energy_ranks = tuple(sorted({1, *(int(k) for k in energy_ranks)}))  # top-1 always
    plan = build_plan(base, experts, tie_word_embeddings=tie_word_embeddings,
                      vocab_size_key=vocab_size_key)
    key = jax.random.key(seed)
    start = time.perf_counter()
    elementwise = Executor(Merge(_unused_apply, rowwise=_always), plan, base, experts, key=key,
                           chunk_bytes=chunk_bytes, progress=progress)
    updates = elementwise.measure(update_pass(eps), "pass 1/2: update statistics"
                                  if spectral else "update statistics")
    spectra = {}
    if spectral:
        whole = Executor(Merge(_unused_apply, rowwise=_never), plan, base, experts, key=key,
                         chunk_bytes=chunk_bytes, progress=progress)
        spectra = whole.measure(spectral_pass(head_rank, energy_ranks, svd),
                                "pass 2/2: spectral statistics")
    tensors = [TensorMeasurement(leaf.info, updates[leaf.name], spectra.get(leaf.name))
               for leaf in plan.leaves if leaf.name in updates]
    settings = {"eps": eps, "head_rank": head_rank, "energy_ranks": list(energy_ranks),
                "svd": svd, "spectral": spectral, "seed": seed}
    return tensors, settings, time.perf_counter() - start


def measure_checkpoints(
    base: str | pathlib.Path,
    experts: Sequence[str | pathlib.Path],
    **options,
) -> Measurements:
    """Measures the task vectors of ``experts`` against ``base``, streaming.

    Args:
      base, experts: Hugging Face checkpoint directories (N ≥ 1 experts).
      eps: |τ| > eps counts as updated (default 1e-5).
      head_rank: rank k of the spectral head (default 1, as ResMerge).
      energy_ranks: the k of the reported top-k energy shares (default 1, 4, 16;
        1 is always included).
      svd: how the heads are found: ``auto`` / ``randomized`` / ``exact``.
      spectral: also run the spectral pass over the matrix tensors (default True).
      seed: seeds the randomised top-k SVD of the heads.
      chunk_bytes: memory budget of one batched chunk.
      progress: progress bars on stderr.

    Raises:
      ConfigError: a bad setting, or no experts.
      CheckpointError, MismatchError: unreadable inputs or mismatched names/shapes,
        naming the tensor and file, before any tensor is read.
    """
    check_settings(options.get("eps", statistics.UPDATE_EPS), options.get("head_rank", 1),
                   options.get("energy_ranks", statistics.ENERGY_RANKS),
                   options.get("svd", "auto"))
    base_source = CheckpointSource.open(base, label=f"base {base}")
    expert_sources = [CheckpointSource.open(path, label=f"expert {i + 1} {path}")
                      for i, path in enumerate(experts)]
    sources = [base_source, *expert_sources]
    try:
        config = base_source.config or {}
        tensors, settings, seconds = measure_sources(
            base_source, expert_sources,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            vocab_size_key=config.get("vocab_size"), **options)
        bytes_read = sum(source.bytes_read for source in sources)
    finally:
        for source in sources:
            source.close()
    return Measurements(str(base), [str(e) for e in experts], tensors, settings, seconds,
                        bytes_read)


def measure(base_params, expert_params: Sequence, **options) -> Measurements:
    """Measures in-memory pytrees (e.g. Flax params); options as :func:`measure_checkpoints`.

    Leaves are named by their dotted pytree paths, so module families and layer
    indices are recognised when the paths follow Hugging Face names
    (``model.layers.3.mlp.up_proj.weight``); a 2-D leaf counts as a matrix unless
    its name says embedding or norm.
    """
    base = ArraySource(flatten_params(base_params)[0], "base")
    experts = [ArraySource(flatten_params(p)[0], f"expert {i + 1}")
               for i, p in enumerate(expert_params)]
    tensors, settings, seconds = measure_sources(base, experts, **options)
    return Measurements("base", [f"expert {i + 1}" for i in range(len(experts))], tensors,
                        settings, seconds)
