"""The streaming executor: grouped, batched, jitted merges under a memory budget.

For each group of same-shape leaves the executor stacks a chunk of leaves,
``f32[L, N, *shape]``, and runs one ``jit(vmap(leaf_fn))`` call on it. The chunk
size L comes from the memory budget and is fixed per group (the last chunk is
padded), so every group compiles once. A reader thread fetches the next chunk
while the current one computes, and a writer thread writes results straight to
their place in the output files, so the peak memory is a few chunks of inputs plus
one of outputs, never a whole model. On a multi-core CPU two chunk calls compute at
once, each on its own thread, with single-threaded LAPACK (:mod:`jaxmerge.cpu_threads`).

Whole-model statistics (``Merge.passes``) run first, one streaming pass each,
summing per-leaf partials on the host in 64-bit.

Merges that give the same values on a flattened leaf (``Merge.flat``) take leaves
of one size, whatever their shape, in one program; large leaves of such a merge that
is also row-wise and needs no statistic are cut into segments of one entry count
first (:attr:`Executor.segment_entries`), and its small leaves zero-padded into one,
so one program serves them all. A per-leaf statistic that the call can count itself
(``StatsPass.in_call``: DARE-TIES's majority sign) needs no pass: a leaf's pieces
(segments, row blocks) go to one call, which sums the count over them; a leaf larger
than a call gets the count of its pieces in other calls from a pass over it alone.

Over a device mesh (``mesh=``; see :mod:`jaxmerge.distributed`) the chunk budget is
per device and each chunk takes one of two strategies: *leaf-parallel*, the stacked
leaves (or row blocks) split over the devices, each running the one-device program
under ``shard_map``; or *row-sharded*, one leaf too large for a device whose merge is
not row-wise, split by rows, with XLA partitioning the program. Every process reads
only its devices' slices and hands only its devices' results to ``write``.

Randomness: the key of expert t on leaf ``name`` is
``fold_in(fold_in(key, crc32(name)), t)``: independent of order, batching and
chunk size, so the same inputs, flags and seed give bit-identical outputs.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import math
import threading
import time
import zlib
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from jaxmerge import cpu_threads, distributed, hashing
from jaxmerge.algebra import LeafContext, Merge, PyTree, StatsPass
from jaxmerge.errors import JaxmergeError
from jaxmerge.leaves import LeafInfo
from jaxmerge.plan import LeafPlan, Plan, Source
from jaxmerge.programs import ProgramCache, abstract_arguments

DEFAULT_CHUNK_BYTES = 64 * 2**20
"""Default memory budget for one chunk of stacked inputs and their float32 work arrays.

Small on purpose: on CPU, 64 MiB chunks merged SmolLM2 + 3 experts 1.3–1.5× faster
than 256 MiB ones (cache locality, fewer fresh pages); the batch is still wide
enough to amortise dispatch."""

_WORK_FACTOR = 3
"""float32 working copies a leaf function holds per input, for the budget estimate."""

SEGMENT_MIN_ENTRIES = 1 << 16
"""Smallest segment (see :meth:`Executor.segment_entries`): below this, per-call costs
would outweigh one compiled program fewer."""


class NonFiniteError(JaxmergeError):
    """An input tensor holds NaN or infinity."""


def name_hash(name: str) -> int:
    """Stable 32-bit hash of a tensor name (the per-leaf PRNG salt)."""
    return zlib.crc32(name.encode("utf-8"))


def derive_keys(root_key, leaf_hash, num_experts: int):
    """Per-expert keys of one leaf: ``fold_in(fold_in(root_key, leaf_hash), t)``, with
    :func:`jaxmerge.hashing.fold_in`."""
    leaf_key = hashing.fold_in(root_key, leaf_hash)
    return jax.vmap(lambda t: hashing.fold_in(leaf_key, t))(jnp.arange(num_experts))


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
    devices: int = 1
    leaf_parallel_chunks: int = 0
    row_sharded_chunks: int = 0
    settled_passes: int = 0
    """Statistics (per-leaf: one per leaf) that earlier passes settled, with nothing read."""
    in_call_leaves: int = 0
    """Leaves merged in pieces (segments, row blocks) of one call that summed their
    per-leaf statistic there (:attr:`~jaxmerge.algebra.StatsPass.in_call`): no pass."""
    stats: dict = dataclasses.field(default_factory=dict)


def balanced_block_rows(rows: int, max_rows: int) -> int:
    """Rows per block when ``rows`` are cut into blocks of at most ``max_rows``.

    Blocks of one shape share one compiled call: the largest block size dividing
    ``rows`` with at most twice the fewest blocks, else near-equal blocks (the last
    one shorter). E.g. 49152 rows, at most 2080: 24 blocks of 2048, not 23 of
    2080 and one of 1312 (a second compiled shape, ~60 ms per call kind).
    """
    fewest = -(-rows // max_rows)
    for count in range(fewest, min(2 * fewest, rows) + 1):
        if rows % count == 0:
            return rows // count
    return -(-rows // fewest)


def _leaf_context(merge_info: LeafInfo, root_key, leaf_hash, row_offset, base, experts, extras,
                  global_stats, leaf_stats, leaf_sum=None):
    base32 = base.astype(jnp.float32)
    taus = experts.astype(jnp.float32) - base32[None]
    keys = functools.partial(derive_keys, root_key, leaf_hash, experts.shape[0])  # where used
    extras32 = {name: value.astype(jnp.float32) for name, value in extras.items()}
    stats = {**global_stats, **leaf_stats}
    return LeafContext(taus, base32, keys, extras32, stats, row_offset, merge_info, leaf_sum)


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


def _apply_one(merge: Merge, info: LeafInfo, out_dtype, pieces: bool = False):
    """One slot's merge: ``(merged, finiteness flags)``. With ``pieces`` (vmapped over
    :data:`_SLOTS`) the last two arguments are the slot's leaf id and the sum of the
    partials of its leaf's pieces outside the call (:meth:`_Chunk.leaf_ids`), and
    ``ctx.leaf_total`` sums over the slots of the same leaf, plus that."""

    def one(*args):
        leaf_sum = None
        if pieces:
            *args, leaf_id, outside = args
            leaf_sum = _leaf_sum_over_slots(leaf_id, outside)
        # Flags first, then a barrier: without it XLA:CPU fuses the flag reductions
        # with the merge's elementwise work into one loop nest that runs ~20× slower
        # (measured: 4.8 ms vs 0.9 ms per 3 × 1536 × 576 leaf for a plain mean).
        flags = _finite_flags(*args[3:6])
        flags, args = lax.optimization_barrier((flags, args))
        ctx = _leaf_context(info, *args, leaf_sum=leaf_sum)
        delta = merge.apply(ctx.taus, ctx)
        return (ctx.base + delta).astype(out_dtype), flags

    return one


_SLOTS = "slots"
"""The vmapped axis of a chunk call's slots, named so that pieces of a leaf can sum."""


def _leaf_sum_over_slots(leaf_id, outside):
    """``ctx.leaf_sum`` inside a call vmapped over :data:`_SLOTS`: an int32 count summed
    over the slots whose leaf id is ``leaf_id``'s, plus ``outside`` (int32, exact)."""

    def leaf_sum(value):
        value = jnp.asarray(value)
        if value.shape or value.dtype != jnp.int32:
            raise JaxmergeError("ctx.leaf_total takes one int32 count per piece, got "
                                f"{value.dtype}{list(value.shape)}")
        same = lax.all_gather(leaf_id, _SLOTS) == leaf_id
        parts = lax.all_gather(value, _SLOTS)
        return jnp.sum(jnp.where(same, parts, 0), dtype=jnp.int32) + outside

    return leaf_sum


