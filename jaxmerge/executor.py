"""The streaming executor: grouped, batched, jitted merges under a memory budget.

For each group of same-shape leaves the executor stacks a chunk of leaves,
``f32[L, N, *shape]``, and runs one ``jit(vmap(leaf_fn))`` call on it. The chunk
size L comes from the memory budget and is fixed per group (the last chunk is
padded), so every group compiles once. A reader thread fetches the next chunk
while the current one computes, and a writer thread writes results straight to
their place in the output files, so the peak memory is about two chunks of
inputs plus one of outputs, never a whole model.

Whole-model statistics (``Merge.passes``) run first, one streaming pass each,
summing per-leaf partials on the host in 64-bit.

Randomness: the key of expert t on leaf ``name`` is
``fold_in(fold_in(key, crc32(name)), t)``: independent of order, batching and
chunk size, so the same inputs, flags and seed give bit-identical outputs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import time
import zlib
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmerge.algebra import LeafContext, Merge, PyTree, StatsPass
from jaxmerge.errors import JaxmergeError
from jaxmerge.leaves import LeafInfo
from jaxmerge.plan import LeafPlan, Plan, Source

DEFAULT_CHUNK_BYTES = 64 * 2**20
"""Default memory budget for one chunk of stacked inputs and their float32 work arrays.

