"""Merging an expert group with every built-in method, scoring the merges, diagnosing the group.

- Every method of :data:`jaxmerge.methods.REGISTRY` with its METHODS.md defaults (nothing is
  tuned, on test data or otherwise) on the bf16 checkpoints. With ``merge_via_cli`` (the
  default) each merge is one ``python -m jaxmerge.main --method=NAME ...`` process (killed and
  reported as an error if it exceeds ``merge_timeout``); otherwise
  :func:`jaxmerge.merge_checkpoints` with ``methods.build(name, {})`` runs in this process (the
  same computation: the CLI is that call). Random methods (DARE family, SAR's dropout) use the
  run's seed.
- ``sar`` and ``fisher`` read each expert's diagonal Fisher, estimated with
  :func:`jaxmerge.fisher.fisher_for_checkpoint` at the expert's own parameters on the first
  ``fisher_examples`` examples of its task's *validation* split (METHODS.md §7).
- ``slerp`` interpolates exactly two models, so it is not run on the three-expert group. It
  is run on every *pair* of experts instead (t = 0.5), beside ``linear`` on the same pair
  (the Euclidean interpolation slerp replaces), each scored on the pair's two tasks.
- Diagnostics: :func:`jaxmerge.analysis.measure_checkpoints` of the group against the base
  (update sparsity, pair regions, layer cosines, spectra, head/residual geometry), written with
  its plots by :func:`jaxmerge.analysis.write_report`.
"""

from __future__ import annotations

import itertools
import json
import logging
import pathlib
import shutil
import subprocess
import sys
import time

from experiments import common, evaluation
from experiments.config import Config
from experiments.data import TaskData
from jaxmerge import analysis, api, methods, models
from jaxmerge.fisher import fisher_for_checkpoint, write_fisher

PAIR_METHODS = ("slerp", "linear")
"""Methods run on each pair of experts (slerp takes exactly two models; linear is its
Euclidean counterpart)."""


def method_names(config: Config) -> list[str]:
    """The methods of the main table: ``config.methods`` or the whole registry, in order."""
    names = list(config.methods) or list(methods.REGISTRY)
    unknown = [name for name in names if name not in methods.REGISTRY]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(methods.REGISTRY)}")
    return names


def compute_fishers(config: Config, experts: dict[str, pathlib.Path],
                    prepared: dict[str, TaskData], out_dir) -> dict[str, pathlib.Path]:
    """task -> the expert's Fisher checkpoint directory (cached by spec)."""
    fishers = {}
    for task, expert in experts.items():
        directory = pathlib.Path(out_dir) / task
        spec = {"expert": common.read_stage(expert.parent)["spec_hash"],
                "data": str(prepared[task].paths["validation"]),
                "examples": config.fisher_examples, "chat_template": config.chat_template}
        if not common.is_done(directory, spec):
            start = time.perf_counter()
            tensors, stats = fisher_for_checkpoint(
                expert, prepared[task].paths["validation"], max_examples=config.fisher_examples,
                chat_template=config.chat_template, batch_size=8)
            write_fisher(directory, tensors, {"model": str(expert), **stats.as_dict()},
                         overwrite=True)
            common.mark_done(directory, spec, seconds=round(time.perf_counter() - start, 1))
        fishers[task] = directory
    return fishers


def _merge_and_score(config: Config, name: str, base: pathlib.Path,
                     experts: list[pathlib.Path], fishers: list[pathlib.Path] | None,
                     out_dir: pathlib.Path, scorer, tasks_scored: list[str]) -> dict:
    result_file = out_dir.with_suffix(".json")
    spec = {"method": name, "base": str(base), "experts": [str(e) for e in experts],
            "seed": config.seed,
            "inputs": [common.read_stage(e.parent)["spec_hash"] for e in experts],
            "tasks": tasks_scored}
    if result_file.is_file():
        cached = json.loads(result_file.read_text())
        if cached.get("spec_hash") == common.spec_hash(spec):
            return cached["result"]
    start = time.perf_counter()
    fishers = fishers if name in ("sar", "fisher") else None
    try:
        if config.merge_via_cli:
            warnings = merge_with_cli(name, base, experts, fishers, out_dir, config.seed,
                                      config.merge_timeout)
        else:
            extras = {"fisher": [str(f) for f in fishers]} if fishers else None
            warnings = api.merge_checkpoints(methods.build(name, {}), base, experts, out_dir,
                                             method_name=name, seed=config.seed,
                                             extras=extras, overwrite=True).warnings
    except Exception as error:  # a failing method is a result too; the run goes on
        logging.exception("merge %s failed", name)
        return {"error": f"{type(error).__name__}: {error}"}
    merge_seconds = time.perf_counter() - start
    params = models.load_params(out_dir)
    result = {"scores": scorer(params, tasks_scored), "merge_seconds": round(merge_seconds, 2),
              "warnings": list(warnings)}
    if not config.keep_merges:
        shutil.rmtree(out_dir)
    result_file.write_text(json.dumps({"spec_hash": common.spec_hash(spec), "spec": spec,
                                       "result": result}, indent=1) + "\n")
    logging.info("merged %s: %s", name, result["scores"])
    return result


