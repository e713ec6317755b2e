"""Command line: python -m jaxmerge.main --method=NAME --base=DIR --experts=DIR,DIR --output=DIR

A thin absl front-end over jaxmerge.merge_checkpoints: flags -> a Merge -> one
streaming run. No math lives here.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import runpy
import shlex
import sys
import tempfile

from absl import flags

from jaxmerge import methods
from jaxmerge.algebra import Merge
from jaxmerge.cli_support import enable_compilation_cache, parse_size, run_command, run_program
from jaxmerge.errors import ConfigError, JaxmergeError
from jaxmerge.io.hf import check_output_available
from jaxmerge.programs import ProgramCache


def _usage() -> str:
    lines = [
        "jaxmerge: merge fine-tuned Hugging Face checkpoints into one.",
        "",
        "Usage:",
        "  python -m jaxmerge.main --method=ties --base=BASE_DIR \\",
        "      --experts=EXPERT_1,EXPERT_2 --output=OUT_DIR [--density=0.2 ...]",
        "  python -m jaxmerge.main --recipe=my_merge.py --base=... --experts=... --output=...",
        "  python -m jaxmerge.main --demo        # builds SmolLM2-135M + 3 experts and merges them",
        "",
        "Methods (hyperparameter flags in brackets; defaults follow METHODS.md):",
    ]
    for name, spec in methods.REGISTRY.items():
        hyper = ", ".join(f"--{flag}" for flag in spec.flags)
        if spec.uses_weights:
            hyper = ", ".join(filter(None, [hyper, "--weights"]))
        lines.append(f"  {name:17s} {spec.summary}" + (f" [{hyper}]" if hyper else ""))
    lines += [
        "",
        "The output directory is written atomically (a temporary sibling renamed at the",
        "end) and holds sharded safetensors + index, config.json, the base's tokenizer",
        "and generation config, jaxmerge_config.json (the full record) and a README model",
        "card. Load it with transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR).",
    ]
    return "\n".join(lines)


__doc__ = _usage()  # absl prints the main module's docstring as the usage text.

_METHOD = flags.DEFINE_enum("method", None, list(methods.REGISTRY),
                            "Merge method (see the list above). Exclusive with --recipe.")
_RECIPE = flags.DEFINE_string(
    "recipe", None,
    "Python file that builds a jaxmerge.Merge with the algebra and binds it to the name "
    "`merge` (e.g. merge = jaxmerge.chain(ops.trim(0.3), ops.elect_sign(), "
    "ops.disjoint_mean())). Exclusive with --method.")
_BASE = flags.DEFINE_string("base", None, "Base model directory (Hugging Face safetensors).")
_EXPERTS = flags.DEFINE_list("experts", None, "Comma-separated fine-tuned model directories.")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory to create.")
_SCALE = flags.DEFINE_float("scale", 1.0, "λ: multiplies the merged task vector (task_arithmetic, "
                            "ties, dare_*, breadcrumbs*, della); the α of tsv, iso_c, "
                            "iso_cts.")
_WEIGHTS = flags.DEFINE_list("weights", None, "Per-expert weights, comma-separated (linear, "
                             "task_arithmetic). Default: all 1.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["bfloat16", "float16", "float32"],
                           "Output dtype of floating tensors. Default: the base's dtype.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random methods (dare_*, della).")
_MAX_SHARD_SIZE = flags.DEFINE_string("max_shard_size", "5GB",
                                      "Largest output shard, e.g. 5GB, 500MB, 2GiB.")
_FORMAT = flags.DEFINE_enum("format", "safetensors", ["safetensors", "orbax"],
                            "Output format: Hugging Face safetensors, or an orbax checkpoint "
                            "in OUTPUT/params (plus config and tokenizer).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")
_CHUNK_MEMORY = flags.DEFINE_string(
    "chunk_memory", "64MiB",
    "Memory budget of one batched chunk of same-shape tensors (inputs + float32 work).")
_COMPUTE_THREADS = flags.DEFINE_integer(
    "compute_threads", None,
    "Chunks merged at once, each on its own thread and holding one more chunk of inputs "
    "in memory; LAPACK (SVD, QR, eigh) then gets cores / compute_threads threads each. "
    "Default: 2 on a multi-core CPU, 1 on accelerators and device meshes. The result "
    "does not depend on it.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars on stderr.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", "~/.cache/jaxmerge/xla",
    "Directory of JAX's persistent compilation cache and of jaxmerge's traced programs "
    "(in jaxmerge-programs/): a repeated merge of the same shapes with the same method "
    "and hyperparameters skips tracing and XLA compilation. Empty string: off.")
# Scale-out (jaxmerge.distributed): a device mesh, and jax.distributed for many processes.
_MESH_SHAPE = flags.DEFINE_string(
    "mesh_shape", None,
    "Devices to merge on, as a mesh shape, e.g. 8 or 2,4 (-1: the remaining devices). "
    "Default: every device (of every process). The result does not depend on it.")
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None,
    "Multi-process merge: HOST:PORT of process 0, for jax.distributed.initialize. Every "
    "process runs the same command with its own --process_id; the output directory must be "
    "on a file system all processes see.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Multi-process merge: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "Multi-process merge: this process's index, 0..N-1.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Call jax.distributed.initialize() with the cluster JAX detects (TPU pods, SLURM, "
    "Open MPI, ...), when --coordinator_address is not given.")
_DEMO = flags.DEFINE_bool(
    "demo", False,
    "Build the real SmolLM2-135M-Instruct base and 3 derived RL-style experts in --demo_dir "
    "(needs the 'demo' extra), then merge them (method: --method, default resmerge).")
_DEMO_DIR = flags.DEFINE_string("demo_dir", "jaxmerge-demo", "Where --demo builds and merges.")

# Method hyperparameters: each default is the METHODS.md default.
_HYPER = {
    "density": flags.DEFINE_float("density", 0.2, "Fraction of entries kept (ties trim k, "
                                  "breadcrumbs, della)."),
    "ties_scope": flags.DEFINE_enum("ties_scope", "per_tensor", ["per_tensor", "global"],
                                    "TIES trim threshold and majority-sign scope."),
    "aggregation": flags.DEFINE_enum("aggregation", "mean", ["mean", "sum"],
                                     "Disjoint merge of the sign-agreeing entries (ties, "
                                     "dare_ties, breadcrumbs_ties, della)."),
    "drop_rate": flags.DEFINE_float("drop_rate", 0.8, "DARE drop rate p (density 1 - p)."),
    "dare_trim_density": flags.DEFINE_float("dare_trim_density", None,
                                            "dare_ties: also TIES-trim to this density after "
                                            "DARE (default: no trim)."),
    "gamma": flags.DEFINE_float("gamma", 0.01, "Breadcrumbs: fraction of largest entries "
                                "dropped."),
    "della_epsilon": flags.DEFINE_float("della_epsilon", 0.15, "DELLA: keep probabilities span "
                                        "density ± epsilon."),
    "t": flags.DEFINE_float("t", 0.5, "SLERP interpolation factor (0 = first model)."),
    "ram_epsilon": flags.DEFINE_float("ram_epsilon", 1e-5, "RAM/RAM+: |τ| > epsilon counts as "
                                      "updated."),
    "ram_r": flags.DEFINE_float("ram_r", 0.1, "RAM+: rescale rate r."),
    "ram_alpha": flags.DEFINE_float("ram_alpha", 2.0, "RAM+: clip of the shared/unique ratio."),
    "ram_scope": flags.DEFINE_enum("ram_scope", "global", ["global", "per_tensor"],
                                   "RAM+: count shared/unique over the model or per tensor."),
    "head_rank": flags.DEFINE_integer("head_rank", 1, "ResMerge: rank k of the spectral head "
                                      "H_t (top-k SVD part of each task matrix)."),
    "beta_min": flags.DEFINE_float("beta_min", 0.7, "ResMerge SRC-A: smallest retention "
                                   "exponent β (reached at score 1)."),
    "beta_max": flags.DEFINE_float("beta_max", 1.0, "ResMerge SRC-A: largest retention "
                                   "exponent β (score 0)."),
    "rho_max": flags.DEFINE_float("rho_max", 0.2, "ResMerge LHC: head budget, ‖C‖ <= rho_max·‖A‖."),
    "attention_score_scale": flags.DEFINE_float("attention_score_scale", 1.0,
                                                "ResMerge SRC-A: family scale φ of attention "
                                                "matrices."),
    "ffn_score_scale": flags.DEFINE_float("ffn_score_scale", 0.25, "ResMerge SRC-A: family scale "
                                          "φ of FFN matrices (1.0 = the released code's HEAD)."),
    "other_score_scale": flags.DEFINE_float("other_score_scale", 0.0, "ResMerge SRC-A: family "
                                            "scale φ of other matrices."),
    "score_map": flags.DEFINE_enum("score_map", "affine", ["affine", "ramp"],
                                   "ResMerge SRC-A score map: affine (x+1)/2 (paper) or the "
                                   "thresholded ramps of the v1 code."),
    "head_gate": flags.DEFINE_enum("head_gate", "positive_mean", ["positive_mean", "mean", "none"],
                                   "ResMerge LHC agreement gate: mean positive head cosine "
                                   "(paper), max(0, mean cosine) (v1 option), or none "
                                   "(ungated ablation)."),
    "svd": flags.DEFINE_enum("svd", "auto", ["auto", "randomized", "exact"],
                             "Top-k SVD for resmerge heads and tsv/iso_cts truncations: auto "
                             "(randomised subspace iteration with an exact fallback where it "
                             "pays), randomized (always try it first) or exact."),
    "common_fraction": flags.DEFINE_float("common_fraction", 0.8, "ISO-CTS: share f of the rank "
                                          "given to the common subspace."),
    "star_eta": flags.DEFINE_float("star_eta", 40.0, "STAR: percent η of the nuclear norm the "
                                   "kept singular values must reach."),
    "arbitration": flags.DEFINE_enum("arbitration", "hard", ["hard", "fisher_weighted"],
                                     "SAR conflict rule: the larger-Fisher expert's delta "
                                     "(hard, the paper) or the Fisher-weighted mean."),
    "sar_drop_rate": flags.DEFINE_float("sar_drop_rate", 0.2, "SAR: drop probability p of the "
                                        "below-median private entries (survivors × 1/(1-p))."),
    "sar_epsilon": flags.DEFINE_float("sar_epsilon", 1e-5, "SAR: |τ| > ε counts as updated "
                                      "(private region, N ≠ 2 rule)."),
    "fisher_floor": flags.DEFINE_float("fisher_floor", 1e-6, "Fisher merging: F̃ = F + floor."),
}
_FISHER = flags.DEFINE_list(
    "fisher", None,
    "Per-expert diagonal Fisher checkpoints (python -m jaxmerge.fisher), comma-separated, in "
    "the order of --experts: the sensitivities of sar and fisher.")
_VALIDATION_DATA = flags.DEFINE_list(
    "validation_data", None,
    "Instead of --fisher: validation JSONL ({\"prompt\", \"response\"} or {\"text\"} per line), "
    "one file for every expert or one per expert in the order of --experts. Each expert's "
    "diagonal Fisher is computed on it first (as python -m jaxmerge.fisher does) into a "
    "temporary directory beside --output, removed afterwards.")
_FISHER_MODE = flags.DEFINE_enum(
    "fisher_mode", "per_example", ["per_example", "per_batch"],
    "--validation_data: per_example (the definition, mean of squared per-example gradients) "
    "or per_batch (squared micro-batch gradients / N, cheaper).")
_FISHER_BATCH_SIZE = flags.DEFINE_integer("fisher_batch_size", 8, "--validation_data: examples "
                                          "per micro-batch.", lower_bound=1)
_FISHER_MAX_LENGTH = flags.DEFINE_integer("fisher_max_length", 512, "--validation_data: most "
                                          "tokens per example, prompt included.", lower_bound=2)
_FISHER_MAX_EXAMPLES = flags.DEFINE_integer("fisher_max_examples", None, "--validation_data: "
                                            "use only the first N examples of each file.",
                                            lower_bound=1)
_CHAT_TEMPLATE = flags.DEFINE_bool("chat_template", False, "--validation_data: wrap each "
                                   "prompt as a user turn of the tokenizer's chat template.")

_CALIBRATE = flags.DEFINE_enum("calibrate", "none", list(methods.CALIBRATIONS),
                               "Post-hoc calibration of any method or recipe: svc rescales each "
                               "singular value of the merged matrices by the experts' response "
                               "(SVC, METHODS.md §3).")
_SVC_FLOOR = flags.DEFINE_float("svc_floor", 0.1, "SVC calibration floor α_c (0.1 for TA/TIES/"
                                "DARE merges).")

def hyperparameters(method: str) -> dict:
    """The flag values that the method uses, by flag name."""
    spec = methods.REGISTRY[method]
    values = {flag: _HYPER[flag].value for flag in spec.flags if flag != "scale"}
    if "scale" in spec.flags:
        values["scale"] = _SCALE.value
    return values


def load_recipe(path: str) -> Merge:
    """Runs a recipe file and returns its ``merge`` value."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"--recipe file {file} does not exist")
    try:
        namespace = runpy.run_path(str(file))
    except JaxmergeError:
        raise
    except Exception as error:  # a user's file: report, do not crash with a traceback
        raise ConfigError(f"--recipe {file} failed: {type(error).__name__}: {error}") from error
    merge = namespace.get("merge")
    if not isinstance(merge, Merge):
        raise ConfigError(f"--recipe {file} must bind a jaxmerge.Merge to the name `merge`")
    return merge


