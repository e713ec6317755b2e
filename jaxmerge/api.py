"""The two front doors: merge checkpoint directories, or merge in-memory pytrees.

Both build the same plan and run the same executor, so a pytree merge equals the
file merge of the same tensors, bit for bit.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import shutil
import sys
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge import distributed
from jaxmerge.algebra import Merge
from jaxmerge.errors import ConfigError
from jaxmerge.executor import DEFAULT_CHUNK_BYTES, Executor, RunReport
from jaxmerge.io import hf
from jaxmerge.io.safetensors_io import ShardedWriter
from jaxmerge.plan import Plan, build_plan
from jaxmerge.programs import ProgramCache
from jaxmerge.sources import ArraySource, CheckpointSource, flatten_params
from jaxmerge.version import __version__

logger = logging.getLogger("jaxmerge")

ORBAX_SUBDIR = "params"
"""With ``output_format='orbax'``, the orbax checkpoint lives in ``OUTPUT/params``."""


def as_key(key):
    """A typed PRNG key from None (seed 0), an int seed, a typed key or raw uint32 data."""
    if key is None:
        return jax.random.key(0)
    if isinstance(key, int):
        return jax.random.key(key)
    key = jnp.asarray(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)


@dataclasses.dataclass
class MergeResult:
    """What a checkpoint merge produced."""

    output: pathlib.Path
    report: RunReport
    warnings: list[str]
    files: list[str]


def _output_dtype_name(plan: Plan) -> str:
    for leaf in plan.leaves:
        if not leaf.copy:
            return leaf.out_dtype.name
    return "float32"


def merge_checkpoints(
    merge: Merge,
    base: str | pathlib.Path,
    experts: Sequence[str | pathlib.Path],
    output: str | pathlib.Path,
    *,
    method_name: str = "custom",
    hyperparameters: Mapping | None = None,
    seed: int = 0,
    dtype: str | None = None,
    max_shard_size: int = 5 * 10**9,
    output_format: str = "safetensors",
    overwrite: bool = False,
    extras: Mapping[str, Sequence[str | pathlib.Path]] | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool = False,
    command: str | None = None,
    mesh_shape: str | Sequence[int] | None = None,
    programs: ProgramCache | None = None,
    compute_threads: int | None = None,
) -> MergeResult:
    """Merges Hugging Face checkpoint directories into a new one, streaming.

    Every check that can fail (paths, names, shapes, dtypes, hyperparameters, the
    output directory) runs before any tensor is read. The output is written to a
    temporary directory next to ``output`` and renamed at the end, so a failed or
    interrupted merge leaves nothing behind.

    Args:
      merge: the method (e.g. ``jaxmerge.ties()``).
      base: the base model directory.
      experts: the fine-tuned model directories.
      output: the directory to create.
      method_name, hyperparameters, command: recorded in ``jaxmerge_config.json``
        and the model card.
      seed: seeds the random methods (DARE family).
      dtype: output dtype of floating tensors; default: each base tensor's dtype.
      max_shard_size: bytes per output shard (default 5 GB).
      output_format: ``safetensors`` or ``orbax``.
      overwrite: replace an existing output.
      extras: per-expert extra inputs by name (e.g. Fisher directories).
      chunk_bytes: memory budget of one batched chunk, per device.
      progress: show progress bars.
      mesh_shape: the device mesh (e.g. ``(8,)``); default every device. On several
        processes (after :func:`jaxmerge.distributed.initialize`) every process calls
        this function with the same arguments: each reads only the slices its devices
        hold and writes its own bytes into the shared output files (the output must be
        on a file system every process sees); process 0 writes headers, the index and
        the metadata, and renames the result into place.
      programs: a :class:`jaxmerge.programs.ProgramCache` whose identity names
        ``merge`` completely (method and every hyperparameter): later runs with the
        same identity load the traced programs instead of tracing them again.
      compute_threads: chunk calls run at once (default: 2 on a multi-core CPU, else
        1; see :mod:`jaxmerge.cpu_threads`). The output does not depend on it.
    """
    if output_format not in ("safetensors", "orbax"):
        raise ConfigError(f"format must be 'safetensors' or 'orbax', got {output_format!r}")
    mesh = distributed.make_mesh(mesh_shape)
    processes = distributed.process_count()
    if processes > 1 and output_format != "safetensors":
        raise ConfigError("a multi-process merge writes safetensors only (--format=safetensors)")
    if max_shard_size <= 0:
        raise ConfigError(f"max_shard_size must be positive, got {max_shard_size}")
    output = pathlib.Path(output)
    hf.check_output_available(output, overwrite)
    base_source = CheckpointSource.open(base, label=f"base {base}")
    expert_sources = [CheckpointSource.open(path, label=f"expert {i + 1} {path}")
                      for i, path in enumerate(experts)]
    extra_sources = {name: [CheckpointSource.open(path, label=f"{name} {i + 1} {path}")
                            for i, path in enumerate(paths)]
                     for name, paths in (extras or {}).items()}
    config = base_source.config or {}
    plan = build_plan(base_source, expert_sources, extra_sources, out_dtype=dtype,
                      tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                      vocab_size_key=config.get("vocab_size"))
    for warning in plan.warnings:
        logger.warning(warning)
    executor = Executor(merge, plan, base_source, expert_sources, extra_sources,
                        key=jax.random.key(seed), chunk_bytes=chunk_bytes, progress=progress,
                        mesh=mesh, programs=programs, compute_threads=compute_threads)
    record = {
        "jaxmerge_version": __version__,
        "method": method_name,
        "hyperparameters": dict(hyperparameters or {}),
        "seed": seed,
        "dtype": dtype,
        "base": str(base),
        "experts": [str(path) for path in experts],
        "extras": {name: [str(p) for p in paths] for name, paths in (extras or {}).items()},
        "command": command,
        "warnings": plan.warnings,
    }
    files: list[str] = []

    def finish(staging, report):
        hf.write_config(base_source.config, staging, _output_dtype_name(plan),
                        plan.config_overrides)
        hf.copy_auxiliary(base_source.checkpoint.directory, staging)
        record["seconds"] = round(report.seconds, 3)
        hf.write_record(staging, record)
        hf.write_model_card(
            staging, base=str(base), experts=[str(p) for p in experts], method=method_name,
            hyperparameters=dict(hyperparameters or {}),
            command=command or " ".join(sys.argv), version=__version__)

    try:
        if processes > 1:
            report, files = _run_processes(executor, plan, output, overwrite, max_shard_size,
                                           finish)
        else:
            report, files = _run_single(executor, plan, output, overwrite, output_format,
                                        max_shard_size, finish)
    finally:
        for source in [base_source, *expert_sources,
                       *[s for sources in extra_sources.values() for s in sources]]:
            source.close()
    report.bytes_read = sum(s.bytes_read for s in [base_source, *expert_sources])
    return MergeResult(output=output, report=report, warnings=plan.warnings, files=files)


def _run_single(executor: Executor, plan: Plan, output: pathlib.Path, overwrite: bool,
                output_format: str, max_shard_size: int, finish) -> tuple[RunReport, list[str]]:
    """The one-process run: everything written into a staging directory, renamed at the end."""
    with hf.atomic_output(output, overwrite) as staging:
        if output_format == "safetensors":
            writer = ShardedWriter(staging, plan.output_tensors, max_shard_size,
                                   metadata={"jaxmerge_version": __version__})
            try:
                report = executor.run(writer.write)
            except BaseException:
                writer.abort()
                raise
            files = [str(f) for f in writer.close()]
        else:
            from jaxmerge.io.orbax_io import save_orbax

            arrays = _collect(executor, plan)
            report = executor.report
            save_orbax(staging / ORBAX_SUBDIR, arrays)
            files = [ORBAX_SUBDIR]
        finish(staging, report)
    return report, files


def _run_processes(executor: Executor, plan: Plan, output: pathlib.Path, overwrite: bool,
                   max_shard_size: int, finish) -> tuple[RunReport, list[str]]:
    """The multi-process run: shared output files, each process writing its own bytes.

    Process 0 creates the staging directory and every shard file (headers written, sizes
    fixed); after a barrier the others open the same files; every process pwrites the
    tensors and row ranges its devices computed; the byte totals are summed across
    processes and must cover the checkpoint; process 0 then writes the index, config,
    tokenizer, record and card and renames the staging directory into place.
    """
    leader = distributed.process_index() == 0
    staging = output.parent / f".{output.name}.jaxmerge-tmp-{distributed.shared_token()}"
    metadata = {"jaxmerge_version": __version__}
    writer = None
    try:
        if leader:
            hf.check_output_available(output, overwrite)
            output.parent.mkdir(parents=True, exist_ok=True)
            staging.mkdir()
            writer = ShardedWriter(staging, plan.output_tensors, max_shard_size, metadata)
        distributed.barrier("jaxmerge-output-created")
        if not leader:
            writer = ShardedWriter(staging, plan.output_tensors, max_shard_size, metadata,
                                   create=False)
        try:
            report = executor.run(writer.write)
        except BaseException:
            writer.abort()
            raise
        files = [str(f) for f in writer.close(check=False, index=leader)]
        written = distributed.all_processes_sum(writer.bytes_written)
        if written != writer.total_bytes:
            raise RuntimeError(f"the processes wrote {written} of {writer.total_bytes} bytes")
        if leader:
            finish(staging, report)
            hf.check_output_available(output, overwrite)
            hf.replace_directory(staging, output)
        distributed.barrier("jaxmerge-output-done")
    except BaseException:
        if leader:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return report, files


def _collect(executor: Executor, plan: Plan) -> dict[str, np.ndarray]:
    """Runs the executor into in-memory arrays, one per output tensor."""
    arrays = {leaf.name: np.empty(leaf.out_shape, leaf.out_dtype) for leaf in plan.leaves}

    def write(name, value, rows=None):
        if rows is None:
            arrays[name][...] = value
        else:
            arrays[name][rows[0]:rows[1]] = value

    executor.run(write)
    return arrays


def merge(
    method: Merge,
    base_params,
    expert_params: Sequence,
    *,
    key=None,
    extras: Mapping[str, Sequence] | None = None,
    dtype: str | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    mesh_shape: str | Sequence[int] | None = None,
    compute_threads: int | None = None,
):
    """Merges in-memory pytrees (e.g. Flax params) with the same executor as the CLI.

    Args:
      method: a Merge, e.g. ``jaxmerge.ties(density=0.2)``.
      base_params: the base model's parameter pytree.
      expert_params: a list of pytrees with the same structure.
      key: PRNG key (or int seed) for random methods; ``jax.random.key(seed)`` gives
        the same result as ``--seed=seed`` on the command line. Default seed 0.
      extras: per-expert extra pytrees by name (e.g. ``{"fisher": [...]}``).
      dtype: output dtype; default each base leaf's dtype.
      chunk_bytes: memory budget of one batched chunk, per device.
      mesh_shape: the mesh of this process's devices; default all of them (the result
        does not depend on it). In-memory pytrees are merged by each process on its own
        devices, even after ``jax.distributed.initialize``.
      compute_threads: chunk calls run at once (default: 2 on a multi-core CPU, else
        1); the result does not depend on it.

    Returns:
      The merged pytree, with the structure of ``base_params``.

    Example:
      >>> merged = jaxmerge.merge(jaxmerge.ties(density=0.2), base, [expert_a, expert_b])
    """
    base_flat, treedef = flatten_params(base_params)
    sources = [ArraySource(flatten_params(p)[0], f"expert {i + 1}")
               for i, p in enumerate(expert_params)]
    extra_sources = {name: [ArraySource(flatten_params(p)[0], f"{name} {i + 1}")
                            for i, p in enumerate(trees)]
                     for name, trees in (extras or {}).items()}
    base_source = ArraySource(base_flat, "base")
    plan = build_plan(base_source, sources, extra_sources, out_dtype=dtype)
    for warning in plan.warnings:
        logger.warning(warning)
    executor = Executor(method, plan, base_source, sources, extra_sources, key=as_key(key),
                        chunk_bytes=chunk_bytes, compute_threads=compute_threads,
                        mesh=distributed.make_mesh(mesh_shape, jax.local_devices()))
    arrays = _collect(executor, plan)
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(arrays[name]) for name in base_flat])
