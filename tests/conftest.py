"""Shared test setup: absl flags parsed, float32 JAX on CPU, session-scoped checkpoints."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests merge tiny arrays: XLA's compile time dominates, so compile without LLVM
# optimisation (about 2x faster). Subprocess CLI runs drop this (see tests/cli.py).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS).strip()

import tempfile  # noqa: E402

import jax  # noqa: E402
from absl import flags  # noqa: E402

# A fresh persistent compilation cache per session: identical programs compiled by
# different tests (same method, same shapes) are compiled once.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="jaxmerge-xla-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_configure(config):
    # absl flags are unparsed under pytest; the CLI reads them through FlagHolders.
    flags.FLAGS.mark_as_parsed()