def _weights() -> list[float] | None:
    if _WEIGHTS.value is None:
        return None
    try:
        return [float(w) for w in _WEIGHTS.value]
    except ValueError as error:
        raise ConfigError(f"--weights must be numbers, got {','.join(_WEIGHTS.value)}") from error


def _demo_inputs() -> tuple[str, list[str], str]:
    from jaxmerge import demo

    root = pathlib.Path(_DEMO_DIR.value)
    base, experts = demo.build_demo(root)
    output = _OUTPUT.value or str(root / "merged")
    return str(base), [str(e) for e in experts], output


def _fisher_settings() -> dict:
    """The --validation_data Fisher settings, as recorded with the merge."""
    return {"validation_data": list(_VALIDATION_DATA.value), "fisher_mode": _FISHER_MODE.value,
            "fisher_batch_size": _FISHER_BATCH_SIZE.value,
            "fisher_max_length": _FISHER_MAX_LENGTH.value,
            "fisher_max_examples": _FISHER_MAX_EXAMPLES.value,
            "chat_template": _CHAT_TEMPLATE.value}


def _validation_files(num_experts: int) -> list[pathlib.Path]:
    """--validation_data as one existing file per expert."""
    files = [pathlib.Path(f).expanduser() for f in _VALIDATION_DATA.value]
    if len(files) == 1:
        files = files * num_experts
    if len(files) != num_experts:
        raise ConfigError(f"--validation_data lists {len(files)} files for {num_experts} experts: "
                          "give one file for all, or one per expert in the order of --experts")
    for file in files:
        if not file.is_file():
            raise ConfigError(f"--validation_data file {file} does not exist")
    return files


