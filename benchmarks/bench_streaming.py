"""Streaming proof: merge checkpoints several times larger than the merge's peak memory.

Writes a synthetic Llama-shaped base and N experts in bf16 (about --gigabytes each,
random data generated tensor by tensor, never committed), then runs the jaxmerge CLI
on them as a child process per method and reports wall time and the child's peak RSS
(os.wait4) against the total input size.

    python benchmarks/bench_streaming.py                      # 4 x 1 GB, three methods
    python benchmarks/bench_streaming.py --gigabytes=0.25 --methods=task_arithmetic
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time

import ml_dtypes
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402
from jaxmerge.io import ShardedWriter  # noqa: E402

HIDDEN, INTERMEDIATE, VOCAB = 2048, 5632, 32000
LAYER_SHAPES = {
    "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
    "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
    "self_attn.v_proj.weight": (HIDDEN, HIDDEN),
    "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
    "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
    "input_layernorm.weight": (HIDDEN,),
    "post_attention_layernorm.weight": (HIDDEN,),
}


def tensor_shapes(gigabytes: float) -> dict[str, tuple[int, ...]]:
    """Llama-7B-like tensor shapes, with as many layers as fit in ``gigabytes`` of bf16."""
    fixed = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "lm_head.weight": (VOCAB, HIDDEN),
             "model.norm.weight": (HIDDEN,)}
    fixed_bytes = sum(2 * np.prod(s) for s in fixed.values())
    layer_bytes = sum(2 * np.prod(s) for s in LAYER_SHAPES.values())
    layers = max(1, int((gigabytes * 1e9 - fixed_bytes) // layer_bytes))
    shapes = {"model.embed_tokens.weight": fixed["model.embed_tokens.weight"]}
    for i in range(layers):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in LAYER_SHAPES.items()})
    shapes.update({"model.norm.weight": fixed["model.norm.weight"],
                   "lm_head.weight": fixed["lm_head.weight"]})
    return shapes


def write_model(directory: pathlib.Path, shapes, seed: int, base_seed: int | None) -> None:
    """Base (``base_seed`` None) or expert = base + sparse delta, tensor by tensor."""
    if (directory / "config.json").exists():
        return
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    dtype = np.dtype(ml_dtypes.bfloat16)
    writer = ShardedWriter(staging, [(n, dtype, s) for n, s in shapes.items()], 2 * 10**9)
    for index, (name, shape) in enumerate(shapes.items()):
        base_rng = np.random.default_rng([base_seed if base_seed is not None else seed, index])
        value = base_rng.standard_normal(shape, dtype=np.float32) * 0.02
        if base_seed is not None:  # an expert: 2 % of the entries move
            rng = np.random.default_rng([seed, index])
            moved = rng.random(shape, dtype=np.float32) < 0.02
            value += moved * rng.standard_normal(shape, dtype=np.float32) * 0.004
        writer.write(name, value.astype(dtype))
    writer.close()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "vocab_size": VOCAB,
              "num_hidden_layers": sum(1 for n in shapes if n.endswith("q_proj.weight")),
              "num_attention_heads": 16, "num_key_value_heads": 16, "dtype": "bfloat16",
              "tie_word_embeddings": False}
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    if directory.exists():
        shutil.rmtree(directory)
    staging.rename(directory)


def measure(command: list[str], log_path: pathlib.Path) -> dict:
    """Wall time and peak RSS of a child process, through common.measure's launcher.

    (A child spawned straight from this process would report at least this process's
    own peak RSS, which includes writing the synthetic checkpoints.)
    """
    result = common.measure(command, log_path)
    return {"seconds": result.seconds, "peak_rss_mb": result.peak_rss_mb,
            "returncode": result.returncode, "output": common.log_tail(log_path)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=1.0, help="size of each model")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--methods", default="task_arithmetic,ties,dare_ties")
    parser.add_argument("--chunk_memory", default="64MiB")
    parser.add_argument("--workdir", default="bench_out/streaming")
    args = parser.parse_args()

    workdir = REPO / args.workdir
    shapes = tensor_shapes(args.gigabytes)
    start = time.perf_counter()
    base = workdir / "base"
    write_model(base, shapes, seed=0, base_seed=None)
    experts = [workdir / f"expert-{i}" for i in range(args.experts)]
    for i, expert in enumerate(experts):
        write_model(expert, shapes, seed=100 + i, base_seed=0)
    inputs = sum(f.stat().st_size for d in [base, *experts] for f in d.glob("*.safetensors"))
    largest = max(2 * int(np.prod(s)) for s in shapes.values())
    print(f"inputs: {1 + len(experts)} models, {inputs / 1e9:.2f} GB in total "
          f"({time.perf_counter() - start:.0f} s to write or find); largest tensor "
          f"{largest / 1e6:.0f} MB per model")

    results = []
    for method in args.methods.split(","):
        output = workdir / f"merged-{method}"
        command = [sys.executable, "-m", "jaxmerge.main", f"--method={method}",
                   f"--base={base}", f"--experts={','.join(map(str, experts))}",
                   f"--output={output}", "--overwrite", "--progress=false",
                   f"--chunk_memory={args.chunk_memory}"]
        result = measure(command, workdir / "logs" / f"{method}.log")
        if result["returncode"] != 0:
            print(result["output"])
            raise SystemExit(f"{method} failed")
        ratio = inputs / (result["peak_rss_mb"] * 1e6)
        results.append({"method": method, **{k: v for k, v in result.items() if k != "output"},
                        "inputs_gb": inputs / 1e9, "inputs_over_peak_rss": ratio})
        print(f"{method:16s} {result['seconds']:7.1f} s   peak RSS {result['peak_rss_mb']:7.0f} MB"
              f"   inputs / peak RSS = {ratio:4.1f}x")
        shutil.rmtree(output)
    (workdir / "bench_streaming.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
