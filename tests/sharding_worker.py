"""Subprocess side of tests/test_sharding.py: merges on simulated CPU devices.

JAX fixes its device count and its distributed client at start-up, so the tests run
this file as a fresh process (``XLA_FLAGS=--xla_force_host_platform_device_count=8``):

    python tests/sharding_worker.py equivalence CHECKPOINTS OUT
        every method of methods.REGISTRY on one device and on all 8, one JSON line each
    python tests/sharding_worker.py cli PROCESS_ID NUM_PROCESSES PORT -- CLI FLAGS...
        the jaxmerge CLI as one process of a jax.distributed run over localhost
        (NUM_PROCESSES 1: a plain run), then one JSON line with this process's figures

The checkpoints (:func:`build_checkpoints`, plain NumPy) are shaped so that one small
chunk budget exercises both scale-out strategies: many small norm vectors (several
leaves per device, the last chunk padded), attention matrices that fit the budget, and
FFN matrices larger than it (row blocks or, for merges that are not row-wise, one leaf
sharded by rows over all devices).
"""

from __future__ import annotations

import json
import pathlib
import sys

import ml_dtypes
import numpy as np

LAYERS = 5
HIDDEN = 16
FFN = (32, 64)
CHUNK_BYTES = 40_000
"""Budget of the 8-device runs: norms and attention matrices fit, FFN matrices do not."""

SPECTRAL = ("resmerge", "tsv", "iso_c", "iso_cts", "star")
"""Methods whose result goes through an SVD (exact or randomised)."""

SPECTRAL_TOLERANCE = 1e-4
"""8 devices vs 1, SVD-based methods: max |difference| ≤ this × max |Δ| per tensor
(documented in BUILD.md; observed ≤ 7.3e-6, iso_cts, on CPU)."""


def tensor_shapes() -> dict[str, tuple[tuple[int, ...], str]]:
    """Llama-style names: (shape, dtype) of a tiny model with three shape groups."""
    shapes = {"model.rotary_buffer": ((16,), "int32")}  # a non-float tensor: copied
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}."
        shapes[prefix + "input_layernorm.weight"] = ((FFN[0],), "bfloat16")
        shapes[prefix + "self_attn.o_proj.weight"] = ((HIDDEN, HIDDEN), "bfloat16")
        shapes[prefix + "mlp.down_proj.weight"] = (FFN, "bfloat16")
        shapes[prefix + "post_attention_layernorm.weight"] = ((FFN[0],), "bfloat16")
    shapes["model.norm.weight"] = ((FFN[0],), "bfloat16")
    return shapes


def build_checkpoints(root) -> dict:
    """A base, 3 RL-like experts and 3 Fisher checkpoints under ``root`` (idempotent)."""
    import safetensors.numpy

    from jaxmerge.demo import derive_expert

    root = pathlib.Path(root)
    base = root / "base"
    if not (base / "model.safetensors").exists():
        rng = np.random.default_rng(0)
        tensors = {}
        for name, (shape, dtype) in tensor_shapes().items():
            if dtype == "int32":
                tensors[name] = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)
            else:
                value = rng.standard_normal(shape) * 0.05 + (1.0 if len(shape) == 1 else 0.0)
                tensors[name] = value.astype(ml_dtypes.bfloat16)
        base.mkdir(parents=True, exist_ok=True)
        safetensors.numpy.save_file(tensors, str(base / "model.safetensors"))
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                  "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "torch_dtype": "bfloat16"}
        (base / "config.json").write_text(json.dumps(config))
    experts = [derive_expert(base, root / f"expert-{i}", seed=i + 1, density=0.3)
               for i in range(3)]
    fishers = []
    for i in range(3):
        directory = root / f"fisher-{i}"
        if not (directory / "model.safetensors").exists():
            rng = np.random.default_rng(100 + i)
            directory.mkdir(parents=True, exist_ok=True)
            tensors = {name: rng.gamma(0.5, 1e-3, shape).astype(np.float32)
                       for name, (shape, _) in tensor_shapes().items()}
            safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"))
        fishers.append(directory)
    return {"base": base, "experts": experts, "fishers": fishers}