def _has_tokenizer(directory) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    return any((pathlib.Path(directory) / name).is_file() for name in names)


def _compute_fishers(base: str, experts: list[str], files: list[pathlib.Path],
                     scratch: pathlib.Path) -> list[str]:
    """Each expert's diagonal Fisher on its validation file, written under ``scratch``."""
    from jaxmerge.fisher import fisher_for_checkpoint, write_fisher

    directories = []
    for index, (expert, file) in enumerate(zip(experts, files, strict=True)):
        print(f"Fisher {index + 1}/{len(experts)}: {expert} on {file} ({_FISHER_MODE.value})",
              file=sys.stderr, flush=True)
        tokenizer = expert if _has_tokenizer(expert) else base
        tensors, stats = fisher_for_checkpoint(
            expert, file, mode=_FISHER_MODE.value, batch_size=_FISHER_BATCH_SIZE.value,
            max_length=_FISHER_MAX_LENGTH.value, max_examples=_FISHER_MAX_EXAMPLES.value,
            chat_template=_CHAT_TEMPLATE.value, tokenizer_dir=tokenizer,
            progress=_PROGRESS.value)
        directory = scratch / f"fisher-{index}"
        write_fisher(directory, tensors, {"model": str(expert), "data": str(file),
                                          **stats.as_dict()})
        directories.append(str(directory))
    return directories


