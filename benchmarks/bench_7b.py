"""Synthetic Qwen2.5-7B-shaped merge: wall time and peak RSS of a 3-expert merge per method.

The base and the experts have Qwen2.5-7B's tensor names and shapes (hidden 3584,
intermediate 18944, 28 layers, 28 query / 4 key-value heads of 128, q/k/v biases, vocabulary
152064, untied lm_head; 7.62 B parameters, 15.2 GB per model in bf16) and are generated on
the fly: four such models (61 GB) do not fit this machine's disk. Each model is a
:class:`SyntheticSource` that serves row reads from small per-width pools of random bf16
rows (1024 rows per width and model, ~190 MB in all, generated once per process; a tensor
maps its rows onto the pool from a per-name offset). An expert's pool row is
``bf16(base + δ)``, δ = a rank-1 head (``0.002 · a_i · v_j``) plus 2 % sparse noise, so
matrix task vectors have the concentrated spectrum of RL-style updates and the
randomised top-k SVD converges as on real experts. Reads are memcpys from the pools,
like reads from a warm page cache.

Each method runs in a fresh child process through jaxmerge's Executor and ShardedWriter
(what ``merge_checkpoints`` does, without the config / card files), started by
``benchmarks/common.measure``'s launcher for an honest peak RSS (``os.wait4``); the
merged checkpoint (15.2 GB) is written to ``--output_dir`` (outside the repository) and
deleted after each method, or discarded with ``--sink=null``.

    python benchmarks/bench_7b.py                              # 3 methods, all 28 layers
    python benchmarks/bench_7b.py --methods=resmerge --layers=4
    python benchmarks/bench_7b.py --sink=null --chunk_memory=256MiB
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
import zlib

import ml_dtypes
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB = 3584, 18944, 28, 28, 4, 152064
HEAD_DIM = HIDDEN // HEADS
KV = KV_HEADS * HEAD_DIM
POOL_ROWS = 1024
BF16 = np.dtype(ml_dtypes.bfloat16)


def qwen_shapes(layers: int = LAYERS) -> dict[str, tuple[int, ...]]:
    """Qwen2.5-7B's tensors (HF names, in checkpoint order) with ``layers`` decoder layers."""
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.q_proj.bias": (HIDDEN,),
            p + "self_attn.k_proj.weight": (KV, HIDDEN),
            p + "self_attn.k_proj.bias": (KV,),
            p + "self_attn.v_proj.weight": (KV, HIDDEN),
            p + "self_attn.v_proj.bias": (KV,),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
        })
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def make_pools(widths, experts: int, seed: int = 0) -> dict[int, np.ndarray]:
    """{width: bf16[1 + experts, POOL_ROWS, width]}: base rows N(0, 0.02²), expert rows
    bf16(base + rank-1 head + 2 % sparse noise); generated in blocks of rows, so the
    float32 temporaries stay small next to the peak RSS being measured."""
    pools = {}
    block = 64
    for width in sorted(set(widths)):
        rng = np.random.default_rng([seed, width])
        pool = np.empty((1 + experts, POOL_ROWS, width), BF16)
        heads = [(rng.standard_normal((POOL_ROWS, 1), dtype=np.float32),
                  rng.standard_normal((1, width), dtype=np.float32)) for _ in range(experts)]
        for start in range(0, POOL_ROWS, block):
            rows = slice(start, start + block)
            base = rng.standard_normal((block, width), dtype=np.float32) * 0.02
            pool[0, rows] = base
            for t, (a, v) in enumerate(heads, start=1):
                noise = rng.standard_normal((block, width), dtype=np.float32) * 0.004
                noise *= rng.random((block, width), dtype=np.float32) < 0.02
                pool[t, rows] = base + 0.002 * a[rows] * v + noise
        pools[width] = pool
    return pools


class SyntheticSource:
    """Model ``index`` (0: the base, t: expert t) of the synthetic family, read by rows."""

    def __init__(self, shapes: dict, index: int, pools: dict[int, np.ndarray]):
        self.shapes = shapes
        self.index = index
        self.pools = pools
        self.label = "base" if index == 0 else f"expert {index}"
        self.bytes_read = 0
        self._entries = {name: (BF16, shape) for name, shape in shapes.items()}

    def entries(self):
        return self._entries

    def location(self, name: str) -> str:
        return f"synthetic {self.label} [{name}]"

    def read(self, name, out, rows=None):
        shape = self.shapes[name]
        start, stop = rows if rows is not None else (0, shape[0])
        if len(shape) == 1:
            out[...] = self._vector(name)[start:stop]
        else:
            pool = self.pools[shape[1]][self.index]
            offset = zlib.crc32(name.encode()) % POOL_ROWS
            done = 0
            while done < stop - start:  # rows wrap around the pool
                first = (offset + start + done) % POOL_ROWS
                count = min(POOL_ROWS - first, stop - start - done)
                out[done:done + count] = pool[first:first + count]
                done += count
        self.bytes_read += out.nbytes

    def _vector(self, name: str) -> np.ndarray:
        """Norm weights near 1, biases near 0; an expert moves 2 % of the entries."""
        n = self.shapes[name][0]
        rng = np.random.default_rng([zlib.crc32(name.encode()), 0])
        value = rng.standard_normal(n) * 0.02 + (1.0 if "norm" in name else 0.0)
        if self.index:
            rng = np.random.default_rng([zlib.crc32(name.encode()), self.index])
            value = value + (rng.random(n) < 0.02) * rng.standard_normal(n) * 0.004
        return value.astype(BF16)

    def close(self):
        pass


