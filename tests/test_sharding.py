"""Scale-out: merges on 8 simulated CPU devices and on 2 processes equal the one-device merge.

JAX fixes the device count and the distributed client at start-up, so every run here is
a fresh process of ``tests/sharding_worker.py`` (one for all methods on 8 devices; two
``jax.distributed`` processes over localhost plus a one-process reference for the
multi-process test). The worker's checkpoints are shaped so that a small chunk budget
exercises both strategies: leaf-parallel chunks (several norm vectors per device,
padding) and, for merges that are not row-wise, one FFN matrix sharded by rows over all
devices; row-wise merges cut the same oversized matrices into row blocks spread over
the devices. Every FFN matrix is larger than the per-device budget.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

from jaxmerge import methods
from tests import sharding_worker as worker

WORKER = pathlib.Path(worker.__file__)
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
"""As tests/conftest.py: tiny arrays, so compile without LLVM optimisation."""


def worker_env(devices: int) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # conftest's flags; set ours explicitly
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return worker.build_checkpoints(tmp_path_factory.mktemp("sharding"))


@pytest.fixture(scope="module")
def equivalence(checkpoints, tmp_path_factory):
    """{method: figures} of every method on one device and on eight (one subprocess)."""
    out = tmp_path_factory.mktemp("sharding-out")
    done = subprocess.run(
        [sys.executable, str(WORKER), "equivalence", str(checkpoints["base"].parent), str(out)],
        env=worker_env(8), capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {row["method"]: row for row in rows}


def test_every_method_is_covered(equivalence):
    assert set(equivalence) == set(methods.REGISTRY)
    for row in equivalence.values():
        assert row["devices"] == [1, 8]
        assert row["tensors_written"][0] == row["tensors_written"][1] == 22


@pytest.mark.parametrize("method", [m for m in methods.REGISTRY if m not in worker.SPECTRAL])
def test_eight_devices_bit_identical(equivalence, method):
    row = equivalence[method]
    assert row["differing"] == 0, row


@pytest.mark.parametrize("method", worker.SPECTRAL)
def test_eight_devices_spectral_within_tolerance(equivalence, method):
    row = equivalence[method]
    assert row["max_relative"] <= worker.SPECTRAL_TOLERANCE, row


def test_both_strategies_and_oversized_leaves(equivalence):
    # Every merge ran leaf-parallel chunks on the mesh.
    assert all(row["leaf_parallel_chunks"] > 0 for row in equivalence.values())
    # Merges that are not row-wise sharded each oversized FFN matrix by rows
    # (5 leaves, one chunk each); row-wise ones cut them into row blocks instead.
    assert equivalence["model_stock"]["row_sharded_chunks"] == worker.LAYERS
    assert equivalence["resmerge"]["row_sharded_chunks"] == worker.LAYERS
    assert equivalence["task_arithmetic"]["row_sharded_chunks"] == 0
    assert equivalence["task_arithmetic"]["chunks"][1] > equivalence["task_arithmetic"]["chunks"][0]
    ffn_bytes = np.prod(worker.FFN) * 4 * (2 + 12)  # base + 3 experts, stored + f32 work
    assert ffn_bytes > worker.CHUNK_BYTES


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


RECIPE = """
import jaxmerge
from jaxmerge import methods

# Row-sharded ResMerge on the FFN matrices (larger than the budget, not row-wise), global-scope
# TIES elsewhere: its three whole-model passes sum statistics across the processes.
merge = jaxmerge.route({jaxmerge.family("ffn"): methods.resmerge()},
                       default=methods.ties(scope="global"))