@contextlib.contextmanager
def _extras(merge: Merge, base: str, experts: list[str], output: str, overwrite: bool):
    """The per-expert extra inputs the method reads (Fisher checkpoints), checked.

    With --validation_data the Fishers are computed first into a scratch directory beside
    the output, removed when the merge is done (or fails).
    """
    given = "--fisher" if _FISHER.value else "--validation_data" if _VALIDATION_DATA.value else ""
    if "fisher" not in merge.extra_inputs:
        if given:
            raise ConfigError(f"{given} is only read by methods that use Fisher information "
                              "(sar, fisher)")
        yield {}
        return
    if _FISHER.value and _VALIDATION_DATA.value:
        raise ConfigError("give --fisher (precomputed) or --validation_data (computed now), "
                          "not both")
    if _FISHER.value:
        if len(_FISHER.value) != len(experts):
            raise ConfigError(f"--fisher lists {len(_FISHER.value)} checkpoints for "
                              f"{len(experts)} experts: give one per expert, in the order of "
                              "--experts")
        yield {"fisher": list(_FISHER.value)}
        return
    if not _VALIDATION_DATA.value:
        raise ConfigError("this method needs each expert's diagonal Fisher: pass "
                          "--validation_data=FILE.jsonl (computed now) or --fisher=DIR,DIR "
                          "(from python -m jaxmerge.fisher), one per expert")
    files = _validation_files(len(experts))
    check_output_available(output, overwrite)  # before the costly part
    parent = pathlib.Path(output).expanduser().resolve().parent
    with tempfile.TemporaryDirectory(prefix=".jaxmerge-fisher-",
                                     dir=parent if parent.is_dir() else None) as scratch:
        yield {"fisher": _compute_fishers(base, experts, files, pathlib.Path(scratch))}


