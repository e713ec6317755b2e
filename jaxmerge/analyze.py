"""Command line: python -m jaxmerge.analyze --base=DIR --experts=DIR,DIR --output=DIR

Measures the experts' task vectors the way the RL-merging papers do, streaming,
with the same grouped and jitted execution as a merge, and writes a report
directory: report.json, tensors/layers/families CSVs, PNG plots and an
index.html that opens without a server. Prints a one-screen summary: the regime
the experts are in and the methods the measurements favour.
"""

from __future__ import annotations

import pathlib

from absl import flags

from jaxmerge.cli_support import enable_compilation_cache, parse_size, run_command, run_program
from jaxmerge.errors import ConfigError


def _usage() -> str:
    return "\n".join([
        "jaxmerge analyze: diagnostics of fine-tuned experts' task vectors (τ = expert − base).",
        "",
        "Usage:",
        "  python -m jaxmerge.analyze --base=BASE_DIR --experts=EXPERT_1,EXPERT_2 "
        "--output=REPORT_DIR",
        "  python -m jaxmerge.analyze --demo     # on the --demo checkpoints of jaxmerge.main",
        "",
        "Measures, per tensor, then per layer / module family / whole model:",
        "  update sparsity (|τ| ≤ eps)                         SAR-Merging Table 1, Fig. 2",
        "  conflict / overlap / private / unchanged regions     SAR-Merging Fig. 6-7",
        "  layer-wise cosine of task vectors                    SAR-Merging Fig. 3",
        "  top-k energy share, stable and effective rank before/after removing the head",
        "                                                       ResMerge §5.4, Fig. 4",
        "  head/residual cosines, head agreement S_H, residual coherence c_R, mean retention",
        "                                                       ResMerge §5.5, A.3, A.4",
        "Writes REPORT_DIR/{report.json, tensors.csv, layers.csv, families.csv, *.png,",
        "index.html} atomically; prints the regime (RL-like sparse / SFT-like dense) and the",
        "methods the numbers favour.",
    ])


__doc__ = _usage()

_BASE = flags.DEFINE_string("base", None, "Base model directory (Hugging Face safetensors).")
_EXPERTS = flags.DEFINE_list("experts", None, "Comma-separated fine-tuned model directories.")
_OUTPUT = flags.DEFINE_string("output", None, "Report directory to create.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing report directory.")
_EPS = flags.DEFINE_float("eps", 1e-5, "An entry counts as updated when |τ| > eps (on the "
                          "float32 upcast of the stored values).")
_HEAD_RANK = flags.DEFINE_integer("head_rank", 1, "Rank k of the spectral head H = top-k "
                                  "SVD part of τ (ResMerge's split).")
_ENERGY_RANKS = flags.DEFINE_list("energy_ranks", ["1", "4", "16"],
                                  "k of the reported top-k energy shares (1 is always in).")
_SVD = flags.DEFINE_enum("svd", "auto", ["auto", "randomized", "exact"],
                         "How the heads are found (the spectra themselves are exact).")
_SPECTRAL = flags.DEFINE_bool("spectral", True, "Measure the matrices' spectra and "
                              "head/residual geometry (a second streaming pass).")
_PLOTS = flags.DEFINE_bool("plots", True, "Write PNG plots (needs matplotlib).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the randomised top-k SVD of the heads.")
_CHUNK_MEMORY = flags.DEFINE_string(
    "chunk_memory", "64MiB",
    "Memory budget of one batched chunk of same-shape tensors (inputs + float32 work).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars on stderr.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", "~/.cache/jaxmerge/xla",
    "Directory of JAX's persistent compilation cache. Empty string: off.")
_DEMO = flags.DEFINE_bool("demo", False, "Analyse the SmolLM2 demo checkpoints (built in "
                          "--demo_dir if missing; needs the 'demo' extra).")
_DEMO_DIR = flags.DEFINE_string("demo_dir", "jaxmerge-demo", "Where --demo builds its inputs.")


def _energy_ranks() -> list[int]:
    try:
        return [int(k) for k in _ENERGY_RANKS.value]
    except ValueError as error:
        raise ConfigError(f"--energy_ranks must be integers, got {_ENERGY_RANKS.value}") \
            from error


def _inputs() -> tuple[str, list[str], str, bool]:
    if _DEMO.value:
        from jaxmerge import demo

        root = pathlib.Path(_DEMO_DIR.value)
        base, experts = demo.build_demo(root)
        output = _OUTPUT.value or str(root / "analysis")
        overwrite = True if _OUTPUT.value is None else _OVERWRITE.value
        return str(base), [str(e) for e in experts], output, overwrite
    missing = [f"--{name}" for name, value in (("base", _BASE.value),
                                               ("experts", _EXPERTS.value),
                                               ("output", _OUTPUT.value)) if not value]
    if missing:
        raise ConfigError(f"{', '.join(missing)} required (see --help)")
    return _BASE.value, list(_EXPERTS.value), _OUTPUT.value, _OVERWRITE.value


def run(argv) -> int:
    from jaxmerge import analysis, methods
    from jaxmerge.analysis.streaming import check_settings
    from jaxmerge.io import hf

    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
    base, experts, output, overwrite = _inputs()
    check_settings(_EPS.value, _HEAD_RANK.value, _energy_ranks(), _SVD.value)
    hf.check_output_available(output, overwrite)
    if _PLOTS.value:
        analysis.plots._pyplot()  # fail before the heavy work if matplotlib is missing
    enable_compilation_cache(_COMPILATION_CACHE.value)
    measured = analysis.measure_checkpoints(
        base, experts, eps=_EPS.value, head_rank=_HEAD_RANK.value,
        energy_ranks=_energy_ranks(), svd=_SVD.value, spectral=_SPECTRAL.value,
        seed=_SEED.value, chunk_bytes=parse_size(_CHUNK_MEMORY.value, "chunk_memory"),
        progress=_PROGRESS.value)
    report = analysis.write_report(measured, output, plots=_PLOTS.value, overwrite=overwrite,
                                   registry=methods.REGISTRY)
    print(analysis.summary_text(report))
    print(f"\nreport: {pathlib.Path(output) / 'index.html'} ({len(report['files'])} files; "
          f"{measured.seconds:.1f} s, {measured.bytes_read / 1e6:.0f} MB read)")
    return 0


def main(argv) -> int:
    return run_command(run, argv)


if __name__ == "__main__":
    run_program(main)
