"""The RL-vs-SFT expert testbed, end to end: ``python -m experiments.run --base=tiny``.

Stages (each cached under ``--workdir`` by the settings it depends on; a rerun redoes only
what changed):

1. data: the three tasks' prompt-disjoint train / validation / test splits (JSONL);
2. base: ``tiny`` pretrains a small Llama from scratch (:mod:`experiments.pretrain`);
   ``smollm2`` builds the real SmolLM2-135M-Instruct (:func:`jaxmerge.demo.build_smollm2_base`);
3. experts, from the one base, per task and regime: ``sft`` (:mod:`experiments.sft`) and ``rl``
   (GRPO, :mod:`experiments.grpo`), saved as bf16 Hugging Face checkpoints;
4. per group: Fisher of each expert on its validation split, every built-in merge method,
   test accuracy of every merge, diagnostics of the task vectors (:mod:`experiments.merging`);
5. the results JSON (``experiments/results/{base}.json``; ``--quick``: in the workdir), and the
   README's tables rendered from it (:mod:`experiments.render`).

Flags: ``--base`` (tiny | smollm2), ``--workdir`` (default
``~/.cache/jaxmerge/experiments/{base}``), ``--quick`` (seconds-scale sizes, for tests),
``--set=name=value,...`` (override any :class:`experiments.config.Config` field),
``--results`` (the JSON path), ``--no-render``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import platform
import shutil
import sys
import time

from experiments import common, data, merging, render
from experiments import config as config_lib
from experiments import tokenizer as tok

REGIMES = ("rl", "sft")
RESULTS_DIR = pathlib.Path(__file__).parent / "results"
_MERGE_ONLY = ("methods", "keep_merges", "fisher_examples", "eval_batch", "slerp_pairs",
               "plots", "merge_via_cli", "merge_timeout")


def base_spec(config: config_lib.Config) -> dict:
    """The settings the base (and the data) depend on."""
    return {k: v for k, v in config.to_dict().items()
            if not k.startswith(("sft_", "grpo_")) and k not in _MERGE_ONLY}


def expert_spec(config: config_lib.Config, regime: str, task: str) -> dict:
    prefix = "grpo_" if regime == "rl" else "sft_"
    return {"base": base_spec(config), "regime": regime, "task": task,
            **{k: v for k, v in config.to_dict().items() if k.startswith(prefix)}}


def build_base(config: config_lib.Config, workdir: pathlib.Path):
    """``(base_dir, tokenizer, prepared data, base record)``."""
    from experiments import pretrain

    stage_dir = workdir / "base"
    spec = base_spec(config)
    if config.base == "tiny":
        tokenizer = tok.build_tokenizer()
        prepared = data.prepare(config, tokenizer, workdir / "data")
        if not common.is_done(stage_dir, spec):
            record = pretrain.pretrain(config, prepared, stage_dir)
            common.mark_done(stage_dir, spec, **record)
    elif config.base == "smollm2":
        from jaxmerge import demo

        if not common.is_done(stage_dir, spec):
            common.fresh_dir(stage_dir)
            start = time.perf_counter()
            demo.build_smollm2_base(stage_dir / "model")
            common.mark_done(stage_dir, spec, seconds=round(time.perf_counter() - start, 1))
        tokenizer = common.load_tokenizer(stage_dir / "model")
        prepared = data.prepare(config, tokenizer, workdir / "data")
    else:
        raise ValueError(f"unknown base {config.base!r}: tiny or smollm2")
    return stage_dir / "model", tokenizer, prepared, common.read_stage(stage_dir)


def train_expert(config, regime, task, base_dir, graphdef, tokenizer, prepared, stage_dir):
    """Trains (or finds cached) one expert; returns its stage record (with test scores)."""
    from experiments import evaluation, grpo, sft

    spec = expert_spec(config, regime, task)
    if not common.is_done(stage_dir, spec):
        common.fresh_dir(stage_dir)
        hf_config, _, params = common.load_checkpoint(base_dir)
        seed = common.stable_seed(config.seed, regime, task)
        if regime == "sft":
            params, record = sft.train_sft(config, graphdef, params, prepared[task], seed)
        else:
            params, record = grpo.train_grpo(config, graphdef, params, prepared[task],
                                             tokenizer, seed)
        common.save_checkpoint(stage_dir / "model", params, hf_config, base_dir, record=record)
        _, _, saved = common.load_checkpoint(stage_dir / "model")
        record["scores"] = evaluation.scores(graphdef, saved, tokenizer, prepared,
                                             batch_size=config.eval_batch)
        logging.info("expert %s/%s: %s", regime, task, record["scores"])
        common.mark_done(stage_dir, spec, **record)
    return common.read_stage(stage_dir)


def run(config: config_lib.Config, workdir, results_path=None) -> dict:
    """Runs every stage; writes and returns the results dict."""
    from experiments import evaluation, pretrain
    from jaxmerge import analysis  # noqa: F401  (fail early if the analysis extra is missing)

    start = time.perf_counter()
    workdir = pathlib.Path(workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    _compilation_cache(workdir / "xla-cache")
    seconds = {}
    cached = []  # stages found finished in the workdir (their time is not in ``seconds``)
    if common.is_done(workdir / "base", base_spec(config)):
        cached.append("base")
    base_dir, tokenizer, prepared, base_record = build_base(config, workdir)
    hf_config = json.loads((base_dir / "config.json").read_text())
    graphdef = pretrain.graphdef_of(hf_config)
    _, _, base_params = common.load_checkpoint(base_dir)
    base_scores = evaluation.scores(graphdef, base_params, tokenizer, prepared,
                                    batch_size=config.eval_batch)
    seconds["base"] = round(time.perf_counter() - start, 1)
    logging.info("base: %s", base_scores)

    groups = {}
    for regime in REGIMES:
        tick = time.perf_counter()
        cached += [f"{regime}/{task}" for task in prepared
                   if common.is_done(workdir / "experts" / regime / task,
                                     expert_spec(config, regime, task))]
        records = {task: train_expert(config, regime, task, base_dir, graphdef, tokenizer,
                                      prepared, workdir / "experts" / regime / task)
                   for task in prepared}
        experts = {task: workdir / "experts" / regime / task / "model" for task in prepared}
        seconds[f"{regime}_experts"] = round(time.perf_counter() - tick, 1)
        tick = time.perf_counter()
        fishers = merging.compute_fishers(config, experts, prepared, workdir / "fisher" / regime)
        seconds[f"{regime}_fisher"] = round(time.perf_counter() - tick, 1)
        tick = time.perf_counter()
        merged = merging.merge_group(config, regime, base_dir, experts, fishers, graphdef,
                                     tokenizer, prepared, workdir / "merges" / regime)
        seconds[f"{regime}_merges"] = round(time.perf_counter() - tick, 1)
        tick = time.perf_counter()
        diagnostics = merging.diagnose(base_dir, experts, workdir / "diagnostics" / regime,
                                       plots=config.plots)
        seconds[f"{regime}_diagnostics"] = round(time.perf_counter() - tick, 1)
        groups[regime] = {
            "experts": {task: {"scores": r["scores"], "seconds": r.get("seconds"),
                               "curve": r.get("reward_curve") or r.get("loss_curve")}
                        for task, r in records.items()},
            **merged, "diagnostics": diagnostics}
    seconds["total"] = round(time.perf_counter() - start, 1)
    results = {
        "base": config.base,
        "config": config.to_dict(),
        "tasks": {name: {"test_size": len(d.splits["test"]),
                         "train_size": len(d.splits["train"])} for name, d in prepared.items()},
        "base_model": {"scores": base_scores,
                       "training": {k: v for k, v in base_record.items()
                                    if k not in ("spec", "spec_hash")}},
        "groups": groups,
        "seconds": seconds,
        "cached_stages": cached,
        "environment": {"python": platform.python_version(), "cpus": os.cpu_count(),
                        "machine": platform.machine(), "jax": _version("jax"),
                        "jaxlib": _version("jaxlib"), "optax": _version("optax"),
                        "flax": _version("flax")},
    }
    if results_path is not None:
        results_path = pathlib.Path(results_path)
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1, default=float) + "\n")
        if config.plots:
            copy_figures(results, workdir, results_path.with_suffix(""))
    return results


def copy_figures(results: dict, workdir: pathlib.Path, figures: pathlib.Path) -> None:
    """The diagnostics plots of both groups and the training curves, beside the JSON."""
    if figures.exists():
        shutil.rmtree(figures)
    figures.mkdir()
    for regime, group in results["groups"].items():
        for name in group["diagnostics"]["files"]:
            if name.endswith(".png"):
                shutil.copyfile(workdir / "diagnostics" / regime / name,
                                figures / f"{regime}-{name}")
    render.write_curves(results, figures / "training.png")


def _compilation_cache(directory: pathlib.Path) -> None:
    """XLA's persistent compilation cache, unless one is configured: the merges and analyses
    of the second group, and reruns, load identical programs instead of compiling them."""
    import jax

    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="tiny", choices=("tiny", "smollm2"))
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--quick", action="store_true",
                        help="seconds-scale sizes (tests); results stay in the workdir")
    parser.add_argument("--set", default="", dest="overrides",
                        help="override settings: name=value,name=value (methods: a+b+c)")
    parser.add_argument("--results", default=None, help="results JSON path")
    parser.add_argument("--no-render", action="store_true",
                        help="do not rewrite experiments/README.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    for noisy in ("jax", "absl", "jaxmerge"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    preset = "quick" if args.quick else args.base
    config = config_lib.PRESETS[preset].replace(base=args.base)
    config = config.with_overrides(args.overrides)
    name = f"{args.base}-quick" if args.quick else args.base
    workdir = pathlib.Path(args.workdir or f"~/.cache/jaxmerge/experiments/{name}").expanduser()
    results_path = args.results or (workdir / "results.json" if args.quick or args.overrides
                                    else RESULTS_DIR / f"{args.base}.json")
    results = run(config, workdir, results_path)
    print(render.results_markdown(results))
    print(f"results: {results_path} ({results['seconds']['total']:.0f} s)")
    if not args.no_render and not args.quick and not args.overrides:
        render.render_readme()
    return 0


if __name__ == "__main__":
    sys.exit(main())