def _program_cache(name: str, hyper: dict) -> ProgramCache | None:
    """The traced-program cache next to the compilation cache, for a built-in method
    (named by its hyperparameters); a recipe's merge has no name that determines it."""
    if not _COMPILATION_CACHE.value or _RECIPE.value:
        return None
    identity = json.dumps({"method": name, "hyperparameters": hyper, "weights": _weights()},
                          sort_keys=True, default=repr)
    directory = pathlib.Path(_COMPILATION_CACHE.value).expanduser() / "jaxmerge-programs"
    return ProgramCache(directory, identity)


def run(argv) -> int:
    """Parses nothing itself: reads the already-parsed flags and merges."""
    from jaxmerge.api import merge_checkpoints

    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
    from jaxmerge import distributed  # before anything starts a JAX backend

    distributed.initialize(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           auto=_DISTRIBUTED.value)
    if _METHOD.value and _RECIPE.value:
        raise ConfigError("give --method or --recipe, not both")
    method = _METHOD.value or ("resmerge" if _DEMO.value and not _RECIPE.value else None)
    if not method and not _RECIPE.value:
        raise ConfigError("--method (or --recipe) is required; see --help for the methods")
    if _DEMO.value:
        base, experts, output = _demo_inputs()
        overwrite = True if _OUTPUT.value is None else _OVERWRITE.value
    else:
        missing = [f"--{n}" for n, v in (("base", _BASE.value), ("experts", _EXPERTS.value),
                                          ("output", _OUTPUT.value)) if not v]
        if missing:
            raise ConfigError(f"{', '.join(missing)} required")
        base, experts, output, overwrite = (_BASE.value, _EXPERTS.value, _OUTPUT.value,
                                            _OVERWRITE.value)
    if _RECIPE.value:
        merge, name, hyper = load_recipe(_RECIPE.value), f"recipe:{_RECIPE.value}", {}
    else:
        hyper = hyperparameters(method)
        merge = methods.build(method, hyper, _weights())
        name = method
        if _WEIGHTS.value is not None:
            hyper["weights"] = _weights()
    if _CALIBRATE.value != "none":
        merge = methods.calibrate(merge, _CALIBRATE.value, _SVC_FLOOR.value)
        hyper.update(calibrate=_CALIBRATE.value, svc_floor=_SVC_FLOOR.value)
    if _VALIDATION_DATA.value and "fisher" in merge.extra_inputs:
        hyper.update(_fisher_settings())
    max_shard_size = parse_size(_MAX_SHARD_SIZE.value, "max_shard_size")
    chunk_bytes = parse_size(_CHUNK_MEMORY.value, "chunk_memory")
    enable_compilation_cache(_COMPILATION_CACHE.value)
    programs = _program_cache(name, hyper)
    with _extras(merge, base, experts, output, overwrite) as extras:
        result = merge_checkpoints(
            merge, base, experts, output,
            method_name=name,
            hyperparameters=hyper,
            seed=_SEED.value,
            dtype=_DTYPE.value,
            max_shard_size=max_shard_size,
            output_format=_FORMAT.value,
            overwrite=overwrite,
            chunk_bytes=chunk_bytes,
            progress=_PROGRESS.value,
            extras=extras,
            command="python -m jaxmerge.main " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            mesh_shape=_MESH_SHAPE.value,
            programs=programs,
            compute_threads=_COMPUTE_THREADS.value,
        )
    report = result.report
    print(f"merged {len(experts)} experts with {name} into {result.output} "
          f"({report.tensors_written} tensors, {report.bytes_read / 1e6:.0f} MB read, "
          f"{report.seconds:.1f} s)")
    print("load it with:\n  from transformers import AutoModelForCausalLM\n"
          f"  model = AutoModelForCausalLM.from_pretrained({str(result.output)!r})")
    return 0


def main(argv) -> int:
    return run_command(run, argv)


if __name__ == "__main__":
    run_program(main)


def entry_point() -> None:
    """Console script ``jaxmerge``: same as ``python -m jaxmerge.main``."""
    run_program(main)
