"""Command line: python -m jaxmerge.fisher --model=DIR --data=FILE.jsonl --output=DIR

Never import this module: it defines absl flags whose names other command lines use too.
"""

from __future__ import annotations

import pathlib

from absl import flags

from jaxmerge.cli_support import enable_compilation_cache, parse_size, run_command, run_program
from jaxmerge.errors import ConfigError


def _usage() -> str:
    return "\n".join([
        "jaxmerge fisher: the diagonal Fisher information of a checkpoint, for Fisher-aware "
        "merging.",
        "",
        "Usage:",
        "  python -m jaxmerge.fisher --model=EXPERT_DIR --data=VAL.jsonl --output=FISHER_DIR",
        "  python -m jaxmerge.main --method=fisher --base=BASE --experts=E1,E2 "
        "--fisher=F1,F2 --output=OUT",
        "",
        "Computes, at the model's own parameters θ (METHODS.md §6-§7),",
        "  F_j = E_{(x,y)∈D}[(∂ log p(y|x; θ)/∂θ_j)²],",
        "with log p(y|x) the next-token log-probabilities summed over the RESPONSE tokens",
        "(prompt tokens and padding contribute nothing).",
        "  --mode=per_example  the definition: per-example gradients (vmapped within each",
        "                      micro-batch), squared, averaged over the N examples (default)",
        "  --mode=per_batch    cheaper: F ≈ Σ_b (Σ_{i∈b} ∇ log p_i)² / N over micro-batches b;",
        "                      equal to per_example with --batch_size=1",
        "",
        "Data: JSONL, one {\"prompt\": ..., \"response\": ...} or {\"text\": ...} per line",
        "(for text, every token after the first is scored), tokenised with the checkpoint's",
        "tokenizer; the response ends with EOS; --chat_template wraps the prompt as a user",
        "turn of the tokenizer's chat template.",
        "",
        "Writes FISHER_DIR/model.safetensors (float32 or --dtype=bfloat16) with exactly the",
        "model's tensor names and shapes, and FISHER_DIR/jaxmerge_fisher.json (model, data,",
        "examples, tokens, mode, version), atomically.",
    ])


__doc__ = _usage()

_MODEL = flags.DEFINE_string("model", None, "Checkpoint directory (Hugging Face safetensors "
                             "+ config.json; Llama, Mistral, Qwen2, Qwen3).")
_DATA = flags.DEFINE_string("data", None, "Validation JSONL: {\"prompt\", \"response\"} or "
                            "{\"text\"} per line.")
_OUTPUT = flags.DEFINE_string("output", None, "Fisher checkpoint directory to create.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")
_MODE = flags.DEFINE_enum("mode", "per_example", ["per_example", "per_batch"],
                          "per_example: the definition (mean of squared per-example "
                          "gradients); per_batch: squared micro-batch gradients / N (cheaper).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Examples per micro-batch (per_example "
                                   "holds this many gradient copies).", lower_bound=1)
_MAX_LENGTH = flags.DEFINE_integer("max_length", 512, "Most tokens per example, prompt "
                                   "included; longer examples lose their end.", lower_bound=2)
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", None, "Use only the first N examples.",
                                     lower_bound=1)
_CHAT_TEMPLATE = flags.DEFINE_bool("chat_template", False, "Wrap each prompt as a user turn "
                                   "of the tokenizer's chat template (+ generation prompt).")
_APPEND_EOS = flags.DEFINE_bool("append_eos", True, "End each response with the EOS token "
                                "(scored).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer directory (default --model).")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"],
                                 "Parameter and computation dtype (accumulation is float32).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "dtype of the written Fisher.")
_MAX_SHARD_SIZE = flags.DEFINE_string("max_shard_size", "5GB", "Largest safetensors shard.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", "~/.cache/jaxmerge/xla",
    "Directory of JAX's persistent compilation cache. Empty string: off.")


def run(argv) -> int:
    from jaxmerge.fisher import estimate
    from jaxmerge.io import hf

    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
    missing = [f"--{name}" for name, value in (("model", _MODEL.value), ("data", _DATA.value),
                                               ("output", _OUTPUT.value)) if not value]
    if missing:
        raise ConfigError(f"{', '.join(missing)} required (see --help)")
    hf.check_output_available(_OUTPUT.value, _OVERWRITE.value)
    max_shard_size = parse_size(_MAX_SHARD_SIZE.value, "max_shard_size")
    enable_compilation_cache(_COMPILATION_CACHE.value)
    tensors, stats = estimate.fisher_for_checkpoint(
        _MODEL.value, _DATA.value, mode=_MODE.value, batch_size=_BATCH_SIZE.value,
        max_length=_MAX_LENGTH.value, max_examples=_MAX_EXAMPLES.value,
        chat_template=_CHAT_TEMPLATE.value, append_eos=_APPEND_EOS.value,
        param_dtype=_PARAM_DTYPE.value, tokenizer_dir=_TOKENIZER.value,
        progress=_PROGRESS.value)
    record = {
        "model": str(pathlib.Path(_MODEL.value).resolve()),
        "data": str(pathlib.Path(_DATA.value).resolve()),
        "tokenizer": str(pathlib.Path(_TOKENIZER.value or _MODEL.value).resolve()),
        "definition": "F_j = mean over examples of (d/dθ_j Σ_response log p)^2",
        "batch_size": _BATCH_SIZE.value,
        "max_length": _MAX_LENGTH.value,
        "max_examples": _MAX_EXAMPLES.value,
        "chat_template": _CHAT_TEMPLATE.value,
        "append_eos": _APPEND_EOS.value,
        "param_dtype": _PARAM_DTYPE.value,
        **stats.as_dict(),
    }
    output = estimate.write_fisher(_OUTPUT.value, tensors, record, dtype=_DTYPE.value,
                                   overwrite=_OVERWRITE.value, max_shard_size=max_shard_size)
    print(f"Fisher ({stats.mode}) of {_MODEL.value} over {stats.num_examples} examples, "
          f"{stats.num_tokens} response tokens: {len(tensors)} tensors -> {output} "
          f"({stats.seconds:.1f} s, {len(stats.batch_shapes)} batch shapes)")
    return 0


def main(argv) -> int:
    return run_command(run, argv)


if __name__ == "__main__":
    run_program(main)
