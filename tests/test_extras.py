"""Per-expert extra inputs (e.g. Fisher tensors) stream beside the experts under the same names."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxmerge
from jaxmerge.errors import ConfigError
from tests.test_cli import read_native, write_checkpoint
from tests.test_methods import NAMES, make_models


def fisher_weighted():
    """θ = Σ F̃_t θ_t / Σ F̃_t with F̃ = F + 1e-6 (Matena & Raffel), written with the algebra."""

    def apply(taus, ctx):
        weights = ctx.extras["fisher"] + 1e-6
        return jnp.sum(weights * taus, axis=0) / jnp.sum(weights, axis=0)

    return jaxmerge.Merge(apply, extra_inputs=("fisher",))


def reference(base, experts, fishers):
    out = {}
    for name, b in base.items():
        w = np.stack([f[name].astype(np.float64) + 1e-6 for f in fishers])
        thetas = np.stack([e[name].astype(np.float64) for e in experts])
        out[name] = (w * thetas).sum(0) / w.sum(0)
    return out


def fishers_for(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{k: rng.random(s).astype(np.float32) ** 4 for k, s in NAMES.items()} for _ in range(n)]


def test_extras_in_memory_match_reference():
    base, experts, _ = make_models(3, seed=2)
    fishers = fishers_for(3)
    merged = jaxmerge.merge(fisher_weighted(), base, experts, extras={"fisher": fishers})
    expected = reference(base, experts, fishers)
    for name in base:
        np.testing.assert_allclose(np.asarray(merged[name]), expected[name], rtol=1e-5, atol=1e-6)


def test_extras_from_checkpoints_equal_in_memory(tmp_path):
    base, experts, _ = make_models(2, seed=3)
    fishers = fishers_for(2, seed=1)
    base_dir = write_checkpoint(tmp_path / "base", base)
    expert_dirs = [write_checkpoint(tmp_path / f"e{i}", e) for i, e in enumerate(experts)]
    fisher_dirs = [write_checkpoint(tmp_path / f"f{i}", f) for i, f in enumerate(fishers)]
    jaxmerge.merge_checkpoints(fisher_weighted(), base_dir, expert_dirs, tmp_path / "out",
                               extras={"fisher": fisher_dirs})
    files = read_native(tmp_path / "out")
    memory = jaxmerge.merge(fisher_weighted(), base, experts, extras={"fisher": fishers})
    for name in base:
        np.testing.assert_array_equal(files[name], np.asarray(memory[name]))


def test_missing_or_mismatched_extras_are_reported(tmp_path):
    base, experts, _ = make_models(2, seed=4)
    with pytest.raises(jaxmerge.JaxmergeError, match="fisher"):
        jaxmerge.merge(fisher_weighted(), base, experts)
    with pytest.raises(ConfigError, match="1 fisher inputs for 2 experts"):
        jaxmerge.merge(fisher_weighted(), base, experts, extras={"fisher": fishers_for(1)})
    bad = fishers_for(2)
    bad[1][next(iter(NAMES))] = np.zeros((2, 2), np.float32)
    with pytest.raises(jaxmerge.MismatchError, match="fisher shape"):
        jaxmerge.merge(fisher_weighted(), base, experts, extras={"fisher": bad})