"""


def run_workers(count: int, flags: list[str], devices: int) -> list[dict]:
    """``count`` CLI processes (jax.distributed over localhost when count > 1)."""
    port = free_port()
    children = [subprocess.Popen(
        [sys.executable, str(WORKER), "cli", str(i), str(count), str(port), "--", *flags],
        env=worker_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(count)]
    results = []
    try:
        for child in children:
            stdout, stderr = child.communicate(timeout=300)
            assert child.returncode == 0, stderr[-4000:]
            results.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    return results


def test_two_processes_equal_one(checkpoints, tmp_path):
    recipe = tmp_path / "recipe.py"
    recipe.write_text(RECIPE)
    common = [f"--recipe={recipe}", f"--base={checkpoints['base']}",
              "--experts=" + ",".join(str(e) for e in checkpoints["experts"]),
              "--dtype=float32", "--max_shard_size=20KB", "--seed=3",
              f"--chunk_memory={worker.CHUNK_BYTES}"]
    pair = run_workers(2, [*common, f"--output={tmp_path / 'two'}"], devices=2)
    (single,) = run_workers(1, [*common, f"--output={tmp_path / 'one'}"], devices=1)

    assert [p["code"] for p in pair] == [0, 0] and single["code"] == 0
    assert sorted(p["process"] for p in pair) == [0, 1]
    assert pair[0]["processes"] == 2 and pair[0]["devices"] == 4
    # Both strategies ran across the processes.
    assert all(p["leaf_parallel_chunks"] > 0 and p["row_sharded_chunks"] > 0 for p in pair)
    # Each process read about half of what one process reads.
    total = single["bytes_read"]
    assert sum(p["bytes_read"] for p in pair) == total
    for p in pair:
        assert 0.4 * total <= p["bytes_read"] <= 0.6 * total, (p, total)

    # One valid sharded checkpoint: every shard loads, the index covers every tensor.
    two, one = tmp_path / "two", tmp_path / "one"
    index = json.loads((two / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and sorted(p.name for p in two.glob("*.safetensors")) == shards
    loaded = {}
    for shard in shards:
        loaded.update(safetensors.numpy.load_file(str(two / shard)))
    assert set(loaded) == set(index["weight_map"]) == set(worker.tensor_shapes())
    assert (two / "config.json").exists() and (two / "jaxmerge_config.json").exists()
    assert not list(tmp_path.glob(".two*"))  # no staging directory left

    expected = worker.read_tensors(one)
    base = worker.read_tensors(checkpoints["base"])
    for name, value in expected.items():
        if ".mlp." in name:  # row-sharded ResMerge: across-device sums in another order
            compared = worker.compare({name: value}, {name: loaded[name]}, base)
            assert compared["max_relative"] <= worker.SPECTRAL_TOLERANCE, (name, compared)
        else:
            np.testing.assert_array_equal(loaded[name], value, err_msg=name)


def test_route_by_layer_within_a_shape_group():
    """Leaves of one shape group routed to different merges never share a compiled chunk
    (the executor splits groups by the merge's static choice)."""
    import jaxmerge
    from jaxmerge import ops

    def model(value):
        return {"model": {"layers": {str(i): {"mlp": {"up_proj": {
            "weight": np.full((4, 4), value, np.float32)}}} for i in range(3)}}}

    five_times = jaxmerge.chain(ops.mean(), jaxmerge.scale(5.0))
    recipe = jaxmerge.route({jaxmerge.layers(1, 1): five_times}, default=ops.mean())
    merged = jaxmerge.merge(recipe, model(0.0), [model(1.0), model(3.0)])
    layers = merged["model"]["layers"]
    for i, expected in ((0, 2.0), (1, 10.0), (2, 2.0)):
        np.testing.assert_array_equal(np.asarray(layers[str(i)]["mlp"]["up_proj"]["weight"]),
                                      np.full((4, 4), expected, np.float32))


def test_mesh_and_cluster_flags_are_checked():
    import jax

    from jaxmerge import distributed
    from jaxmerge.errors import ConfigError

    assert distributed.parse_mesh_shape("2,4") == (2, 4)
    assert distributed.parse_mesh_shape([-1]) == (-1,)
    assert distributed.parse_mesh_shape(None) is None
    for bad in ("2,x", "0", "-2", "-1,-1", "1,1,1,1,1"):
        with pytest.raises(ConfigError):
            distributed.parse_mesh_shape(bad)
    assert distributed.make_mesh(None).devices.size == jax.device_count()
    with pytest.raises(ConfigError, match="needs"):
        distributed.make_mesh(str(jax.device_count() + 1))
    assert distributed.initialize() is False  # nothing asked: no jax.distributed
    for args in (("localhost:1", None, 0), (None, 2, 0), ("localhost:1", 2, None),
                 ("localhost:1", 2, 2), ("localhost:1", 0, 0)):
        with pytest.raises(ConfigError):
            distributed.initialize(*args)
