"""Scale-out: the device mesh, multi-process start-up, and global arrays from host data.

JAX itself is the distributed engine. A merge runs over a :class:`jax.sharding.Mesh`
of devices (all of them by default); the executor picks, per shape group, one of two
strategies (see :mod:`jaxmerge.executor`):

- **leaf-parallel**: the stacked leaves of a chunk are split over the devices (the
  chunk axis is sharded; each device runs the same per-leaf function on its own
  leaves under ``shard_map``, no communication). Right for exact SVDs, whose
  LAPACK/cuSOLVER calls cannot be split inside a matrix. Row blocks of a row-wise
  merge's large leaves are spread the same way, which is how elementwise methods
  split a huge leaf by rows.
- **intra-leaf** (row-sharded): a leaf larger than one device's budget whose merge
  is not row-wise (the matmul-based top-k SVD of ResMerge/TSV, Model Stock's
  norms) becomes one global array sharded by rows, and XLA partitions the program
  (sharded matmuls with all-reduces).

On many hosts, each process calls :func:`initialize` first; every process then
runs the same plan, reads only the slices its own devices hold
(``jax.make_array_from_callback`` over safetensors row reads) and writes only the
output bytes it computed, into shared output files whose layout is fixed up front.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxmerge.errors import ConfigError

logger = logging.getLogger("jaxmerge")
_initialized = False  # set by initialize()

AXIS_NAMES = ("devices", "devices_1", "devices_2", "devices_3")
"""Names of the mesh axes, by position (a 1-D mesh has the axis ``devices``)."""


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False) -> bool:
    """Calls ``jax.distributed.initialize`` when a multi-process run is asked for.

    Must run before anything touches a JAX backend. With ``coordinator_address``
    (and ``num_processes``, ``process_id``) the cluster is given explicitly; with
    ``auto=True`` and no address JAX detects it (TPU pods, SLURM, Open MPI, ...).

    Returns:
      True when ``jax.distributed`` was initialised.

    Raises:
      ConfigError: an incomplete explicit configuration.
    """
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
    if not explicit and not auto:
        return False
    if explicit and (coordinator_address is None or num_processes is None
                     or (process_id is None and num_processes > 1)):
        raise ConfigError("a multi-process merge needs --coordinator_address, --num_processes "
                          "and --process_id (or --distributed on a cluster JAX detects)")
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"--num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not (
            0 <= process_id < num_processes):
        raise ConfigError(f"--process_id must be in [0, {num_processes}), got {process_id}")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    global _initialized
    _initialized = True
    logger.info("jax.distributed: process %d of %d, %d local / %d global devices",
                jax.process_index(), jax.process_count(), jax.local_device_count(),
                jax.device_count())
    return True


def initialized() -> bool:
    """Whether :func:`initialize` started ``jax.distributed`` in this process."""
    return _initialized


def parse_mesh_shape(text: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """``"8"`` / ``"2,4"`` / ``[2, 4]`` -> a shape; ``-1`` stands for the remaining devices."""
    if text is None or text == "" or text == []:
        return None
    if isinstance(text, str):
        try:
            shape = tuple(int(part) for part in text.split(","))
        except ValueError:
            raise ConfigError(f"--mesh_shape must be comma-separated integers, got {text!r}"
                              ) from None
    else:
        shape = tuple(int(part) for part in text)
    if len(shape) > len(AXIS_NAMES) or any(d == 0 or d < -1 for d in shape) or shape.count(
            -1) > 1:
        raise ConfigError(f"bad mesh shape {shape}: positive sizes, at most one -1, "
                          f"at most {len(AXIS_NAMES)} axes")
    return shape


def make_mesh(mesh_shape: str | Sequence[int] | None = None, devices=None) -> Mesh:
    """A mesh over ``devices`` (default: all global devices) of the given shape.

    Args:
      mesh_shape: e.g. ``(8,)`` or ``(2, 4)``; ``None`` uses every device in one
        axis. The product must not exceed the number of devices; the first devices
        are used. On several processes the mesh must span all of them.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = parse_mesh_shape(mesh_shape) or (len(devices),)
    if -1 in shape:
        known = math.prod(d for d in shape if d != -1)
        if len(devices) % known:
            raise ConfigError(f"mesh shape {shape} does not divide {len(devices)} devices")
        shape = tuple(len(devices) // known if d == -1 else d for d in shape)
    size = math.prod(shape)
    if size > len(devices):
        raise ConfigError(f"mesh shape {shape} needs {size} devices; {len(devices)} available")
    if jax.process_count() > 1 and size != len(devices):
        raise ConfigError(f"a multi-process mesh must use all {len(devices)} devices, "
                          f"got shape {shape}")
    return Mesh(np.array(devices[:size], dtype=object).reshape(shape), AXIS_NAMES[:len(shape)])


def split_spec(mesh: Mesh, dim: int, ndim: int) -> PartitionSpec:
    """PartitionSpec sharding dimension ``dim`` of an ``ndim``-array over every mesh axis."""
    parts = [None] * ndim
    parts[dim] = tuple(mesh.axis_names)
    return PartitionSpec(*parts)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_array(value, mesh_sharding: NamedSharding):
    """A global ``jax.Array`` from a host value every process holds in full.

    Only the pieces of this process's devices are transferred.
    """
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, mesh_sharding,
                                        lambda index: np.asarray(value[index]))


def local_value(array) -> np.ndarray:
    """The host value of a replicated (or fully addressable) global array."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(array)
    return np.asarray(array.addressable_shards[0].data)


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def process_rank(mesh: Mesh | None) -> tuple[int, int]:
    """(this process's rank, number of processes) among those owning ``mesh``'s devices;
    (0, 1) without a mesh. Work that needs no device (copied tensors) is split by it."""
    if mesh is None:
        return 0, 1
    owners = sorted({device.process_index for device in mesh.devices.flat})
    return owners.index(jax.process_index()), len(owners)


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def shared_token() -> str:
    """A random hex token drawn by process 0 and known to every process."""
    token = secrets.token_hex(4)
    if jax.process_count() == 1:
        return token
    from jax.experimental import multihost_utils

    value = np.frombuffer(bytes.fromhex(token), np.uint32)
    value = multihost_utils.broadcast_one_to_all(value)
    return np.asarray(value, np.uint32).tobytes().hex()


def all_processes_sum(value: int) -> int:
    """Sum of an integer over all processes."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    # int32 halves: JAX runs without 64-bit types by default.
    halves = np.asarray([int(value) >> 30, int(value) & (2**30 - 1)], np.int32)
    gathered = np.asarray(multihost_utils.process_allgather(halves), np.int64).reshape(-1, 2)
    return int((gathered[:, 0] << 30).sum() + gathered[:, 1].sum())