def _compile_apply(merge: Merge, info: LeafInfo, out_dtype):
    return jax.jit(jax.vmap(_apply_one(merge, info, out_dtype), in_axes=_IN_AXES))


def _compile_apply_pieces(merge: Merge, info: LeafInfo, out_dtype):
    """The call of an ``in_call`` chunk: slots may hold several pieces of one leaf."""
    return jax.jit(jax.vmap(_apply_one(merge, info, out_dtype, pieces=True),
                            in_axes=(*_IN_AXES, 0, 0), axis_name=_SLOTS))


def _pass_one(stats_pass: StatsPass, info: LeafInfo):
    def one(*args):
        ctx = _leaf_context(info, *args)
        return stats_pass.partial(ctx.taus, ctx)

    return one


def _masked_sum(valid, partials):
    return jax.tree.map(
        lambda p: jnp.sum(p * valid.reshape((-1,) + (1,) * (p.ndim - 1)).astype(p.dtype),
                          axis=0),
        partials,
    )


def _pass_call(stats_pass: StatsPass, info: LeafInfo, key_impl=None):
    """``(valid, key, *arrays)`` -> per-item partials (per-leaf passes), or the sum of the
    valid items' partials with a leading axis of 1 (whole-model passes; the host sums
    those in 64 bits). With ``key_impl`` the key arrives as raw key data."""
    batched = jax.vmap(_pass_one(stats_pass, info), in_axes=_IN_AXES)
    if key_impl is not None:
        batched = _with_key(batched, key_impl)

    def call(valid, *args):
        partials = batched(*args)
        if stats_pass.per_leaf:
            return partials
        return jax.tree.map(lambda p: p[None], _masked_sum(valid, partials))

    return call


def _compile_pass(stats_pass: StatsPass, info: LeafInfo):
    return jax.jit(_pass_call(stats_pass, info))


def _with_key(fn, key_impl):
    """``fn(key, ...)`` taking raw key data instead (global arrays carry no typed keys)."""

    def call(key_data, *args):
        return fn(jax.random.wrap_key_data(key_data, impl=key_impl), *args)

    return call


LEAVES = "leaves"
"""Leaf-parallel strategy: a chunk's stacked leaves (or row blocks) split over the devices."""

ROWS = "rows"
"""Intra-leaf strategy: one leaf, sharded by rows over every device; XLA partitions the merge."""


def _over_leaves(fn, mesh, strategy: str, out_specs, *, valid: bool = False):
    """``fn`` of ([valid,] key data, *per-leaf arrays, global stats, per-leaf stats) over
    the mesh.

    Leaf-parallel: under ``shard_map`` over the chunk axis, so each device runs the
    one-device program on its own leaves, without communication. Row-sharded: as it is,
    for XLA to partition over the rows of its sharded inputs.
    """
    if strategy != LEAVES:
        return fn
    split, whole = PartitionSpec(tuple(mesh.axis_names)), PartitionSpec()
    # key, hashes, offsets, base, experts, extras, global stats, per-leaf stats
    in_specs = (whole, split, split, split, split, split, whole, split)
    if valid:
        in_specs = (split, *in_specs)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def _compile_apply_global(merge: Merge, info: LeafInfo, out_dtype, mesh, strategy: str,
                          key_impl):
    """The apply call of one chunk over a mesh: merged values sharded like the inputs
    (by leaf or by row), finiteness flags replicated (every process sees every flag)."""
    batched = _with_key(jax.vmap(_apply_one(merge, info, out_dtype), in_axes=_IN_AXES), key_impl)
    split = PartitionSpec(tuple(mesh.axis_names))
    fn = _over_leaves(batched, mesh, strategy, (split, split))
    out_dim = 0 if strategy == LEAVES else 1
    merged = NamedSharding(mesh, distributed.split_spec(mesh, out_dim, 1 + len(info.shape)))
    return jax.jit(fn, out_shardings=(merged, distributed.replicated(mesh)))


def _compile_pass_global(stats_pass: StatsPass, info: LeafInfo, mesh, strategy: str, key_impl):
    """A statistics pass over a mesh (see :func:`_pass_call`), its result replicated so
    that every process gets it. Leaf-parallel, the leading axis of a whole-model sum
    has one entry per device (each device sums its own leaves, so int32 counts never
    cover more than one device's chunk); row-sharded, XLA reduces across devices."""
    split = PartitionSpec(tuple(mesh.axis_names))
    fn = _over_leaves(_pass_call(stats_pass, info, key_impl), mesh, strategy, split, valid=True)
    return jax.jit(fn, out_shardings=distributed.replicated(mesh))


@dataclasses.dataclass
class _Chunk:
    """The leaves of one compiled call, by position (slot) along the stacked chunk axis.

    ``slots`` has the chunk's fixed size; None marks padding. ``strategy``: None on one
    device, LEAVES or ROWS over a mesh. ``flat``: the leaves (of one size, any shapes)
    are merged flattened to one dimension (see :attr:`Merge.flat`). ``in_call``: pieces
    of leaves whose per-leaf statistic (:attr:`Executor.in_call_pass`) is summed in the
    call over the pieces of each leaf in it, plus those of its pieces in other chunks.
    """

    slots: list[LeafPlan | None]
    strategy: str | None = None
    flat: bool = False
    in_call: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of each leaf as the compiled call sees it."""
        first = self.leaves[0]
        return (_slot_entries(first),) if self.flat else first.info.shape

    @property
    def size(self) -> int:
        return len(self.slots)

    @property
    def leaves(self) -> list[LeafPlan]:
        return [leaf for leaf in self.slots if leaf is not None]

    def ids(self) -> tuple[np.ndarray, np.ndarray]:
        """Per slot: the leaf's name hash (PRNG salt) and first row (0 for padding), as the
        compiled call counts rows: a flat chunk's rows are single entries, so a block of
        it (a segment) starts at its first row times the entries per row."""
        hashes = np.array([name_hash(leaf.name) if leaf else 0 for leaf in self.slots],
                          np.uint32)
        offsets = np.array([_first_row(leaf, self.flat) for leaf in self.slots], np.int32)
        return hashes, offsets

    def leaf_ids(self) -> np.ndarray:
        """Per slot: the first slot holding a piece of the same leaf (padding: itself)."""
        first: dict[str, int] = {}
        return np.array([first.setdefault(leaf.name, i) if leaf else i
                         for i, leaf in enumerate(self.slots)], np.int32)


def _slot_entries(leaf: LeafPlan) -> int:
    """The entries a (piece of a) leaf takes in a flat chunk: its own, or a padded slot's."""
    return leaf.padded or math.prod(leaf.info.shape)


def _leaf_view(slot: np.ndarray, leaf: LeafPlan, zero_padding: bool = False) -> np.ndarray:
    """The leaf's values in its chunk slot, in its shape (a flat slot reshaped), for an
    input buffer (``zero_padding``: a padded slot's entries after the leaf's are
    zeroed, since buffers are reused) or a result."""
    if leaf.padded is None:
        return slot.reshape(leaf.info.shape)
    flat = slot.reshape(-1)
    size = math.prod(leaf.info.shape)
    if zero_padding:
        flat[size:] = 0
    return flat[:size].reshape(leaf.info.shape)