def cli_command(name: str, base, experts, fishers, output, seed: int) -> list[str]:
    """The ``python -m jaxmerge.main`` command of one merge (method defaults, no other flag)."""
    import jax

    command = [sys.executable, "-m", "jaxmerge.main", f"--method={name}", f"--base={base}",
               "--experts=" + ",".join(map(str, experts)), f"--output={output}",
               f"--seed={seed}", "--overwrite"]
    if jax.config.jax_compilation_cache_dir:  # the run's cache (a fresh workdir starts cold)
        command.append(f"--compilation_cache={jax.config.jax_compilation_cache_dir}")
    if fishers:
        command.append("--fisher=" + ",".join(map(str, fishers)))
    return command


def merge_with_cli(name: str, base, experts, fishers, output, seed: int,
                   timeout: float) -> list[str]:
    """Runs :func:`cli_command`; returns the merge's warnings (from the output's
    ``jaxmerge_config.json``).

    Raises:
      RuntimeError: the command failed.
      TimeoutError: it ran past ``timeout`` seconds (killed; set far above a merge's
        normal time, so this means a real hang, which should be reported, not retried).
    """
    command = cli_command(name, base, experts, fishers, output, seed)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        stderr = error.stderr.decode(errors="replace") if isinstance(error.stderr, bytes) else (
            error.stderr or "")
        raise TimeoutError(f"{' '.join(command)} did not finish in {timeout:.0f} s (killed); "
                           f"its stderr ended with: {stderr.strip()[-2000:]}") from None
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): "
                           f"{done.stderr.strip()[-2000:]}")
    record = pathlib.Path(output) / "jaxmerge_config.json"
    return json.loads(record.read_text()).get("warnings", []) if record.is_file() else []


def merge_group(config: Config, group: str, base: pathlib.Path,
                experts: dict[str, pathlib.Path], fishers: dict[str, pathlib.Path],
                graphdef, tokenizer, prepared: dict[str, TaskData], out_dir) -> dict:
    """Merges the group with every method (slerp on pairs); returns
    ``{"methods": {name: result}, "pairs": {"a+b": {method: result}}}``."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(experts)

    def scorer(params, tasks_scored):
        return {task: evaluation.accuracy(graphdef, params, tokenizer, prepared[task],
                                          batch_size=config.eval_batch)
                for task in tasks_scored}

    results: dict = {"methods": {}, "pairs": {}}
    for name in method_names(config):
        if name == "slerp" and len(names) != 2:
            results["methods"][name] = {
                "skipped": f"slerp interpolates exactly 2 models; this group has {len(names)} "
                           "experts (see the pairwise table)"}
            continue
        results["methods"][name] = _merge_and_score(
            config, name, base, [experts[t] for t in names], [fishers[t] for t in names],
            out_dir / name, scorer, names)
    if "slerp" in method_names(config) and len(names) > 2 and config.slerp_pairs:
        for first, second in itertools.combinations(names, 2):
            pair = f"{first}+{second}"
            results["pairs"][pair] = {
                name: _merge_and_score(config, name, base, [experts[first], experts[second]],
                                       [fishers[first], fishers[second]],
                                       out_dir / f"{name}-{pair}", scorer, [first, second])
                for name in PAIR_METHODS}
    return results


def diagnose(base: pathlib.Path, experts: dict[str, pathlib.Path], out_dir,
             plots: bool = True) -> dict:
    """The analysis report of the group (``report.json``, CSVs, plots); returns its verdict,
    the per-family table and the plot files."""
    measured = analysis.measure_checkpoints(base, list(experts.values()))
    report = analysis.write_report(measured, out_dir, plots=plots, overwrite=True)
    model = report["tables"]["model"]
    families = {name: {"sparsity": scope["sparsity"], "task_vector_norm": scope["task_vector_norm"]}
                for name, scope in report["tables"]["families"].items()}
    return {"verdict": report["verdict"],
            "model": {k: model[k] for k in ("sparsity", "task_vector_norm", "cosine", "regions")},
            "families": families, "files": report.get("files", []),
            "seconds": report.get("seconds")}