class NullWriter:
    """A writer that checks shapes and drops the bytes (``--sink=null``)."""

    def __init__(self, tensors):
        self.shapes = {name: shape for name, _, shape in tensors}

    def write(self, name, array, rows=None):
        shape = self.shapes[name]
        expected = shape if rows is None else (rows[1] - rows[0], *shape[1:])
        assert array.shape == tuple(expected), (name, array.shape, expected)

    def close(self):
        return []


def child(args) -> None:
    """One merge in this process; prints one JSON line with the executor's report."""
    import jax

    from jaxmerge import methods
    from jaxmerge.cli_support import parse_size
    from jaxmerge.executor import Executor
    from jaxmerge.io import ShardedWriter
    from jaxmerge.plan import build_plan

    start = time.perf_counter()
    shapes = qwen_shapes(args.layers)
    pools = make_pools([s[1] for s in shapes.values() if len(s) == 2], args.experts)
    pool_bytes = sum(p.nbytes for p in pools.values())
    sources = [SyntheticSource(shapes, i, pools) for i in range(1 + args.experts)]
    plan = build_plan(sources[0], sources[1:])
    executor = Executor(methods.build(args.method, {}), plan, sources[0], sources[1:],
                        key=jax.random.key(0),
                        chunk_bytes=parse_size(args.chunk_memory, "chunk_memory"))
    if args.sink == "disk":
        output = pathlib.Path(args.output)
        output.mkdir(parents=True)
        writer = ShardedWriter(output, plan.output_tensors, 5 * 10**9)
    else:
        writer = NullWriter(plan.output_tensors)
    setup = time.perf_counter() - start
    report = executor.run(writer.write)
    writer.close()
    print(json.dumps({
        "method": args.method, "layers": args.layers, "setup_seconds": setup,
        "merge_seconds": report.seconds, "compute_seconds": report.compute_seconds,
        "read_wait_seconds": report.read_wait_seconds,
        "write_wait_seconds": report.write_wait_seconds, "chunks": report.chunks,
        "compiled_calls": report.compiled_calls, "tensors_written": report.tensors_written,
        "bytes_read": sum(s.bytes_read for s in sources), "pool_mb": pool_bytes / 1e6,
        "parameters": int(sum(np.prod(s) for s in shapes.values())),
    }), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="task_arithmetic,ties,resmerge")
    parser.add_argument("--layers", type=int, default=LAYERS, help="decoder layers (28: all)")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--chunk_memory", default="64MiB")
    parser.add_argument("--sink", choices=("disk", "null"), default="disk")
    parser.add_argument("--output_dir", default=os.path.join(tempfile.gettempdir(),
                                                             "jaxmerge-bench-7b"))
    parser.add_argument("--results", default=str(REPO / "bench_out" / "bench_7b.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    shapes = qwen_shapes(args.layers)
    parameters = int(sum(np.prod(s) for s in shapes.values()))
    output_bytes = 2 * parameters
    print(f"{len(shapes)} tensors, {parameters / 1e9:.2f} B parameters, {args.layers} layers; "
          f"inputs {(1 + args.experts) * output_bytes / 1e9:.1f} GB (generated), output "
          f"{output_bytes / 1e9:.1f} GB ({args.sink})", flush=True)
    print(json.dumps(common.machine_facts()), flush=True)
    workdir = pathlib.Path(args.output_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.sink == "disk" and shutil.disk_usage(workdir).free < 1.2 * output_bytes:
        raise SystemExit(f"{workdir}: less than {1.2 * output_bytes / 1e9:.0f} GB free; "
                         "use --sink=null or another --output_dir")
    results = []
    for method in args.methods.split(","):
        output = workdir / f"merged-{method}"
        shutil.rmtree(output, ignore_errors=True)
        command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child",
                   f"--method={method}", f"--layers={args.layers}",
                   f"--experts={args.experts}", f"--chunk_memory={args.chunk_memory}",
                   f"--sink={args.sink}", f"--output={output}"]
        measured = common.measure(command, workdir / "logs" / f"{method}.log", label=method)
        shutil.rmtree(output, ignore_errors=True)
        log = pathlib.Path(measured.log).read_text(errors="replace")
        if not measured.ok():
            print(common.log_tail(measured.log))
            raise SystemExit(f"{method} failed")
        report = json.loads([line for line in log.splitlines() if line.startswith("{")][-1])
        row = {**report, "wall_seconds": measured.seconds, "cpu_seconds": measured.cpu_seconds,
               "peak_rss_mb": measured.peak_rss_mb, "load_at_start": measured.load_at_start,
               "chunk_memory": args.chunk_memory, "sink": args.sink}
        results.append(row)
        print(f"{method:16s} wall {measured.seconds:8.1f} s  CPU {measured.cpu_seconds:8.1f} s  "
              f"peak RSS {measured.peak_rss_mb:7.0f} MB (pools {report['pool_mb']:.0f} MB)  "
              f"compute {report['compute_seconds']:.0f} s, read wait "
              f"{report['read_wait_seconds']:.0f} s, write wait "
              f"{report['write_wait_seconds']:.0f} s; load at start {measured.load_at_start:.1f}",
              flush=True)
    results_path = pathlib.Path(args.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