Small on purpose: on CPU, 64 MiB chunks merged SmolLM2 + 3 experts 1.3–1.5× faster
than 256 MiB ones (cache locality, fewer fresh pages); the batch is still wide
enough to amortise dispatch."""

_WORK_FACTOR = 3
"""float32 working copies a leaf function holds per input, for the budget estimate."""


class NonFiniteError(JaxmergeError):
    """An input tensor holds NaN or infinity."""


def name_hash(name: str) -> int:
    """Stable 32-bit hash of a tensor name (the per-leaf PRNG salt)."""
    return zlib.crc32(name.encode("utf-8"))


def derive_keys(root_key, leaf_hash, num_experts: int):
    """Per-expert keys of one leaf: ``fold_in(fold_in(root_key, leaf_hash), t)``."""
    leaf_key = jax.random.fold_in(root_key, leaf_hash)
    return jax.vmap(lambda t: jax.random.fold_in(leaf_key, t))(jnp.arange(num_experts))


_derive_keys_jit = jax.jit(derive_keys, static_argnums=2)


def leaf_keys(key, name: str, num_experts: int):
    """The per-expert PRNG keys of leaf ``name``, exactly as the executor derives them."""
    return _derive_keys_jit(key, np.uint32(name_hash(name)), num_experts)


@dataclasses.dataclass
class RunReport:
    """Figures of one run."""

    seconds: float = 0.0
    bytes_read: int = 0
    tensors_written: int = 0
    compiled_calls: int = 0
    chunks: int = 0
    read_wait_seconds: float = 0.0
    compute_seconds: float = 0.0
    write_wait_seconds: float = 0.0
    stats: dict = dataclasses.field(default_factory=dict)


def _leaf_context(merge_info: LeafInfo, root_key, leaf_hash, row_offset, base, experts, extras,
                  global_stats, leaf_stats):
    base32 = base.astype(jnp.float32)
    taus = experts.astype(jnp.float32) - base32[None]
    keys = derive_keys(root_key, leaf_hash, experts.shape[0])
    extras32 = {name: value.astype(jnp.float32) for name, value in extras.items()}
    stats = {**global_stats, **leaf_stats}
    return LeafContext(taus, base32, keys, extras32, stats, row_offset, merge_info)


_IN_AXES = (None, 0, 0, 0, 0, 0, None, 0)
"""vmap axes of (key, name hashes, row offsets, base, experts, extras, global stats,
per-leaf stats): everything but the key and the whole-model statistics is per leaf."""


def _finite_flags(base, experts, extras):
    """[1 + N + N·E] bools: base, each expert, each extra input finite?

    Checked on the stored values, before any arithmetic: Σ 0·x is NaN exactly
    when x has a NaN or infinite entry, one fused reduction per input. (Checking
    the float32 task vectors instead made XLA:CPU re-materialise them, ~5 ms per
    SmolLM2 MLP leaf; a max-reduction does not reliably keep NaN.)
    """

    def finite_rows(x):
        return jnp.isfinite(jnp.sum((x.astype(jnp.float32) * 0.0).reshape(x.shape[0], -1),
                                    axis=1))

    flags = [finite_rows(base[None]), finite_rows(experts)]
    flags += [finite_rows(value) for value in extras.values()]
    return jnp.concatenate(flags)


def _compile_apply(merge: Merge, info: LeafInfo, out_dtype):
    def one(*args):
        # Flags first, then a barrier: without it XLA:CPU fuses the flag reductions
        # with the merge's elementwise work into one loop nest that runs ~20× slower
        # (measured: 4.8 ms vs 0.9 ms per 3 × 1536 × 576 leaf for a plain mean).
        flags = _finite_flags(*args[3:6])
        flags, args = lax.optimization_barrier((flags, args))
        ctx = _leaf_context(info, *args)
        delta = merge.apply(ctx.taus, ctx)
        return (ctx.base + delta).astype(out_dtype), flags

    return jax.jit(jax.vmap(one, in_axes=_IN_AXES))


def _compile_pass(stats_pass: StatsPass, info: LeafInfo):
    """Per-item partials for per-leaf passes; their valid-masked sum for global ones."""

    def one(*args):
        ctx = _leaf_context(info, *args)
        return stats_pass.partial(ctx.taus, ctx)

    batched = jax.vmap(one, in_axes=_IN_AXES)
    if stats_pass.per_leaf:
        return jax.jit(lambda valid, *args: batched(*args))

    def summed(valid, *args):
        return jax.tree.map(
            lambda p: jnp.sum(p * valid.reshape((-1,) + (1,) * (p.ndim - 1)).astype(p.dtype),
                              axis=0),
            batched(*args),
        )

    return jax.jit(summed)


@dataclasses.dataclass
class _Chunk:
    leaves: list[LeafPlan]
    size: int  # padded size


class Executor:
    """Runs a :class:`Merge` over a :class:`Plan`, streaming tensors from sources to a sink.

    Args:
      merge: the method.
      plan: from :func:`jaxmerge.plan.build_plan`.
      base, experts, extras: the sources the plan was built from.
      key: root PRNG key (``jax.random.key(seed)``).
      chunk_bytes: memory budget for one chunk of inputs plus float32 work arrays.
      progress: show tqdm progress bars on stderr.
    """

    def __init__(self, merge: Merge, plan: Plan, base: Source, experts: Sequence[Source],
                 extras: Mapping[str, Sequence[Source]] | None = None, *, key=None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, progress: bool = False):
        self.merge = merge
        self.plan = plan
        self.base = base
        self.experts = list(experts)
        self.extras = {name: list(sources) for name, sources in (extras or {}).items()}
        missing = [name for name in merge.extra_inputs if name not in self.extras]
        if missing:
            raise JaxmergeError(f"this method needs per-expert {missing[0]!r} inputs")
        self.extras = {name: self.extras[name] for name in merge.extra_inputs}
        self.key = jax.random.key(0) if key is None else key
        self.chunk_bytes = int(chunk_bytes)
        self.progress = progress
        self.report = RunReport()
        self._compiled: dict = {}
        merge.check(len(self.experts))

    # -- planning chunks ---------------------------------------------------

    def _input_entries(self, leaf: LeafPlan) -> int:
        """Entries read for one leaf (or block): base, experts and their extra inputs."""
        count = math.prod(leaf.info.shape) if leaf.info.shape else 1
        return count * (1 + len(self.experts) * (1 + len(self.extras)))

    def _leaf_bytes(self, leaf: LeafPlan) -> int:
        """Budget estimate: stored inputs plus their float32 working copies."""
        itemsize = self._dtype_of(leaf, self.base).itemsize
        return self._input_entries(leaf) * (itemsize + 4 * _WORK_FACTOR)

    def _chunks(self, applies=None, only_blocks=False) -> list[_Chunk]:
        """Chunks of same-shape leaves within the budget; oversized leaves of
        row-wise merges become row blocks first. ``only_blocks``: just those blocks."""
        chunks = []
        for leaves in self.plan.groups.values():
            if applies is not None:
                leaves = [leaf for leaf in leaves if applies(leaf.info)]
            if not leaves:
                continue
            for group in self._split_oversized(leaves):
                if only_blocks and group[0].block is None:
                    continue
                size = max(1, min(len(group), self.chunk_bytes // max(1, self._leaf_bytes(
                    group[0]))))
                for start in range(0, len(group), size):
                    chunks.append(_Chunk(group[start:start + size], size))
        return chunks

    def _split_oversized(self, leaves: list[LeafPlan]) -> list[list[LeafPlan]]:
        """[leaves], or, for leaves over the budget that can be merged by rows, groups of
        equally shaped row blocks (the last block of each leaf may be shorter)."""
        first = leaves[0]
        leaf_bytes = self._leaf_bytes(first)
        rows = first.info.shape[0] if first.info.shape else 1
        if leaf_bytes <= self.chunk_bytes or rows < 2 or not self.merge.rowwise(first.info):
            return [leaves]
        rows_per_block = max(1, self.chunk_bytes // (leaf_bytes // rows))
        by_shape: dict[tuple, list[LeafPlan]] = {}
        for leaf in leaves:
            for block in leaf.row_blocks(rows_per_block):
                by_shape.setdefault(block.info.shape, []).append(block)
        return list(by_shape.values())

    # -- reading -----------------------------------------------------------

    def _dtype_of(self, leaf: LeafPlan, source: Source) -> np.dtype:
        return source.entries()[leaf.name][0]

    def _read_chunk(self, chunk: _Chunk):
        first = chunk.leaves[0]
        shape = first.info.shape
        n = len(self.experts)
        base_dtype = self._dtype_of(first, self.base)
        base = np.zeros((chunk.size, *shape), base_dtype)
        experts = np.zeros((chunk.size, n, *shape), base_dtype)
        extras = {
            name: np.zeros((chunk.size, n, *shape), self._dtype_of(first, sources[0]))
            for name, sources in self.extras.items()
        }
        for i, leaf in enumerate(chunk.leaves):
            rows = leaf.read_rows
            self.base.read(leaf.name, base[i], rows)
            for t, expert in enumerate(self.experts):
                expert.read(leaf.name, experts[i, t], rows)
            for name, sources in self.extras.items():
                for t, source in enumerate(sources):
                    source.read(leaf.name, extras[name][i, t], rows)
        hashes = np.zeros(chunk.size, np.uint32)
        hashes[: len(chunk.leaves)] = [name_hash(leaf.name) for leaf in chunk.leaves]
        offsets = np.zeros(chunk.size, np.int32)
        offsets[: len(chunk.leaves)] = [leaf.block[0] if leaf.block else 0
                                        for leaf in chunk.leaves]
        nbytes = base.nbytes + experts.nbytes + sum(v.nbytes for v in extras.values())
        nbytes = nbytes * len(chunk.leaves) // chunk.size
        return (hashes, offsets, base, experts, extras), nbytes

    def _stream(self, chunks: list[_Chunk], description: str):
        """Yields (chunk, arrays) with the next chunk's read running in the background."""
        total = sum(self._chunk_input_bytes(chunk) for chunk in chunks)
        bar = _progress_bar(total, description, self.progress)
        tensors = len({leaf.name for chunk in chunks for leaf in chunk.leaves})
        finished: set[str] = set()
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxmerge-read") as pool:
            pending = pool.submit(self._read_chunk, chunks[0]) if chunks else None
            for index, chunk in enumerate(chunks):
                waited = time.perf_counter()
                arrays = pending.result()
                self.report.read_wait_seconds += time.perf_counter() - waited
                pending = pool.submit(self._read_chunk, chunks[index + 1]) if index + 1 < len(
                    chunks) else None
                arrays, nbytes = arrays
                self.report.bytes_read += nbytes
                yield chunk, arrays
                finished.update(leaf.name for leaf in chunk.leaves)
                bar.set_postfix_str(f"{len(finished)}/{tensors} tensors, {chunk.leaves[-1].name}",
                                    refresh=False)
                bar.update(nbytes)
        bar.close()

    def _chunk_input_bytes(self, chunk: _Chunk) -> int:
        return sum(self._input_entries(leaf) * self._dtype_of(leaf, self.base).itemsize
                   for leaf in chunk.leaves)

    # -- running -------------------------------------------------------------

    def _compiled_fn(self, kind, chunk: _Chunk, factory):
        info = chunk.leaves[0].info
        key = (kind, info.group_key(), self.merge.choose(info), chunk.leaves[0].out_dtype.str,
               chunk.leaves[0].out_dtype.name)
        if key not in self._compiled:
            self._compiled[key] = factory(info)
            self.report.compiled_calls += 1
        return self._compiled[key]

    def compute_stats(self) -> dict:
        """Runs every statistics pass, in order.

        Returns {pass id: statistic} for whole-model passes and
        {pass id: {leaf name: statistic}} for per-leaf ones.
        """
        stats: dict = {}
        for number, stats_pass in enumerate(self.merge.passes, start=1):
            # Per-leaf statistics are only needed by leaves merged in row blocks.
            chunks = self._chunks(stats_pass.applies, only_blocks=stats_pass.per_leaf)
            if stats_pass.per_leaf and not chunks:
                stats[stats_pass.id] = _PerLeaf()
                continue
            label = f"pass {number}/{len(self.merge.passes)}: {stats_pass.description}"
            totals = self._pass_totals(stats_pass, chunks, label, stats)
            if not totals:
                raise JaxmergeError(f"statistics pass {stats_pass.description!r} saw no tensor")
            if stats_pass.per_leaf:
                stats[stats_pass.id] = _PerLeaf({
                    name: stats_pass.finalize(total, self._leaf_view(stats, name))
                    for name, total in totals.items()})
            else:
                stats[stats_pass.id] = stats_pass.finalize(totals[None], stats)
        self.report.stats = stats
        return stats

    def _pass_totals(self, stats_pass: StatsPass, chunks: list[_Chunk], label: str,
                     stats: dict) -> dict:
        """Streams ``chunks`` through one pass: {leaf name: summed partials} for per-leaf
        passes (row blocks of one leaf summed), {None: sum over every leaf} otherwise."""
        totals: dict = {}
        for chunk, arrays in self._stream(chunks, label):
            fn = self._compiled_fn(("pass", stats_pass.id), chunk,
                                   lambda info, p=stats_pass: _compile_pass(p, info))
            valid = np.arange(chunk.size) < len(chunk.leaves)
            partial = jax.tree.map(_widen, fn(valid, *self._call_args(chunk, arrays, stats)))
            if stats_pass.per_leaf:
                for i, leaf in enumerate(chunk.leaves):
                    item = jax.tree.map(lambda p, i=i: p[i], partial)
                    _accumulate(totals, leaf.name, item)
            else:
                _accumulate(totals, None, partial)
            self.report.chunks += 1
        return totals

    def measure(self, stats_pass: StatsPass, label: str | None = None) -> dict[str, PyTree]:
        """Runs one per-leaf statistics pass over *every* leaf it applies to.

        Unlike a merge's own per-leaf passes (run only for row blocks), this streams
        the whole plan, one compiled call per shape group, and returns
        {leaf name: finalize(summed partials)}: the diagnostics' entry point.
        Leaves are split into row blocks when they exceed the budget and the
        executor's merge is row-wise for them; the block partials are summed.
        """
        if not stats_pass.per_leaf:
            raise JaxmergeError("measure() needs a per-leaf statistics pass")
        chunks = self._chunks(stats_pass.applies)
        totals = self._pass_totals(stats_pass, chunks, label or stats_pass.description, {})
        return {name: stats_pass.finalize(total, {}) for name, total in totals.items()}

    @staticmethod
    def _leaf_view(stats: dict, name: str) -> dict:
        """The statistics one leaf sees: whole-model values and its per-leaf values."""
        return {key: value[name] if isinstance(value, _PerLeaf) else value
                for key, value in stats.items()}

    def _call_args(self, chunk: _Chunk, arrays, stats: dict) -> tuple:
        """Arguments of a compiled call: per-leaf statistics stacked over the chunk."""
        hashes, offsets, base, experts, extras = arrays
        global_stats = {key: jax.tree.map(np.asarray, value) for key, value in stats.items()
                        if not isinstance(value, _PerLeaf)}
        names = [leaf.name for leaf in chunk.leaves]
        names += [names[0]] * (chunk.size - len(names))  # padding repeats the first leaf
        leaf_stats = {
            key: jax.tree.map(lambda *items: np.stack([np.asarray(i) for i in items]),
                              *[value[name] for name in names])
            for key, value in stats.items() if isinstance(value, _PerLeaf)
            and all(name in value for name in names)
        }
        return (self.key, hashes, offsets, base, experts, extras, global_stats, leaf_stats)

    def run(self, write) -> RunReport:
        """Merges every tensor and hands it to ``write(name, array, rows=None)``."""
        start = time.perf_counter()
        stats = self.compute_stats()
        aliases: dict[str, list[str]] = {}
        for leaf in self.plan.leaves:
            if leaf.alias_of is not None:
                aliases.setdefault(leaf.alias_of, []).append(leaf.name)

        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxmerge-write") as pool:
            pending = None
            for chunk, arrays in self._stream(self._chunks(), "merge"):
                out_dtype = chunk.leaves[0].out_dtype
                fn = self._compiled_fn("apply", chunk,
                                       lambda info, d=out_dtype: _compile_apply(self.merge, info,
                                                                                d))
                computed = time.perf_counter()
                merged, finite = fn(*self._call_args(chunk, arrays, stats))
                self._check_finite(chunk, np.asarray(finite))
                merged = np.asarray(merged)
                waited = time.perf_counter()
                self.report.compute_seconds += waited - computed
                if pending is not None:
                    pending.result()
                self.report.write_wait_seconds += time.perf_counter() - waited
                pending = pool.submit(self._write_chunk, write, chunk, merged, aliases)
                self.report.chunks += 1
            if pending is not None:
                pending.result()
            for leaf in self.plan.leaves:
                if leaf.copy:
                    self._copy_from_base(write, leaf)
                elif leaf.merged and leaf.tail is not None:
                    for name in [leaf.name, *aliases.get(leaf.name, [])]:
                        self._write_tail(write, name, leaf)
        self.report.seconds = time.perf_counter() - start
        return self.report

    def _write_chunk(self, write, chunk: _Chunk, merged: np.ndarray, aliases) -> None:
        for i, leaf in enumerate(chunk.leaves):
            for name in [leaf.name, *aliases.get(leaf.name, [])]:
                write(name, merged[i], leaf.read_rows)
                if leaf.block is None or leaf.block[1] == (leaf.rows or leaf.out_shape[0]):
                    self.report.tensors_written += 1

    def _write_tail(self, write, name: str, leaf: LeafPlan) -> None:
        source = [self.base, *self.experts][leaf.tail]
        rows = (leaf.rows, leaf.out_shape[0])
        tail = np.empty((rows[1] - rows[0], *leaf.out_shape[1:]), source.entries()[leaf.name][0])
        source.read(leaf.name, tail, rows)
        write(name, tail.astype(leaf.out_dtype), rows)

    def _copy_from_base(self, write, leaf: LeafPlan) -> None:
        dtype, shape = self.base.entries()[leaf.name]
        value = np.empty(shape, dtype)
        self.base.read(leaf.name, value)
        write(leaf.name, value)
        self.report.tensors_written += 1

    def _check_finite(self, chunk: _Chunk, finite: np.ndarray) -> None:
        if finite.all():
            return
        owners = [self.base, *self.experts] + [s for sources in self.extras.values()
                                               for s in sources]
        for i, leaf in enumerate(chunk.leaves):
            bad = np.flatnonzero(~finite[i])
            if bad.size:
                source = owners[bad[0]]
                raise NonFiniteError(
                    f"tensor {leaf.name!r} in {source.location(leaf.name)} contains NaN or "
                    "infinite values"
                )


def _widen(value):
    value = np.asarray(value)
    if np.issubdtype(value.dtype, np.integer) or value.dtype == np.bool_:
        return value.astype(np.int64)
    return value.astype(np.float64)


class _PerLeaf(dict):
    """{leaf name: statistic} of a per-leaf statistics pass."""


def _accumulate(totals: dict, key, partial) -> None:
    if key in totals:
        totals[key] = jax.tree.map(np.add, totals[key], partial)
    else:
        totals[key] = partial


class _NoBar:
    def update(self, n):
        pass

    def set_postfix_str(self, *args, **kwargs):
        pass

    def close(self):
        pass


def _progress_bar(total: int, description: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024,
                dynamic_ncols=True, leave=True)