def read_tensors(directory) -> dict[str, np.ndarray]:
    from jaxmerge.io import Checkpoint

    with Checkpoint.open(directory) as checkpoint:
        return {name: checkpoint.read(name) for name in checkpoint.tensors}


def compare(reference: dict, other: dict, base: dict) -> dict:
    """Differing entries, worst |difference|, and worst |difference| / max |Δ| per tensor."""
    assert reference.keys() == other.keys()
    differing, worst, worst_relative = 0, 0.0, 0.0
    for name, expected in reference.items():
        expected = expected.astype(np.float64)
        got = other[name].astype(np.float64)
        gap = np.abs(got - expected)
        differing += int(np.count_nonzero(gap))
        if gap.size and gap.max() > 0:
            scale = np.abs(expected - base[name].astype(np.float64)).max()
            worst = max(worst, float(gap.max()))
            worst_relative = max(worst_relative, float(gap.max() / max(scale, 1e-30)))
    return {"differing": differing, "max_abs": worst, "max_relative": worst_relative}


def equivalence(root, out) -> None:
    """Every method: one device vs all 8 devices under a small budget; one JSON line each."""
    import jax

    from jaxmerge import methods
    from jaxmerge.api import merge_checkpoints

    assert jax.device_count() == 8, jax.devices()
    inputs = build_checkpoints(root)
    base = read_tensors(inputs["base"])
    out = pathlib.Path(out)
    for method in methods.REGISTRY:
        merge = methods.build(method, {})
        experts = inputs["experts"][:2] if method == "slerp" else inputs["experts"]
        extras = ({"fisher": inputs["fishers"][:len(experts)]}
                  if "fisher" in merge.extra_inputs else None)
        results, reports = {}, {}
        for label, mesh_shape, chunk_bytes in (("one", (1,), 64 * 2**20),
                                               ("eight", None, CHUNK_BYTES)):
            result = merge_checkpoints(
                merge, inputs["base"], experts, out / f"{method}-{label}", seed=7,
                dtype="float32", extras=extras, mesh_shape=mesh_shape, chunk_bytes=chunk_bytes)
            results[label] = read_tensors(result.output)
            reports[label] = result.report
        eight = reports["eight"]
        print(json.dumps({
            "method": method,
            **compare(results["one"], results["eight"], base),
            "devices": [reports["one"].devices, eight.devices],
            "leaf_parallel_chunks": eight.leaf_parallel_chunks,
            "row_sharded_chunks": eight.row_sharded_chunks,
            "chunks": [reports["one"].chunks, eight.chunks],
            "tensors_written": [reports["one"].tensors_written, eight.tensors_written],
        }), flush=True)


def cli(process_id: int, num_processes: int, port: int, flags: list[str]) -> None:
    """The CLI as one process of a localhost jax.distributed run; prints this process's
    bytes read and run report as a JSON line."""
    from absl import flags as absl_flags

    from jaxmerge import api
    from jaxmerge import main as cli_main

    captured = {}
    merge_checkpoints = api.merge_checkpoints

    def capture(*args, **kwargs):
        captured["result"] = merge_checkpoints(*args, **kwargs)
        return captured["result"]

    api.merge_checkpoints = capture
    distributed = ([f"--coordinator_address=localhost:{port}",
                    f"--num_processes={num_processes}", f"--process_id={process_id}"]
                   if num_processes > 1 else [])
    absl_flags.FLAGS(["jaxmerge", "--progress=false", "--compilation_cache=", *distributed,
                      *flags])
    code = cli_main.main(["jaxmerge"])
    import jax

    report = captured["result"].report if "result" in captured else None
    print(json.dumps({
        "code": code,
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "bytes_read": report.bytes_read if report else None,
        "leaf_parallel_chunks": report.leaf_parallel_chunks if report else None,
        "row_sharded_chunks": report.row_sharded_chunks if report else None,
        "files": captured["result"].files if report else None,
    }), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    command, *args = sys.argv[1:]
    if command == "equivalence":
        equivalence(*args)
    elif command == "cli":
        cli(int(args[0]), int(args[1]), int(args[2]), args[args.index("--") + 1:])
    else:
        raise SystemExit(f"unknown command {command!r}")
