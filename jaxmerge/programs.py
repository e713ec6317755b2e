"""Lowered merge programs kept on disk, so that a repeated merge skips tracing them.

JAX's persistent compilation cache (the CLI's ``--compilation_cache``) keys a compiled
program on its lowered module, so even a run whose every program is in that cache
first traces and lowers each one in Python: 0.1–0.5 s for each of ResMerge's matrix
programs, about a fifth of a warm SmolLM2 merge. A :class:`ProgramCache` stores each
program's lowered module (``jax.export``) under a key of everything the program
depends on; a later run deserialises it (~1 ms), lowers a thin wrapper around it
(~20 ms) and finds the compiled form in JAX's cache.

The key hashes: the caller's ``identity`` of the merge (the CLI gives the method with
all its hyperparameters; a merge it cannot name, such as a ``--recipe``, gets no
cache), the program's label (its kind and leaf group) and argument shapes and dtypes,
jaxmerge's source files, the JAX and jaxlib versions, the backend and device kind, and
JAX's tracing configuration. Whatever fails (an unreadable entry, a program JAX
cannot export) falls back to tracing as usual. A program is run from its exported
module whether it was just exported or loaded, so a run that fills the cache and the
runs that read it compute the same bits.

Lowering a call of an exported module makes JAX initialise its CPU LAPACK kernels
first, which imports ``scipy.linalg`` (~0.1 s of a 1.1 s warm task-arithmetic merge);
:func:`lower_exported_without_lapack` skips that for modules that call no LAPACK
kernel (every ``lapack_*`` target needs it: their modules still initialise it).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib
import tempfile
import threading
from collections.abc import Callable

import jax
import numpy as np
from jax import export

logger = logging.getLogger("jaxmerge")

FORMAT = 1  # bump when what an entry holds changes
SUFFIX = ".jaxexport"
# Custom calls jax.export does not promise to keep stable across JAX versions; the
# key holds the exact versions, so an entry is only ever read by the JAX that wrote it.
VERSION_BOUND_TARGETS = ("lapack_sgesvd_ffi", "lapack_dgesvd_ffi", "lapack_sgesdd_ffi",
                         "lapack_dgesdd_ffi")
_PACKAGE = pathlib.Path(__file__).resolve().parent


class ProgramCache:
    """Exported programs of one merge (named by ``identity``) in ``directory``."""

    def __init__(self, directory: str | os.PathLike, identity: str):
        self.directory = pathlib.Path(directory).expanduser()
        self.identity = identity

    def program(self, make: Callable[[], Callable], label: str) -> CachedProgram:
        """A stand-in for the jitted function ``make()``, for arguments of one shape."""
        return CachedProgram(self, make, label)

    def key(self, label: str, structs) -> str | None:
        """The entry name of the program ``label`` for arguments shaped like ``structs``;
        None when the tracing configuration has no stable description."""
        if environment() is None:
            return None
        leaves = [(tuple(s.shape), str(s.dtype)) for s in jax.tree.leaves(structs)]
        parts = (FORMAT, self.identity, label, str(jax.tree.structure(structs)), leaves,
                 environment())
        return hashlib.sha256(repr(parts).encode()).hexdigest()

    def load(self, key: str) -> export.Exported | None:
        path = self.directory / (key + SUFFIX)
        try:
            return export.deserialize(bytearray(path.read_bytes()))
        except FileNotFoundError:
            return None
        except Exception as error:  # noqa: BLE001 - a bad entry is rewritten
            logger.info("program cache: ignoring %s (%s)", path, error)
            return None

    def save(self, key: str, exported: export.Exported) -> None:
        """Writes an entry atomically (a temporary file renamed into place)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(exported.serialize())
            os.replace(temporary, self.directory / (key + SUFFIX))
        except BaseException:
            pathlib.Path(temporary).unlink(missing_ok=True)
            raise


class CachedProgram:
    """Called and traced like the jitted function it stands for (``fn(*args)``,
    ``fn.trace(*args)``); on first use it loads the program's exported module, or
    exports and saves it, and from then on runs that module."""

    def __init__(self, cache: ProgramCache, make: Callable[[], Callable], label: str):
        self._cache = cache
        self._make = make
        self._label = label
        self._fn = None
        self._lock = threading.Lock()
        self.loaded = False  # True when the module came from the cache

    def _resolve(self, args) -> Callable:
        with self._lock:
            if self._fn is None:
                self._fn = self._exported_or_traced(args)
            return self._fn

    def _exported_or_traced(self, args) -> Callable:
        structs = abstract_arguments(args)
        key = self._cache.key(self._label, structs)
        if key is None:
            return self._make()
        exported = self._cache.load(key)
        self.loaded = exported is not None
        if exported is None:
            fn = self._make()
            try:
                checks = [export.DisabledSafetyCheck.custom_call(t)
                          for t in VERSION_BOUND_TARGETS]
                exported = export.export(fn, disabled_checks=checks)(*structs)
                self._cache.save(key, exported)
            except Exception as error:  # noqa: BLE001 - not exportable: trace as usual
                logger.info("program cache: %s not stored (%s)", self._label, error)
                return fn
        lower_exported_without_lapack()
        return jax.jit(exported.call)

    def trace(self, *args):
        return self._resolve(args).trace(*args)

    def __call__(self, *args):
        return self._resolve(args)(*args)


def abstract_arguments(args):
    """``args`` (arrays or shape structs) as :class:`jax.ShapeDtypeStruct` s."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), args)


@functools.cache
def environment() -> tuple | None:
    """What a traced program depends on besides its arguments and the merge: jaxmerge's
    source, the JAX version, backend and device kind, and JAX's tracing configuration
    (None if a setting has no stable text, e.g. an object shown by its address)."""
    from jax._src import config

    source = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")):
        source.update(str(path.relative_to(_PACKAGE)).encode() + b"\0" + path.read_bytes())
    settings = tuple((name, repr(value)) for name, value in
                     zip(config.trace_context_names(), config.trace_context())
                     if name != "axis_env_state")  # empty outside transformations
    if any(" at 0x" in text for _, text in settings):
        return None
    import jaxlib

    return (source.hexdigest(), jax.__version__, jaxlib.__version__, jax.default_backend(),
            jax.devices()[0].device_kind, settings)


LAPACK_TARGET_PREFIX = b"lapack_"  # every custom call target of JAX's CPU LAPACK kernels
_lowering = threading.local()


@functools.cache
def lower_exported_without_lapack() -> bool:
    """Has JAX skip the CPU LAPACK initialisation when it lowers a call of an exported
    module whose serialized form names no ``lapack_*`` target (installed once, process
    wide; such a module runs no LAPACK kernel, so nothing else changes). Returns
    whether it applied: not where JAX's internals differ from what this expects."""
    try:
        from jax._src.export import _export
        from jax._src.interpreters import mlir

        rule, ensure = _export._call_exported_lowering, _export._ensure_backends_initialized
        primitive = _export.call_exported_p
    except (ImportError, AttributeError):
        return False

    def ensure_unless_lapack_free(platforms):
        if not getattr(_lowering, "lapack_free", False):
            ensure(platforms)

    def lowering(ctx, *args, exported, **params):
        _lowering.lapack_free = LAPACK_TARGET_PREFIX not in exported.mlir_module_serialized
        try:
            return rule(ctx, *args, exported=exported, **params)
        finally:
            _lowering.lapack_free = False

    _export._ensure_backends_initialized = ensure_unless_lapack_free
    mlir.register_lowering(primitive, lowering)
    return True