def _covers(pieces: list[LeafPlan]) -> bool:
    """Whether ``pieces`` (of one leaf) are all of it: the whole leaf, or row blocks
    whose rows add up to its merged rows."""
    if pieces[0].block is None:
        return len(pieces) == 1
    rows = sum(piece.block[1] - piece.block[0] for piece in pieces)
    return rows == (pieces[0].rows or pieces[0].out_shape[0])


def _in_slots(leaves: list[LeafPlan], size: int) -> list[list[LeafPlan | None]]:
    """``leaves`` in order, ``size`` slots a chunk, the last chunk padded with None."""
    return [leaves[start:start + size] + [None] * (start + size - len(leaves))
            for start in range(0, len(leaves), size)]


def _packed(leaves: list[list[LeafPlan]], size: int) -> list[list[LeafPlan | None]]:
    """Slots of chunks holding each leaf's pieces together, ``leaves`` each at most
    ``size`` pieces: first-fit decreasing into chunks of one size between ``size`` / 2
    and ``size``, the size that leaves the fewest padding slots (then the largest), since
    every chunk of a program has the same number of slots. Deterministic."""
    if not leaves:
        return []
    largest = max(len(pieces) for pieces in leaves)
    order = sorted(range(len(leaves)), key=lambda i: -len(leaves[i]))  # stable

    def bins(capacity: int) -> list[list[LeafPlan]]:
        filled: list[list[LeafPlan]] = []
        for i in order:
            target = next((b for b in filled if len(b) + len(leaves[i]) <= capacity), None)
            if target is None:
                target = []
                filled.append(target)
            target.extend(leaves[i])
        return filled

    options = [(len(bins(capacity)) * capacity, -capacity)
               for capacity in range(max(largest, (size + 1) // 2), size + 1)]
    capacity = -min(options)[1]
    return [chunk + [None] * (capacity - len(chunk)) for chunk in bins(capacity)]


def _first_row(leaf: LeafPlan | None, flat: bool) -> int:
    if leaf is None or leaf.block is None:
        return 0
    return leaf.block[0] * (math.prod(leaf.info.shape[1:]) if flat else 1)


def _spread(leaves: list[LeafPlan], devices: int, per_device: int) -> list[LeafPlan | None]:
    """Slots of a leaf-parallel chunk: leaf i on device i mod D, so a short chunk's padding
    is spread over the devices (and the processes) instead of piling up on the last."""
    slots: list[LeafPlan | None] = [None] * (devices * per_device)
    for i, leaf in enumerate(leaves):
        slots[(i % devices) * per_device + i // devices] = leaf
    return slots


class Executor:
    """Runs a :class:`Merge` over a :class:`Plan`, streaming tensors from sources to a sink.

    Args:
      merge: the method.
      plan: from :func:`jaxmerge.plan.build_plan`.
      base, experts, extras: the sources the plan was built from.
      key: root PRNG key (``jax.random.key(seed)``).
      chunk_bytes: memory budget for one chunk of inputs plus float32 work arrays, per
        device.
      progress: show tqdm progress bars on stderr.
      mesh: a :class:`jax.sharding.Mesh` to run over (see :mod:`jaxmerge.distributed`);
        None or a one-device mesh: the default device, as before. On several processes
        every process builds the same executor and runs it; each reads and writes only
        what its own devices hold.
      programs: a :class:`jaxmerge.programs.ProgramCache` naming this merge: one-device
        programs are loaded from it, or traced and stored there for later runs.
      compute_threads: chunk calls run at once, each from its own thread, each holding
        one more chunk of inputs (None: :func:`jaxmerge.cpu_threads.default_compute_threads`,
        2 on a multi-core CPU, else 1; a mesh always runs one). With more than one, on
        the CPU, the BLAS library behind LAPACK gets ``cores // compute_threads`` threads
        from the first call after LAPACK is loaded. Results do not depend on it.
    """

    def __init__(self, merge: Merge, plan: Plan, base: Source, experts: Sequence[Source],
                 extras: Mapping[str, Sequence[Source]] | None = None, *, key=None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, progress: bool = False, mesh=None,
                 programs: ProgramCache | None = None, compute_threads: int | None = None):
        self.merge = merge
        self.programs = programs
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
        self._compiled_lock = threading.Lock()
        self._buffers = HostBuffers()
        self._lapack_limit: cpu_threads.LapackThreadLimit | None = None
        self.mesh = mesh if mesh is not None and mesh.devices.size > 1 else None
        self._devices = 1 if self.mesh is None else int(self.mesh.devices.size)
        self._process, self._processes = distributed.process_rank(self.mesh)
        self.report.devices = self._devices
        self.in_call_pass = self._summed_in_call()
        if compute_threads is not None and int(compute_threads) < 1:
            raise JaxmergeError(f"compute threads must be >= 1, got {compute_threads}")
        self.compute_threads = (
            1 if self.mesh is not None
            else cpu_threads.default_compute_threads(jax.default_backend())
            if compute_threads is None else int(compute_threads))
        merge.check(len(self.experts))

    # -- planning chunks ---------------------------------------------------

    def _summed_in_call(self) -> StatsPass | None:
        """The per-leaf statistic that calls of pieces sum themselves
        (:attr:`~jaxmerge.algebra.StatsPass.in_call`): the merge's last pass, when it is
        per leaf and ``in_call``, on one device. (The last: no later pass reads it, since a
        pass's call could not sum it over a leaf's pieces.)"""
        passes = self.merge.passes
        if (self.mesh is None and passes and passes[-1].per_leaf and passes[-1].in_call
                and all(math.prod(leaf.info.shape) < 2**31  # (int32 counts)
                        for leaf in self.plan.leaves)):
            return passes[-1]
        return None

    @property
    def _streamed_passes(self) -> list[StatsPass]:
        """The statistics passes run over whole leaves before the merge: all but the one
        summed in the call (which only runs over leaves too large for one call)."""
        return [stats_pass for stats_pass in self.merge.passes
                if stats_pass is not self.in_call_pass]

    def _passes_over(self, info: LeafInfo) -> list[StatsPass]:
        """The statistics passes that run over all of ``info``'s leaf."""
        return [stats_pass for stats_pass in self._streamed_passes if stats_pass.applies(info)]

    def _sums_in_call(self, group: list[LeafPlan]) -> bool:
        """Whether a group's calls sum the in-call statistic: its leaves are read in pieces
        (row blocks, segments), which a whole-leaf computation in the call would not see.
        (Leaves of a group share their routing choice, so the pass applies to all or none.)"""
        return (self.in_call_pass is not None and self.in_call_pass.applies(group[0].info)
                and any(leaf.block is not None for leaf in group))

    def _input_entries(self, leaf: LeafPlan, padded: bool = False) -> int:
        """Entries read for one leaf (or block): base, experts and their extra inputs
        (``padded``: the entries of its padded slot instead, see :meth:`_padded`)."""
        count = _slot_entries(leaf) if padded else math.prod(leaf.info.shape)
        return count * (1 + len(self.experts) * (1 + len(self.extras)))

    def _leaf_bytes(self, leaf: LeafPlan) -> int:
        """Budget estimate: stored inputs plus their float32 working copies."""
        itemsize = self._dtype_of(leaf, self.base).itemsize
        return self._input_entries(leaf, padded=True) * (itemsize + 4 * _WORK_FACTOR)

    def _chunks(self, applies=None, only_blocks=False, flatten=True) -> list[_Chunk]:
        """Chunks of same-shape leaves within the budget; oversized leaves of
        row-wise merges become row blocks first. ``applies``: only the leaves (or blocks)
        a statistics pass covers; ``only_blocks``: just the blocks; ``flatten``: group
        the leaves a flat merge takes flattened by size (:meth:`_flattens`), the ones
        it may cut into segments first (:meth:`_segments`).

        Leaves are split into blocks before ``applies`` filters them, so that a pass
        sees exactly the blocks the merge will see."""
        chunks = []
        for leaves, flat in self._routed_groups(flatten):
            for group in self._split_oversized(leaves):
                if applies is not None:
                    group = [leaf for leaf in group if applies(leaf.info)]
                if not group or (only_blocks and group[0].block is None):
                    continue
                if applies is None and self._sums_in_call(group):
                    chunks.extend(dataclasses.replace(chunk, flat=flat)
                                  for chunk in self._in_call_chunks(group))
                else:
                    chunks.extend(dataclasses.replace(chunk, flat=flat)
                                  for chunk in self._group_chunks(group))
        return chunks

    def _routed_groups(self, flatten: bool) -> list[tuple[list[LeafPlan], bool]]:
        """(leaves, flat) groups: the plan's shape groups split further by the merge's
        static routing choice (a compiled call applies one choice to every leaf of its
        chunk); with ``flatten``, the leaves the merge takes flattened grouped by size
        instead of shape, whatever their shape or module family."""
        groups: dict = {}
        for shape_key, leaves in self.plan.groups.items():
            for leaf in leaves:
                choice = self.merge.choose(leaf.info)
                for piece in self._segments(leaf) if flatten else [leaf]:
                    flat = flatten and self._flattens(piece)
                    key = ((_slot_entries(piece), piece.info.dtype, choice) if flat
                           else (shape_key, choice))
                    groups.setdefault((flat, key), []).append(piece)
        return [(leaves, flat) for (flat, _), leaves in groups.items()]

    def _segmentable(self, leaf: LeafPlan, padding: bool = False) -> bool:
        """Whether ``leaf`` may be merged in flat segments: one device, a merge that is
        flat and row-wise there with no statistics pass over it but one summed in the call
        (a segment's values are then those of its entries in the whole flattened leaf;
        DARE-TIES's majority sign summed over the segments of the leaf), and a size whose
        entry offsets fit the int32 the compiled call takes (``padding``: of any size,
        to be padded into a segment)."""
        info = leaf.info
        size = math.prod(info.shape)
        return (self.mesh is None and info.ndim >= 1
                and (padding or SEGMENT_MIN_ENTRIES <= size) and size < 2**31
                and self.merge.flat(info) and self.merge.rowwise(info)
                and not self._passes_over(info))

    @functools.cached_property
    def segment_entries(self) -> int | None:
        """The entries of one segment: leaves that :meth:`_segmentable` allows and whose
        rows tile it are cut into row blocks of this many entries, merged flattened, so
        that leaves of different shapes and sizes share one compiled program (XLA:CPU
        takes 0.05–0.4 s to compile each; SmolLM2 has 4 sizes of large leaves, all
        multiples of 110,592 entries). None: no segments.

        The greatest common divisor of the candidate sizes, most frequent first, skipping
        a size that would take it below :data:`SEGMENT_MIN_ENTRIES`; then cut (by its
        smallest divisor that fits) to the chunk budget.
        """
        candidates = [leaf for leaves in self.plan.groups.values() for leaf in leaves
                      if self._segmentable(leaf)]
        sizes = collections.Counter(math.prod(leaf.info.shape) for leaf in candidates)
        entries = 0
        for size, _ in sizes.most_common():
            if math.gcd(entries, size) >= SEGMENT_MIN_ENTRIES:
                entries = math.gcd(entries, size)
        if not entries:
            return None
        per_entry = max(self._leaf_bytes(leaf) / math.prod(leaf.info.shape)
                        for leaf in candidates)
        for parts in range(1, entries // SEGMENT_MIN_ENTRIES + 1):
            if entries % parts == 0 and entries // parts * per_entry <= self.chunk_bytes:
                return entries // parts
        return None

    def _segments(self, leaf: LeafPlan) -> list[LeafPlan]:
        """``leaf`` as row blocks of :attr:`segment_entries` entries each, when it may be
        segmented and its rows tile them; a small leaf padded into one (:attr:`_padded_leaves`);
        else ``[leaf]``."""
        entries = self.segment_entries
        if leaf.name in self._padded_leaves:
            return [dataclasses.replace(leaf, padded=entries)]
        if entries is None or not self._segmentable(leaf):
            return [leaf]
        size = math.prod(leaf.info.shape)
        row = size // leaf.info.shape[0]
        if entries % row or size % entries or size == entries:
            return [leaf]
        return leaf.row_blocks(entries // row)

    @functools.cached_property
    def _padded_leaves(self) -> frozenset[str]:
        """The small leaves (fewer entries than a segment: norms, biases) merged in a
        segment's program, zero-padded, instead of a program of their own size: those of
        a merge that could segment them (the entries after a leaf's own do not change its
        values, and an in-call count over zeros is 0), unless padding them all would cost
        more than a quarter of the segmented entries' work (SmolLM2: 61 norm vectors, 6.7 M
        padded entries against 134 M; a program costs XLA:CPU 0.3-0.6 s to compile)."""
        entries = self.segment_entries
        if entries is None:
            return frozenset()
        small, segmented = [], 0
        for leaves in self.plan.groups.values():
            for leaf in leaves:
                size = math.prod(leaf.info.shape)
                if not self._segmentable(leaf, padding=True):
                    continue
                if size < entries:
                    small.append(leaf.name)
                elif size % entries == 0:
                    segmented += size
        if not small or len(small) * entries * 4 > segmented:
            return frozenset()
        return frozenset(small)

    def _flattens(self, leaf: LeafPlan) -> bool:
        """Whether ``leaf`` is merged flattened: one device, a merge that declares it
        :attr:`~jaxmerge.algebra.Merge.flat` there, and a leaf within the budget (a
        larger one is cut into row blocks, which keep their shape)."""
        return (self.mesh is None and self.merge.flat(leaf.info)
                and self._leaf_bytes(leaf) <= self.chunk_bytes)

    def _in_call_chunks(self, group: list[LeafPlan]) -> list[_Chunk]:
        """``in_call`` chunks of a group that sums the in-call statistic
        (:meth:`_sums_in_call`): the leaves whose pieces are all in the group and fit one
        chunk packed together (:func:`_packed`), then the pieces of the others (larger
        than a chunk: their statistic's partials outside each chunk come from a pass)."""
        size = self._chunk_slots(group)
        by_leaf: dict[str, list[LeafPlan]] = {}
        for piece in group:
            by_leaf.setdefault(piece.name, []).append(piece)
        together = [pieces for pieces in by_leaf.values()
                    if len(pieces) <= size and _covers(pieces)]
        names = {pieces[0].name for pieces in together}
        rest = [piece for piece in group if piece.name not in names]
        packed = _packed(together, size)
        size = len(packed[0]) if packed else size  # one program: one chunk size
        return [_Chunk(slots, in_call=True) for slots in packed + _in_slots(rest, size)]

    def _chunk_slots(self, group: list[LeafPlan]) -> int:
        """Leaves (or pieces) of the group a one-device chunk holds: the budget's worth."""
        return max(1, min(len(group), self.chunk_bytes // max(1, self._leaf_bytes(group[0]))))

    def _group_chunks(self, group: list[LeafPlan]) -> list[_Chunk]:
        """Equal-size chunks of one group's leaves (the last one padded).

        One device: as many leaves as the budget holds. A mesh: row-sharded chunks of
        one leaf each (see :meth:`_row_sharded`), or leaf-parallel chunks of up to the
        budget's worth of leaves per device, padded to fill every device."""
        size = self._chunk_slots(group)
        if self.mesh is not None and self._row_sharded(group[0]):
            return [_Chunk([leaf], ROWS) for leaf in group]
        if self.mesh is None:
            return [_Chunk(slots) for slots in _in_slots(group, size)]
        per_device = min(size, -(-len(group) // self._devices))
        size = self._devices * per_device
        return [_Chunk(_spread(group[start:start + size], self._devices, per_device), LEAVES)
                for start in range(0, len(group), size)]

    def _row_sharded(self, leaf: LeafPlan) -> bool:
        """Intra-leaf strategy: a leaf still over the per-device budget (its merge is not
        row-wise, so it was not cut into row blocks) whose rows divide evenly over the
        devices. (Otherwise the leaf goes whole to one device, over the budget.)"""
        shape = leaf.info.shape
        return (self._leaf_bytes(leaf) > self.chunk_bytes and len(shape) >= 1
                and shape[0] % self._devices == 0)

    def _split_oversized(self, leaves: list[LeafPlan]) -> list[list[LeafPlan]]:
        """[leaves], or, for leaves over the budget that can be merged by rows, groups of
        equally shaped row blocks (the last block of each leaf may be shorter).

        Over a mesh, a group of fewer leaves than devices, each over 1/devices of the
        budget, is also cut into row blocks so that every device gets work (row-wise
        merges give identical results in blocks): intra-leaf sharding of an elementwise
        merge, each device merging its own rows."""
        first = leaves[0]
        leaf_bytes = self._leaf_bytes(first)
        rows = first.info.shape[0] if first.info.shape else 1
        devices = self._devices
        spread = 1
        if devices > 1 and len(leaves) < devices and leaf_bytes * devices > self.chunk_bytes:
            spread = -(-devices // len(leaves))
        if ((leaf_bytes <= self.chunk_bytes and spread == 1) or rows < 2
                or not self.merge.rowwise(first.info)):
            return [leaves]
        rows_per_block = max(1, self.chunk_bytes // (leaf_bytes // rows))
        if spread > 1:
            rows_per_block = min(rows_per_block, -(-rows // spread))
        rows_per_block = balanced_block_rows(rows, rows_per_block)
        by_shape: dict[tuple, list[LeafPlan]] = {}
        for leaf in leaves:
            for block in leaf.row_blocks(rows_per_block):
                by_shape.setdefault(block.info.shape, []).append(block)
        return list(by_shape.values())

    # -- reading -----------------------------------------------------------

    def _dtype_of(self, leaf: LeafPlan, source: Source) -> np.dtype:
        return source.entries()[leaf.name][0]

    def _input_structs(self, chunk: _Chunk):
        """Shapes and dtypes of a one-device chunk's (base, experts, extras) arrays."""
        first = chunk.leaves[0]
        shape = chunk.shape
        n = len(self.experts)
        base_dtype = self._dtype_of(first, self.base)
        base = jax.ShapeDtypeStruct((chunk.size, *shape), base_dtype)
        experts = jax.ShapeDtypeStruct((chunk.size, n, *shape), base_dtype)
        extras = {
            name: jax.ShapeDtypeStruct((chunk.size, n, *shape), self._dtype_of(first, sources[0]))
            for name, sources in self.extras.items()
        }
        return base, experts, extras

    def _read_chunk(self, chunk: _Chunk):
        if chunk.strategy is not None:
            return self._read_chunk_global(chunk)
        structs, tree = jax.tree.flatten(self._input_structs(chunk))
        base, experts, extras = jax.tree.unflatten(tree, self._buffers.take(structs))
        for i, leaf in enumerate(chunk.slots):
            if leaf is None:  # padding: zeros
                base[i] = 0
                experts[i] = 0
                for value in extras.values():
                    value[i] = 0
                continue
            rows = leaf.read_rows
            self.base.read(leaf.name, _leaf_view(base[i], leaf, zero_padding=True), rows)
            for t, expert in enumerate(self.experts):
                expert.read(leaf.name, _leaf_view(experts[i, t], leaf, zero_padding=True), rows)
            for name, sources in self.extras.items():
                for t, source in enumerate(sources):
                    source.read(leaf.name, _leaf_view(extras[name][i, t], leaf,
                                                      zero_padding=True), rows)
        hashes, offsets = chunk.ids()
        per_entry = base.itemsize + sum(array.itemsize * array.shape[1]
                                        for array in [experts, *extras.values()])
        nbytes = per_entry * sum(math.prod(leaf.info.shape) for leaf in chunk.leaves)
        return (hashes, offsets, base, experts, extras), nbytes

    def _release(self, chunk: _Chunk, arrays) -> None:
        """Gives a one-device chunk's input buffers back for the next chunk's read."""
        if chunk.strategy is None:
            _, _, base, experts, extras = arrays
            self._buffers.give([base, experts, *extras.values()])

    def _read_chunk_global(self, chunk: _Chunk):
        """The chunk as global arrays over the mesh; each process reads only the leaves
        (leaf-parallel) or rows (row-sharded) that its own devices hold."""
        first = chunk.leaves[0]
        counter = [0]  # bytes read by this process

        def stacked(sources, dtype, experts_axis: bool):
            return self._global_stack(chunk, sources, dtype, experts_axis, counter)

        base_dtype = self._dtype_of(first, self.base)
        base = stacked([self.base], base_dtype, False)
        experts = stacked(self.experts, base_dtype, True)
        extras = {name: stacked(sources, self._dtype_of(first, sources[0]), True)
                  for name, sources in self.extras.items()}
        hashes, offsets = chunk.ids()
        hashes = distributed.global_array(hashes, self._per_leaf_sharding(chunk, 1))
        offsets = distributed.global_array(offsets, self._per_leaf_sharding(chunk, 1))
        return (hashes, offsets, base, experts, extras), counter[0]

    def _per_leaf_sharding(self, chunk: _Chunk, ndim: int) -> NamedSharding:
        """Sharding of a per-item array ``[size, ...]``: split like the leaves
        (leaf-parallel), or replicated (row-sharded: one item, all devices)."""
        if chunk.strategy == LEAVES:
            return NamedSharding(self.mesh, distributed.split_spec(self.mesh, 0, ndim))
        return distributed.replicated(self.mesh)

    def _global_stack(self, chunk: _Chunk, sources: list[Source], dtype, experts_axis: bool,
                      counter: list[int]):
        """``[size, (N,) *shape]`` stacked from ``sources`` as a global array split over
        the mesh by leaf (leaf-parallel) or by row (row-sharded). The callback JAX calls
        for each of this process's devices reads just that device's leaves or rows."""
        shape = chunk.leaves[0].info.shape
        lead = (chunk.size, len(sources)) if experts_axis else (chunk.size,)
        row_dim = len(lead)
        split = 0 if chunk.strategy == LEAVES else row_dim
        sharding = NamedSharding(self.mesh, distributed.split_spec(
            self.mesh, split, len(lead) + len(shape)))

        def callback(index):
            items = range(*index[0].indices(chunk.size))
            rows = (index[row_dim].indices(shape[0])[:2] if chunk.strategy == ROWS else None)
            local = (rows[1] - rows[0], *shape[1:]) if rows else shape
            out = host_zeros((len(items), *lead[1:], *local), dtype)
            for j, i in enumerate(items):
                leaf = chunk.slots[i]
                if leaf is None:
                    continue  # padding
                read_rows = _leaf_rows(leaf, rows)
                for t, source in enumerate(sources):
                    target = out[j, t] if experts_axis else out[j]
                    source.read(leaf.name, target, read_rows)
                    counter[0] += target.nbytes
            return out

        return jax.make_array_from_callback((*lead, *shape), sharding, callback)

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

    def _program_key(self, chunk: _Chunk) -> tuple:
        """What a chunk's compiled call depends on, besides its kind (apply or a pass)."""
        info = chunk.leaves[0].info
        group = ("flat", chunk.shape, info.dtype) if chunk.flat else info.group_key()
        key = (group, self.merge.choose(info), chunk.leaves[0].out_dtype.str,
               chunk.leaves[0].out_dtype.name, chunk.in_call)
        if chunk.strategy is not None:
            key += (chunk.strategy,)
        return key

    def _compiled_fn(self, kind, chunk: _Chunk, factory):
        info = chunk.leaves[0].info
        key = (kind, *self._program_key(chunk))
        cached = self.programs is not None and chunk.strategy is None
        if cached:
            key += (chunk.size,)  # an exported program has fixed argument shapes
        with self._compiled_lock:  # (compute threads may ask for a shape at once)
            if key not in self._compiled:
                self._compiled[key] = (self.programs.program(lambda: factory(info), repr(key))
                                       if cached else factory(info))
                self.report.compiled_calls += 1
            return self._compiled[key]

    @contextlib.contextmanager
    def _compiling_ahead(self, call_of):
        """A background thread that compiles chunk calls ahead of their use: yields a
        :class:`_Ahead` whose ``submit(chunks)`` queues each new shape's call of
        ``call_of(chunk, arrays) -> (fn, args)`` and whose ``launch(chunk, arrays)``
        runs it (first waiting for its compilation if that is under way).

        Tracing, lowering and compiling (or loading from the persistent cache) take
        20–500 ms per shape and merge even when the compiled program is cached (less
        with a :class:`ProgramCache`, which skips the tracing); here they overlap
        earlier work (other shapes' compute, the statistics passes) instead of
        preceding each shape. The jitted functions keep what was compiled. One-device
        chunks only; a failure here is ignored (the launch raises it, with its context).
        """
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxmerge-compile")
        try:
            yield _Ahead(self, call_of, pool)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _free_of_stats(self, chunks: list[_Chunk]) -> list[_Chunk]:
        """The chunks whose merge call takes no statistic, so can be compiled before the
        statistics passes run: all of them unless a pass is whole-model, except the
        leaves merged in row blocks (the only ones that get per-leaf statistics)."""
        if any(not stats_pass.per_leaf for stats_pass in self.merge.passes):
            return []
        with_stats = {leaf.name for stats_pass in self._streamed_passes
                      for chunk in self._chunks(stats_pass.applies, only_blocks=True)
                      for leaf in chunk.leaves}
        return [chunk for chunk in chunks
                if not any(leaf.name in with_stats for leaf in chunk.leaves)]

    def compute_stats(self) -> dict:
        """Runs every statistics pass, in order.

        Returns {pass id: statistic} for whole-model passes and
        {pass id: {leaf name: statistic}} for per-leaf ones.
        """
        stats: dict = {}
        passes = self._streamed_passes
        for number, stats_pass in enumerate(passes, start=1):
            label = f"pass {number}/{len(passes)}: {stats_pass.description}"
            if stats_pass.per_leaf:
                stats[stats_pass.id] = self._per_leaf_pass(stats_pass, label, stats)
                continue
            settled = stats_pass.settle(stats)
            if settled is not None:
                stats[stats_pass.id] = settled
                self.report.settled_passes += 1
                continue
            totals = self._pass_totals(stats_pass, self._chunks(stats_pass.applies), label, stats)
            if not totals:
                raise JaxmergeError(f"statistics pass {stats_pass.description!r} saw no tensor")
            stats[stats_pass.id] = stats_pass.finalize(totals[None], stats)
        self.report.stats = stats
        return stats

    def _per_leaf_pass(self, stats_pass: StatsPass, label: str, stats: dict) -> _PerLeaf:
        """{leaf name: statistic} for the leaves merged in row blocks (the only ones that
        need per-leaf statistics); a leaf whose statistic the earlier passes settle
        (:attr:`StatsPass.settle`) is not read."""
        names = {leaf.name for chunk in self._chunks(stats_pass.applies, only_blocks=True)
                 for leaf in chunk.leaves}
        results = _PerLeaf()
        for name in sorted(names):
            value = stats_pass.settle(self._leaf_view(stats, name))
            if value is not None:
                results[name] = value
        self.report.settled_passes += len(results)
        if len(results) == len(names):
            return results
        chunks = self._chunks(lambda info: stats_pass.applies(info) and info.name not in results,
                              only_blocks=True)
        totals = self._pass_totals(stats_pass, chunks, label, stats)
        results.update({name: stats_pass.finalize(total, self._leaf_view(stats, name))
                        for name, total in totals.items()})
        return results

    def _pass_totals(self, stats_pass: StatsPass, chunks: list[_Chunk], label: str,
                     stats: dict, by_piece: bool = False) -> dict:
        """Streams ``chunks`` through one pass: {leaf name: summed partials} for per-leaf
        passes (row blocks of one leaf summed; ``by_piece``: {(name, block): partial}),
        {None: sum over every leaf} otherwise."""
        def call_of(chunk, arrays):
            fn = self._compiled_fn(
                ("pass", stats_pass.id), chunk,
                lambda info, p=stats_pass, c=chunk: self._compile_pass(p, info, c))
            valid = np.array([leaf is not None for leaf in chunk.slots])
            if chunk.strategy is not None:
                valid = distributed.global_array(valid, self._per_leaf_sharding(chunk, 1))
            return fn, (valid, *self._call_args(chunk, arrays, stats))

        totals: dict = {}
        with self._compiling_ahead(call_of) as ahead:
            ahead.submit(chunks)
            for chunk, launched in _launched(self._stream(chunks, label), ahead.launch,
                                             self.compute_threads, self._release):
                partial = jax.tree.map(lambda p: _widen(distributed.local_value(p)), launched)
                if stats_pass.per_leaf:
                    for i, leaf in enumerate(chunk.slots):
                        if leaf is not None:
                            key = (leaf.name, leaf.block) if by_piece else leaf.name
                            _accumulate(totals, key, jax.tree.map(lambda p, i=i: p[i], partial))
                else:  # partial sums, one per device (or one)
                    _accumulate(totals, None, jax.tree.map(lambda p: p.sum(axis=0), partial))
                self._count_chunk(chunk)
        return totals

    def _compile_pass(self, stats_pass: StatsPass, info: LeafInfo, chunk: _Chunk):
        if chunk.strategy is None:
            return _compile_pass(stats_pass, info)
        return _compile_pass_global(stats_pass, info, self.mesh, chunk.strategy,
                                    jax.random.key_impl(self.key))

    def _compile_apply(self, info: LeafInfo, out_dtype, chunk: _Chunk):
        if chunk.strategy is None:
            return _compile_apply(self.merge, info, out_dtype)
        return _compile_apply_global(self.merge, info, out_dtype, self.mesh, chunk.strategy,
                                     jax.random.key_impl(self.key))

    @contextlib.contextmanager
    def _blas_limit(self):
        """On the CPU with several compute threads, the BLAS library behind LAPACK shares
        the cores out among the concurrent calls while this executor runs (from its first
        LAPACK call: :class:`jaxmerge.cpu_threads.LapackThreadLimit`)."""
        if jax.default_backend() != "cpu" or self.compute_threads == 1:
            yield
            return
        threads = cpu_threads.blas_threads_per_call(self.compute_threads)
        with cpu_threads.LapackThreadLimit(threads) as limit:
            self._lapack_limit = limit
            try:
                yield
            finally:
                self._lapack_limit = None

    def _before_call(self) -> None:
        """Runs before every compiled call, once its program is compiled."""
        if self._lapack_limit is not None:
            self._lapack_limit.apply()

    def _count_chunk(self, chunk: _Chunk) -> None:
        self.report.chunks += 1
        if chunk.strategy == LEAVES:
            self.report.leaf_parallel_chunks += 1
        elif chunk.strategy == ROWS:
            self.report.row_sharded_chunks += 1

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
        chunks = self._chunks(stats_pass.applies, flatten=False)  # (a diagnostic may not be flat)
        with self._blas_limit():
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
        first = chunk.leaves[0].name
        names = [leaf.name if leaf else first for leaf in chunk.slots]  # padding: first leaf
        leaf_stats = {
            key: jax.tree.map(lambda *items: np.stack([np.asarray(i) for i in items]),
                              *[value[name] for name in names])
            for key, value in stats.items() if isinstance(value, _PerLeaf)
            and all(name in value for name in names)
        }
        if chunk.strategy is None:
            return (self.key, hashes, offsets, base, experts, extras, global_stats, leaf_stats)
        # Over a mesh every argument is a global array: replicated, or split like the leaves.
        replicated = distributed.replicated(self.mesh)

        def per_leaf(value):
            value = np.asarray(value)
            return distributed.global_array(value, self._per_leaf_sharding(chunk, value.ndim))

        key_data = distributed.global_array(jax.random.key_data(self.key), replicated)
        global_stats = jax.tree.map(lambda v: distributed.global_array(v, replicated),
                                    global_stats)
        leaf_stats = jax.tree.map(per_leaf, leaf_stats)
        return (key_data, hashes, offsets, base, experts, extras, global_stats, leaf_stats)

    def run(self, write) -> RunReport:
        """Merges every tensor and hands it to ``write(name, array, rows=None)``."""
        start = time.perf_counter()
        stats: dict = {}  # filled by the statistics passes, before the first merge call
        aliases: dict[str, list[str]] = {}
        for leaf in self.plan.leaves:
            if leaf.alias_of is not None:
                aliases.setdefault(leaf.alias_of, []).append(leaf.name)

        with self._blas_limit(), concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="jaxmerge-write") as pool:
            def call_of(chunk, arrays):
                out_dtype = chunk.leaves[0].out_dtype
                if not chunk.in_call:
                    fn = self._compiled_fn(
                        "apply", chunk,
                        lambda info, d=out_dtype, c=chunk: self._compile_apply(info, d, c))
                    return fn, self._call_args(chunk, arrays, stats)
                fn = self._compiled_fn(
                    "pieces", chunk,
                    lambda info, d=out_dtype: _compile_apply_pieces(self.merge, info, d))
                return fn, (*self._call_args(chunk, arrays, stats), *outside.of(chunk))

            pending = None
            chunks = self._chunks()
            outside = _Outside(chunks)
            with self._compiling_ahead(call_of) as ahead:
                ahead.submit(self._free_of_stats(chunks))  # compiled while the passes run
                stats.update(self.compute_stats())
                if outside.straddling:
                    outside.measure(self, stats)
                self.report.in_call_leaves = outside.together
                ahead.submit(chunks)
                for chunk, (merged, finite) in _launched(self._stream(chunks, "merge"),
                                                         ahead.launch, self.compute_threads,
                                                         self._release):
                    computed = time.perf_counter()
                    self._check_finite(chunk, distributed.local_value(finite))
                    pieces = self._local_pieces(chunk, merged)
                    waited = time.perf_counter()
                    self.report.compute_seconds += waited - computed
                    if pending is not None:
                        pending.result()
                    self.report.write_wait_seconds += time.perf_counter() - waited
                    pending = pool.submit(self._write_pieces, write, pieces, aliases)
                    self._count_chunk(chunk)
            if pending is not None:
                pending.result()
            for index, leaf in enumerate(self.plan.leaves):
                if index % self._processes != self._process:
                    continue  # copies and vocabulary tails are spread over the processes
                if leaf.copy:
                    self._copy_from_base(write, leaf)
                elif leaf.merged and leaf.tail is not None:
                    for name in [leaf.name, *aliases.get(leaf.name, [])]:
                        self._write_tail(write, name, leaf)
        self.report.seconds = time.perf_counter() - start
        return self.report

    def _local_pieces(self, chunk: _Chunk, merged) -> list[tuple[LeafPlan, np.ndarray, tuple]]:
        """(leaf, values, rows) of the merged output that this process holds.

        One device: every leaf of the chunk. A mesh: the shards of this process's
        devices (replica 0 only), so every element of the global result is in exactly
        one process's pieces.
        """
        if chunk.strategy is None:
            merged = np.asarray(merged)
            return [(leaf, _leaf_view(merged[i], leaf), leaf.read_rows)
                    for i, leaf in enumerate(chunk.slots) if leaf is not None]
        pieces = []
        for shard in merged.addressable_shards:
            if shard.replica_id != 0:
                continue
            data = np.asarray(shard.data)
            items = range(*shard.index[0].indices(chunk.size))
            rows = None
            if chunk.strategy == ROWS:
                rows = shard.index[1].indices(chunk.leaves[0].info.shape[0])[:2]
            for j, i in enumerate(items):
                leaf = chunk.slots[i]
                if leaf is not None:
                    pieces.append((leaf, data[j], _leaf_rows(leaf, rows)))
        return pieces

    def _write_pieces(self, write, pieces, aliases) -> None:
        for leaf, values, rows in pieces:
            for name in [leaf.name, *aliases.get(leaf.name, [])]:
                write(name, values, rows)
                if rows is None or rows[1] == (leaf.rows or leaf.out_shape[0]):
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
        for i, leaf in enumerate(chunk.slots):
            bad = np.flatnonzero(~finite[i])
            if leaf is not None and bad.size:
                source = owners[bad[0]]
                raise NonFiniteError(
                    f"tensor {leaf.name!r} in {source.location(leaf.name)} contains NaN or "
                    "infinite values"
                )


HOST_ALIGNMENT = 64


def host_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed host array whose data starts on a ``HOST_ALIGNMENT``-byte boundary.

    JAX's CPU client uses such an array's memory in place when it becomes a jit
    argument; a less aligned one (``np.zeros`` of a big array starts 16 bytes past a
    page) is copied first: ~10 % of a task_arithmetic merge's CPU time.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.zeros(nbytes + HOST_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % HOST_ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


class HostBuffers:
    """Aligned host buffers for chunk inputs, reused from chunk to chunk.

    A chunk's inputs are read into buffers taken here and given back once its call has
    run; the next chunk of the same byte size reads into them again, so its memory is
    neither zeroed nor faulted in anew (on the CPU, ~a third of the time spent reading
    a checkpoint from the page cache went to that). Idle buffers of sizes the current
    chunk does not use are freed when it needs a new one, so no more is held than
    without reuse: the chunks in flight. Thread-safe (reads and calls run on
    different threads).
    """

    def __init__(self):
        self._idle: dict[int, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def take(self, structs) -> list[np.ndarray]:
        """Arrays shaped like ``structs`` (shape and dtype), contents unspecified."""
        sizes = [math.prod(s.shape) * np.dtype(s.dtype).itemsize for s in structs]
        raws = []
        with self._lock:
            if any(not self._idle.get(size) for size in sizes):
                self._idle = {size: self._idle[size] for size in set(sizes)
                              if size in self._idle}
            for size in sizes:
                idle = self._idle.get(size)
                raws.append(idle.pop() if idle else None)
        return [(host_zeros((size,), np.uint8) if raw is None else raw)
                .view(np.dtype(s.dtype)).reshape(s.shape)
                for raw, size, s in zip(raws, sizes, structs)]

    def give(self, arrays) -> None:
        """Returns arrays from :meth:`take` (no longer used by anyone)."""
        with self._lock:
            for array in arrays:
                raw = array.reshape(-1).view(np.uint8)
                self._idle.setdefault(raw.nbytes, []).append(raw)


class _Ahead:
    """The compile-ahead queue of :meth:`Executor._compiling_ahead`."""

    def __init__(self, executor: Executor, call_of, pool: concurrent.futures.Executor):
        self._executor = executor
        self._call_of = call_of
        self._pool = pool
        self._futures: dict[int, concurrent.futures.Future] = {}
        self._shapes: set = set()

    def submit(self, chunks: list[_Chunk]) -> None:
        """Queues the call of each chunk whose shape is new (in order of first use)."""
        for chunk in chunks:
            shape = (*self._executor._program_key(chunk), chunk.size)
            if chunk.strategy is not None or shape in self._shapes:
                continue  # (same key and size: same function and argument shapes)
            self._shapes.add(shape)
            fn, args = self._call_of(chunk, (*chunk.ids(),
                                             *self._executor._input_structs(chunk)))
            if id(fn) not in self._futures:
                self._futures[id(fn)] = self._pool.submit(_compile_quietly, fn,
                                                          abstract_arguments(args))

    def launch(self, chunk: _Chunk, arrays):
        """Runs the chunk's call, once a compilation of it already under way is done
        (one not started yet is cancelled and done here, before the call)."""
        fn, args = self._call_of(chunk, arrays)
        future = self._futures.pop(id(fn), None)
        if future is not None:
            if future.cancel():
                _compile_quietly(fn, abstract_arguments(args))
            else:
                future.result()
        self._executor._before_call()
        return fn(*args)


def _compile_quietly(fn, structs) -> None:
    """``fn``'s program for arguments shaped like ``structs``, traced, lowered and compiled
    into jit's caches; errors are left for the real call to raise."""
    try:
        fn.trace(*structs).lower().compile()
    except Exception:  # noqa: BLE001 - the launch of the same call reports it
        pass


def _launched(stream, launch, threads: int = 1, release=None):
    """Yields ``(chunk, launch(chunk, arrays))`` for ``stream``'s chunks, in order.

    One thread: chunk k + 1 is launched before chunk k's results are awaited, so the
    device always has the next call queued (``launch`` dispatches asynchronously; a
    mesh chunk's call is traced and compiled there when its shape is new, a
    one-device chunk's was compiled ahead). Costs one more chunk of inputs in memory.

    More threads (CPU, one device): each call runs to completion on one of
    ``threads`` worker threads, so that many chunks compute at once (XLA:CPU runs one
    call at a time per calling thread, and LAPACK calls use one core each); up to
    ``threads + 1`` chunks are in flight, and results still come out in stream order.

    ``release(chunk, arrays)``, if given, runs once a chunk's call has finished with
    its inputs (multi-thread: when it completes; one thread: once its results were
    consumed).
    """
    release = release or (lambda chunk, arrays: None)
    if threads <= 1:
        previous = None
        for chunk, arrays in stream:
            launched = (chunk, launch(chunk, arrays), arrays)
            if previous is not None:
                yield previous[:2]
                release(previous[0], previous[2])
            previous = launched
        if previous is not None:
            yield previous[:2]
            release(previous[0], previous[2])
        return

    def run_to_completion(chunk, arrays):
        result = jax.block_until_ready(launch(chunk, arrays))
        release(chunk, arrays)
        return result

    pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="jaxmerge-compute")
    try:
        running: collections.deque = collections.deque()
        for chunk, arrays in stream:
            running.append((chunk, pool.submit(run_to_completion, chunk, arrays)))
            if len(running) > threads:
                chunk, future = running.popleft()
                yield chunk, future.result()
        while running:
            chunk, future = running.popleft()
            yield chunk, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _leaf_rows(leaf: LeafPlan, rows: tuple[int, int] | None) -> tuple[int, int] | None:
    """The rows to read (or write) for ``rows`` of a leaf's merged rows (None: all)."""
    if rows is None:
        return leaf.read_rows
    first = leaf.read_rows[0] if leaf.read_rows else 0
    return (first + rows[0], first + rows[1])


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


class _Outside:
    """Per ``in_call`` chunk, the arguments that sum a leaf's statistic over all of its
    pieces: each slot's leaf id (:meth:`_Chunk.leaf_ids`) and the int32 sum of the
    partials of its leaf's pieces in other chunks. Those pieces belong to leaves larger
    than one chunk (``straddling``); :meth:`measure` gets their partials from one pass
    over their chunks. Every other leaf is all in one chunk (``together``): 0."""

    def __init__(self, chunks: list[_Chunk]):
        homes: dict[str, set[int]] = {}
        for index, chunk in enumerate(chunks):
            if chunk.in_call:
                for leaf in chunk.leaves:
                    homes.setdefault(leaf.name, set()).add(index)
        self.straddling = {name for name, home in homes.items() if len(home) > 1}
        self.together = len(homes) - len(self.straddling)
        self._chunks = [chunk for chunk in chunks if chunk.in_call
                        and any(leaf.name in self.straddling for leaf in chunk.leaves)]
        self._partials: dict | None = None  # {(name, block): partial}, once measured
        self._totals: dict[str, int] = {}

    def measure(self, executor: Executor, stats: dict) -> None:
        """Runs the in-call statistic's pass over the straddling leaves' chunks."""
        stats_pass = executor.in_call_pass
        self._partials = executor._pass_totals(
            stats_pass, self._chunks, f"pass: {stats_pass.description} (large tensors)",
            stats, by_piece=True)
        for (name, _), partial in self._partials.items():
            self._totals[name] = self._totals.get(name, 0) + int(partial)

    def of(self, chunk: _Chunk) -> tuple[np.ndarray, np.ndarray]:
        """(leaf ids, outside sums) of one chunk. Before :meth:`measure`, zeros stand in
        for the straddling leaves' sums (for compiling ahead: only their shape counts)."""
        ids = chunk.leaf_ids()
        outside = np.zeros(chunk.size, np.int64)
        for i, leaf in enumerate(chunk.slots):
            if leaf is None or leaf.name not in self.straddling or self._partials is None:
                continue
            inside = sum(int(self._partials[(other.name, other.block)])
                         for other in chunk.leaves if other.name == leaf.name)
            outside[i] = self._totals[leaf.name] - inside
        return ids, outside.astype(np.int32)


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
