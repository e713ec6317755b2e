"""Shared test setup: absl flags parsed, float32 JAX on CPU, session-scoped checkpoints."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests merge tiny arrays: XLA's compile time dominates, so compile without LLVM
# optimisation (about 2x faster). Subprocess CLI runs drop this (see tests/cli.py).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS).strip()

import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

# A fresh persistent compilation cache per session: identical programs compiled by
# different tests (same method, same shapes) are compiled once.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="jaxmerge-xla-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_configure(config):
    # absl flags are unparsed under pytest; the CLI reads them through FlagHolders.
    flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny random bf16 Llama base and 3 sparse experts derived from it (read-only)."""
    from tests.checkpoints import make_tiny_expert, make_tiny_llama

    root = tmp_path_factory.mktemp("tiny")
    base = make_tiny_llama(root / "base", seed=0, dtype="bfloat16")
    experts = [make_tiny_expert(base, root / f"expert-{i}", seed=i + 1) for i in range(3)]
    return base, experts


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The real SmolLM2-135M-Instruct (bf16) + 3 RL-like experts, built once per session."""
    from jaxmerge import demo
    from jaxmerge.errors import ConfigError

    try:
        demo.find_smollm2_gguf()
    except ConfigError as error:
        pytest.skip(str(error))
    root = tmp_path_factory.mktemp("smollm2")
    start = time.perf_counter()
    base = demo.build_smollm2_base(root / "base")
    built = time.perf_counter()
    experts = [demo.derive_expert(base, root / f"expert-{i}", seed=i) for i in range(3)]
    derived = time.perf_counter()
    return {
        "base": base,
        "experts": experts,
        "base_seconds": built - start,
        "expert_seconds": (derived - built) / 3,
    }
