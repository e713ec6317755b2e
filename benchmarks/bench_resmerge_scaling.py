"""ResMerge time vs matrix size: randomised vs exact top-1 SVD, and torch's full SVD.

    python benchmarks/bench_resmerge_scaling.py [--sizes=576x576,2048x5632,3584x18944]
        [--experts=3] [--repeats=3] [--exact-max-entries=80e6] [--no-torch]

For each size, one matrix leaf with N RL-like task vectors (sparse entries plus a
rank-1 block, as ``jaxmerge.demo`` derives its experts) is merged by jaxmerge's
compiled ResMerge leaf function (head/residual split, SRC-A, LHC), once with
``svd=auto`` (randomised subspace iteration) and once with ``svd=exact``; compile
time is reported apart. ``torch`` is what the papers' scripts spend on SVD alone:
``torch.linalg.svd(full_matrices=False)`` of each of the N task matrices.

It prints one line per size and a Qwen2.5-7B estimate (28 layers of q/o 3584²,
k/v 512×3584, gate/up 18944×3584, down 3584×18944) from per-entry rates at the
largest measured size, and writes the figures as JSON (``--output``).
Run on an idle machine; on a GPU host jax uses the GPU, and the torch SVDs are timed on
the CPU (the papers' setup) and, as a second column, on the GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge import demo, methods
from jaxmerge.algebra import LeafContext
from jaxmerge.executor import leaf_keys
from jaxmerge.leaves import LeafInfo

QWEN_7B_LAYER = {(3584, 3584): 2, (512, 3584): 2, (18944, 3584): 2, (3584, 18944): 1}
QWEN_7B_LAYERS = 28


def parse_size(text: str) -> tuple[int, int]:
    rows, cols = text.lower().split("x")
    return int(rows), int(cols)


def task_vectors(shape, experts: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
    name = "model.layers.0.mlp.down_proj.weight"
    return np.stack([demo.task_vector(name, base, seed, density=0.02, rank=1, scale=0.01,
                                      regime="rl") for seed in range(experts)])


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def time_jaxmerge(taus: np.ndarray, svd: str, repeats: int) -> dict:
    name = "model.layers.0.mlp.down_proj.weight"
    info = LeafInfo.from_name(name, taus.shape[1:])
    merge = methods.resmerge(svd=svd)
    keys = leaf_keys(jax.random.PRNGKey(0), name, taus.shape[0])

    def leaf(x):
        ctx = LeafContext(x, jnp.zeros(x.shape[1:], jnp.float32), keys, {}, {}, jnp.int32(0),
                          info)
        return merge.apply(x, ctx)

    device_taus = jax.device_put(taus)
    start = time.perf_counter()
    compiled = jax.jit(leaf).lower(device_taus).compile()
    compile_s = time.perf_counter() - start
    result = compiled(device_taus)
    seconds = best_of(lambda: compiled(device_taus), repeats)
    return {"seconds": seconds, "compile_s": compile_s, "delta": np.asarray(result)}


def time_torch_svd(taus: np.ndarray, repeats: int, device: str = "cpu") -> float:
    import torch

    tensors = [torch.from_numpy(t).to(device) for t in taus]

    def run():
        for t in tensors:
            torch.linalg.svd(t, full_matrices=False)
        if device == "cuda":
            torch.cuda.synchronize()

    if device != "cpu":
        run()  # warm-up (CUDA context, cuSOLVER handles)

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="576x576,2048x5632,3584x18944")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--exact-max-entries", type=float, default=80e6,
                        help="skip svd=exact (and torch) above this many entries per matrix")
    parser.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--output", default="bench_resmerge_scaling.json")
    args = parser.parse_args()

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} "
          f"({jax.default_backend()}), {args.experts} experts per leaf, best of {args.repeats}")
    rows = []
    for text in args.sizes.split(","):
        shape = parse_size(text)
        taus = task_vectors(shape, args.experts)
        entries = math.prod(shape)
        row = {"shape": shape, "experts": args.experts}
        fast = time_jaxmerge(taus, "auto", args.repeats)
        row.update(randomized_s=fast["seconds"], randomized_compile_s=fast["compile_s"])
        if entries <= args.exact_max_entries:
            exact = time_jaxmerge(taus, "exact", max(1, args.repeats // 3))
            row.update(exact_s=exact["seconds"], exact_compile_s=exact["compile_s"])
            error = np.linalg.norm(fast["delta"] - exact["delta"]) / np.linalg.norm(
                exact["delta"])
            row["relative_difference"] = float(error)
            if args.torch:
                row["torch_svd_s"] = time_torch_svd(taus, max(1, args.repeats // 3))
                if torch_cuda_available():
                    row["torch_cuda_svd_s"] = time_torch_svd(taus, args.repeats, "cuda")
        rows.append(row)
        line = (f"{shape[0]:>6}x{shape[1]:<6} randomized {row['randomized_s'] * 1e3:9.1f} ms "
                f"(compile {row['randomized_compile_s']:.1f} s)")
        if "exact_s" in row:
            line += (f" | exact {row['exact_s'] * 1e3:9.1f} ms "
                     f"({row['exact_s'] / row['randomized_s']:.0f}x slower)"
                     f" | rel. diff {row['relative_difference']:.1e}")
        if "torch_svd_s" in row:
            line += (f" | torch full SVDs {row['torch_svd_s'] * 1e3:9.1f} ms "
                     f"({row['torch_svd_s'] / row['randomized_s']:.0f}x)")
        if "torch_cuda_svd_s" in row:
            line += (f" | on cuda {row['torch_cuda_svd_s'] * 1e3:9.1f} ms "
                     f"({row['torch_cuda_svd_s'] / row['randomized_s']:.0f}x)")
        print(line, flush=True)

    largest = max(rows, key=lambda r: math.prod(r["shape"]))
    per_entry = largest["randomized_s"] / math.prod(largest["shape"])
    layer_entries = sum(count * math.prod(shape) for shape, count in QWEN_7B_LAYER.items())
    estimate = per_entry * layer_entries * QWEN_7B_LAYERS
    print(f"Qwen2.5-7B matrix leaves ({QWEN_7B_LAYERS} layers, {args.experts} experts), "
          f"ResMerge compute at the {largest['shape']} rate: ~{estimate:.0f} s "
          "(plus reading/writing the checkpoints)")
    if "exact_s" in largest:
        exact_estimate = largest["exact_s"] / math.prod(largest["shape"]) * layer_entries * 28
        print(f"  with svd=exact: ~{exact_estimate:.0f} s")
    with open(args.output, "w") as handle:
        json.dump({"rows": rows, "qwen7b_estimate_s": estimate,
                   "device": str(jax.devices()[0])}, handle, indent=1)


if __name__ == "__main__":
    main()
