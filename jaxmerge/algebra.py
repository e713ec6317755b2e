"""The merge algebra: a Merge value and the combinators that build methods from pieces.

A :class:`Merge` is a pure function on one leaf, in the shape optax gives gradient
transformations. Its ``apply(x, ctx)`` receives the value flowing through a chain
(at the start: the stacked task vectors ``f32[N, *shape]``) and a
:class:`LeafContext`, and returns the next value. A complete method returns the
merged task vector ``Δ: f32[*shape]``; the executor adds the base and casts.

Pieces come in three kinds, told apart only by what they take and give:

- *transforms* ``f32[N, *shape] -> f32[N, *shape]`` (trim, dare, elect_sign, ...),
- *reductions* ``f32[N, *shape] -> f32[*shape]`` (mean, disjoint_mean, ...),
- *post* steps ``f32[*shape] -> f32[*shape]`` (scale, ...).

``chain`` threads a value through pieces, ``route`` picks a merge per leaf from
static predicates on :class:`~jaxmerge.leaves.LeafInfo`, ``add`` sums two merges.

Whole-model statistics (the RAM+ ρ_t, the global TIES threshold) are declared as
:class:`StatsPass` values: a per-leaf partial statistic that the executor sums over
all leaves in a streaming pass before the apply pass, then ``finalize``-s into the
value a piece reads from ``ctx.stats[pass_id]``. A pass computed on a piece inside
a chain sees the value *entering* that piece (``chain`` wraps it with the prefix).

Per-expert extra inputs (e.g. Fisher tensors) are declared by name in
``extra_inputs`` and arrive in ``ctx.extras[name]`` as ``f32[N, *shape]``.

Example: TIES is ``chain(trim(0.2), elect_sign(), disjoint_mean(), scale(1.0))``.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxmerge.errors import ConfigError
from jaxmerge.leaves import LeafInfo

Array = jax.Array
PyTree = Any


class LeafContext:
    """Everything a piece may read for one leaf.

    Attributes:
      taus: the original stacked task vectors ``f32[N, *shape]`` (θ_t − θ₀).
      base: the base tensor θ₀, ``f32[*shape]``.
      keys: one PRNG key per expert for this leaf, derived from the seed, the leaf's
        name and the expert index (METHODS.md §0), so masks never depend on
        traversal order, batching or sharding. May be given as a function returning
        them: they are then derived where used, so a merge without randomness does
        not trace the derivation (~10 ms per compiled call).
      extras: per-expert extra inputs by name, each ``f32[N, *shape]``.
      stats: finished statistics, keyed by :attr:`StatsPass.id` (whole-model ones,
        and this leaf's value of per-leaf ones).
      row_offset: index of this block's first row in the whole leaf (0 unless the
        executor splits a row-wise merge's leaf into row blocks).
      info: static facts about the leaf (shape, family, ...). Do not branch on the
        name or layer inside ``apply``: leaves of one shape group share a compiled
        call. Use :func:`route` with a name predicate instead.
      leaf_sum: ``count -> count`` of the whole leaf, set by the executor when the call
        holds pieces of leaves (see :meth:`leaf_total`); None: a whole leaf.
    """

    __slots__ = ("taus", "base", "_keys", "extras", "stats", "row_offset", "info", "leaf_sum")

    def __init__(self, taus: Array, base: Array, keys: Array | Callable[[], Array],
                 extras: Mapping[str, Array], stats: Mapping[int, PyTree], row_offset: Array,
                 info: LeafInfo, leaf_sum: Callable[[Array], Array] | None = None):
        self.taus = taus
        self.base = base
        self._keys = keys
        self.extras = extras
        self.stats = stats
        self.row_offset = row_offset
        self.info = info
        self.leaf_sum = leaf_sum

    def leaf_total(self, count: Array) -> Array:
        """The whole leaf's value of a piece's int32 ``count`` (over the piece's entries):
        summed over every piece of the leaf, in this call and in others. The executor
        gives a leaf in pieces (segments, row blocks) only for statistics passes that
        are ``in_call``; a whole leaf is its only piece, and its count is returned."""
        return count if self.leaf_sum is None else self.leaf_sum(count)

    @property
    def keys(self) -> Array:
        # Derived at each use, in the trace that uses them (never a cached tracer).
        return self._keys() if callable(self._keys) else self._keys

    @property
    def num_experts(self) -> int:
        return self.taus.shape[0]

    def _replace(self, **changes) -> LeafContext:
        """A copy with the given attributes replaced (a NamedTuple's ``_replace``)."""
        fields = {"taus": self.taus, "base": self.base, "keys": self._keys,
                  "extras": self.extras, "stats": self.stats, "row_offset": self.row_offset,
                  "info": self.info, "leaf_sum": self.leaf_sum}
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(f"LeafContext has no field(s) {sorted(unknown)}")
        return LeafContext(**{**fields, **changes})


_pass_ids = itertools.count()


def _everywhere(info: LeafInfo) -> bool:
    del info
    return True


def _unsettled(stats: Mapping[int, PyTree]) -> None:
    del stats


class StatsPass(NamedTuple):
    """A whole-model statistic computed in a streaming pass before the merge.

    Attributes:
      id: unique id; the result is ``ctx.stats[id]``.
      partial: ``(x, ctx) -> pytree`` of per-leaf partial sums (int32 counts or f32).
      finalize: ``(total, stats_so_far) -> value`` turns the sum over all leaves
        (numpy, int64/float64) into the statistic (a pytree of arrays).
      applies: static predicate: which leaves contribute.
      description: shown in the progress bar.
      per_leaf: sum and finalize per tensor instead of over the whole model (a
        per-tensor quantile, say). The executor runs per-leaf passes only for the
        leaves it splits into row blocks; a piece must compute the statistic
        itself, inside its compiled call, when ``id not in ctx.stats``.
      settle: ``stats_so_far -> statistic or None``: the statistic when the earlier
        passes already determine it (then nothing is streamed for it: for a per-leaf
        pass, ``stats_so_far`` is one leaf's view and only the unsettled leaves are
        read), else None. Say, a radix select whose first level already landed on a
        single value.
      in_call: for a per-leaf pass whose partial is one int32 count (TIES's majority
        sign): the piece that reads the statistic computes it inside its call when it
        is missing from ``ctx.stats``, as a function of ``ctx.leaf_total(count)``, the
        count of the whole leaf even when the call holds only pieces of it. The executor
        then needs no pass over a leaf whose pieces share one call, and may cut leaves
        into segments that share a compiled program (a leaf larger than one call gets
        the count of its pieces elsewhere from a pass over that leaf alone).
    """

    id: int
    partial: Callable[[Array, LeafContext], PyTree]
    finalize: Callable[[PyTree, Mapping[int, PyTree]], PyTree]
    applies: Callable[[LeafInfo], bool] = _everywhere
    description: str = "statistics"
    per_leaf: bool = False
    settle: Callable[[Mapping[int, PyTree]], PyTree | None] = _unsettled
    in_call: bool = False


def stats_pass(partial, finalize, description="statistics", per_leaf=False,
               settle=None, in_call=False) -> StatsPass:
    """Creates a :class:`StatsPass` with a fresh id (``settle``, ``in_call``: see
    :class:`StatsPass`)."""
    return StatsPass(next(_pass_ids), partial, finalize, _everywhere, description, per_leaf,
                     _unsettled if settle is None else settle, in_call)


def _no_choice(info: LeafInfo) -> Hashable:
    del info
    return ()


def _any_n(num_experts: int) -> None:
    del num_experts


def _never(info: LeafInfo) -> bool:
    del info
    return False


def _always(info: LeafInfo) -> bool:
    del info
    return True


def rowwise(apply: Callable[[Array, LeafContext], Array], *, flat: bool = False,
            **kwargs) -> Merge:
    """A piece whose output rows depend only on the same input rows (row-splittable).

    Entrywise pieces are row-wise (DARE's masks too: they follow the flat position); so
    are per-row ones (DELLA's ranks). Whole-tensor quantities must come from per-leaf
    statistics.
    ``flat=True`` also declares :attr:`Merge.flat` (entrywise pieces, and per-tensor
    statistics that ignore the shape, like TIES's threshold).
    """
    return Merge(apply, rowwise=_always, flat=_always if flat else _never, **kwargs)


class Merge(NamedTuple):
    """A merge method, or a piece of one.

    Attributes:
      apply: ``(x, ctx) -> y``, pure and jittable; see the module docstring.
      passes: whole-model statistics this merge needs, in the order they run.
      extra_inputs: names of per-expert extra tensors this merge reads.
      choose: static routing signature of a leaf: leaves with different
        signatures never share a compiled call (used by :func:`route`).
      check: ``check(num_experts)`` raises ConfigError when the merge cannot take
        that many experts (e.g. slerp needs 1 or 2).
      rowwise: ``rowwise(info)`` is True when each output row (index of dim 0)
        depends only on the same rows of the inputs (and on finished statistics).
        The executor may then merge a leaf larger than its memory budget in row
        blocks; ``ctx.row_offset`` tells a block where it starts.
      flat: ``flat(info)`` is True when the merge (its statistics passes included)
        gives the same values, in row-major order, for the leaf flattened to one
        dimension, and reads nothing of ``ctx.info`` beyond its routing choice
        (:attr:`choose`). The executor may then merge such leaves flattened, every
        shape and module family of one size in one compiled call: fewer programs to
        compile (a first run of TIES on SmolLM2: 10 → 8).
    """

    apply: Callable[[Array, LeafContext], Array]
    passes: tuple[StatsPass, ...] = ()
    extra_inputs: tuple[str, ...] = ()
    choose: Callable[[LeafInfo], Hashable] = _no_choice
    check: Callable[[int], None] = _any_n
    rowwise: Callable[[LeafInfo], bool] = _never
    flat: Callable[[LeafInfo], bool] = _never


def _merge_checks(merges) -> Callable[[int], None]:
    def check(num_experts: int) -> None:
        for merge in merges:
            merge.check(num_experts)

    return check


def _unique(names) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def chain(*pieces: Merge) -> Merge:
    """Threads the value through ``pieces`` in order, like ``optax.chain``.

    A statistics pass declared by piece ``i`` is computed on the value produced
    by pieces ``0..i-1``, so ``chain(dare(0.8), trim(0.2, scope='global'))``
    thresholds the DARE-sparsified task vectors.
    """
    if not pieces:
        raise ConfigError("chain() needs at least one piece")

    def apply(x, ctx):
        for piece in pieces:
            x = piece.apply(x, ctx)
        return x

    passes = []
    for index, piece in enumerate(pieces):
        prefix = pieces[:index]
        for inner in piece.passes:
            passes.append(inner._replace(partial=_after(prefix, inner.partial)))

    return Merge(
        apply=apply,
        passes=tuple(passes),
        extra_inputs=_unique(name for piece in pieces for name in piece.extra_inputs),
        choose=lambda info: tuple(piece.choose(info) for piece in pieces),
        check=_merge_checks(pieces),
        rowwise=lambda info: all(piece.rowwise(info) for piece in pieces),
        flat=lambda info: all(piece.flat(info) for piece in pieces),
    )


def _after(prefix: tuple[Merge, ...], partial):
    if not prefix:
        return partial

    def wrapped(x, ctx):
        for piece in prefix:
            x = piece.apply(x, ctx)
        return partial(x, ctx)

    return wrapped


class Predicate:
    """A static test on a :class:`LeafInfo`, combinable with ``&``, ``|`` and ``~``."""

    def __init__(self, test: Callable[[LeafInfo], bool], description: str):
        self.test = test
        self.description = description

    def __call__(self, info: LeafInfo) -> bool:
        return bool(self.test(info))

    def __and__(self, other: Predicate) -> Predicate:
        return Predicate(lambda i: self(i) and other(i), f"({self} & {other})")

    def __or__(self, other: Predicate) -> Predicate:
        return Predicate(lambda i: self(i) or other(i), f"({self} | {other})")

    def __invert__(self) -> Predicate:
        return Predicate(lambda i: not self(i), f"~{self}")

    def __repr__(self) -> str:
        return self.description


matrix = Predicate(lambda info: info.is_matrix, "matrix")
"""Matrix leaves (METHODS.md §0): 2-D, floating, not embedding/lm_head/norm."""

everything = Predicate(lambda info: True, "everything")


def family(*names: str) -> Predicate:
    """Leaves whose module family is one of ``names`` (attention, ffn, norm, embedding, other)."""
    return Predicate(lambda info: info.family in names, f"family{names}")


def name(pattern: str) -> Predicate:
    """Leaves whose name matches the regular expression ``pattern`` (``re.search``)."""
    compiled = re.compile(pattern)
    return Predicate(lambda info: compiled.search(info.name) is not None, f"name({pattern!r})")


def ndim(*dims: int) -> Predicate:
    """Leaves with one of the given numbers of dimensions."""
    return Predicate(lambda info: info.ndim in dims, f"ndim{dims}")


def layers(first: int, last: int) -> Predicate:
    """Leaves in decoder layers ``first..last`` (inclusive)."""
    return Predicate(
        lambda info: info.layer is not None and first <= info.layer <= last,
        f"layers({first}, {last})",
    )


def route(branches: Mapping[Predicate, Merge], default: Merge) -> Merge:
    """Picks, per leaf, the merge of the first predicate that holds, else ``default``.

    The choice is static (made from the leaf's name, shape and family before any
    data is read), so each branch compiles separately and costs nothing at run time.
    Statistics passes of a branch only see the leaves routed to it.
    """
    options = list(branches.items()) + [(everything, default)]
    for predicate, merge in options:
        if not isinstance(predicate, Predicate) or not isinstance(merge, Merge):
            raise ConfigError("route() takes {Predicate: Merge} and a default Merge")

    def pick(info: LeafInfo) -> int:
        return next(i for i, (predicate, _) in enumerate(options) if predicate(info))

    def apply(x, ctx):
        return options[pick(ctx.info)][1].apply(x, ctx)

    passes = []
    for index, (_, merge) in enumerate(options):
        for inner in merge.passes:
            applies = _routed(pick, index, inner.applies)
            passes.append(inner._replace(applies=applies))

    return Merge(
        apply=apply,
        passes=tuple(passes),
        extra_inputs=_unique(n for _, merge in options for n in merge.extra_inputs),
        choose=lambda info: (pick(info), options[pick(info)][1].choose(info)),
        check=_merge_checks([merge for _, merge in options]),
        rowwise=lambda info: options[pick(info)][1].rowwise(info),
        flat=lambda info: options[pick(info)][1].flat(info),
    )


def _routed(pick, index, applies):
    return lambda info: pick(info) == index and applies(info)


def add(*merges: Merge) -> Merge:
    """Sums the merged task vectors of several merges run on the same input."""

    def apply(x, ctx):
        return sum(merge.apply(x, ctx) for merge in merges)

    return Merge(
        apply=apply,
        passes=tuple(p for merge in merges for p in merge.passes),
        extra_inputs=_unique(n for merge in merges for n in merge.extra_inputs),
        choose=lambda info: tuple(merge.choose(info) for merge in merges),
        check=_merge_checks(merges),
        rowwise=lambda info: all(merge.rowwise(info) for merge in merges),
        flat=lambda info: all(merge.flat(info) for merge in merges),
    )


def scale(factor: float) -> Merge:
    """Multiplies the value by ``factor`` (the λ of task arithmetic and TIES)."""
    return rowwise(lambda x, ctx: x * jnp.float32(factor), flat=True)


def requires_experts(merge: Merge, allowed: Callable[[int], bool], message: str) -> Merge:
    """Returns ``merge`` with a check that rejects other expert counts with ``message``."""
    previous = merge.check

    def check(num_experts: int) -> None:
        if not allowed(num_experts):
            raise ConfigError(message.format(n=num_experts))
        previous(num_experts)

    return merge._replace(check=check)
