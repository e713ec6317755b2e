"""Results JSON -> Markdown tables (and the training-curve plot): ``python -m experiments.render``.

Rewrites the parts of ``experiments/README.md`` between ``<!-- results:{base}:begin -->`` and
``<!-- results:{base}:end -->`` from ``experiments/results/{base}.json``, for every results
file present, so no number in those parts is typed by hand.

The main table is shaped like ResMerge's Table 1: rows are the base, the individual experts
(each on its own task) and one row per merge method; columns are the tasks grouped by domain
(one task per domain here, so a domain average is its task's accuracy), the overall average,
and the normalised average (mean over tasks of merge accuracy / the task's expert accuracy).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from experiments import tasks

HERE = pathlib.Path(__file__).parent
README = HERE / "README.md"
RESULTS = HERE / "results"
GROUP_TITLES = {"rl": "RL (GRPO) experts", "sft": "SFT experts"}


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _own_scores(group: dict) -> dict[str, float]:
    return {task: expert["scores"][task] for task, expert in group["experts"].items()}


def normalised(scores: dict[str, float], own: dict[str, float]) -> float | None:
    """Mean over tasks of accuracy / the task's expert accuracy (tasks with a zero expert are
    left out)."""
    return _mean([scores[t] / own[t] for t in scores if own.get(t)])


def _row(label: str, scores: dict[str, float], names: list[str], own=None, bold=None) -> str:
    cells = []
    for name in names:
        text = _pct(scores.get(name))
        cells.append(f"**{text}**" if bold and bold.get(name) == scores.get(name) else text)
    average = _mean([scores.get(n) for n in names])
    norm = normalised(scores, own) if own else None
    return f"| {label} | " + " | ".join(cells) + f" | {_pct(average)} | {_pct(norm)} |"


def main_table(results: dict, regime: str) -> str:
    group = results["groups"][regime]
    names = list(results["tasks"])
    header = [f"{tasks.TASKS[n].domain} ({n})" if n in tasks.TASKS else n for n in names]
    own = _own_scores(group)
    merged = {m: r["scores"] for m, r in group["methods"].items() if "scores" in r}
    best = {n: max((s[n] for s in merged.values()), default=None) for n in names}
    lines = [f"| {GROUP_TITLES[regime]} | " + " | ".join(header) + " | Avg. | Norm. avg. |",
             "|---|" + "---|" * (len(names) + 2),
             _row("Base model", results["base_model"]["scores"], names, own),
             _row("Individual experts (own task)", own, names, own)]
    for method, result in group["methods"].items():
        if "scores" in result:
            lines.append(_row(f"`{method}`", result["scores"], names, own, best))
        else:
            cell = "n/a" if "skipped" in result else "error"
            lines.append(f"| `{method}` | " + " | ".join(cell for _ in names)
                         + f" | {cell} | {cell} |")
    skipped = [f"`{m}`: {r.get('skipped') or r.get('error')}" for m, r in group["methods"].items()
               if "scores" not in r]
    text = "\n".join(lines)
    if skipped:
        text += "\n\n" + "; ".join(skipped) + "."
    return text


def expert_table(results: dict) -> str:
    names = list(results["tasks"])
    lines = ["| model | " + " | ".join(names) + " | Avg. |", "|---|" + "---|" * (len(names) + 1)]
    base = results["base_model"]["scores"]
    lines.append("| base | " + " | ".join(_pct(base[n]) for n in names)
                 + f" | {_pct(_mean(base.values()))} |")
    for regime, group in results["groups"].items():
        for task, expert in group["experts"].items():
            scores = expert["scores"]
            lines.append(f"| {regime} expert `{task}` | "
                         + " | ".join(_pct(scores[n]) for n in names)
                         + f" | {_pct(_mean(scores.values()))} |")
    return "\n".join(lines)


def pair_table(results: dict) -> str:
    lines = ["| group | pair | method | first task | second task | Avg. | Norm. avg. |",
             "|---|---|---|---|---|---|---|"]
    for regime, group in results["groups"].items():
        own = _own_scores(group)
        for pair, by_method in group.get("pairs", {}).items():
            for method, result in by_method.items():
                scores = result["scores"]
                first, second = pair.split("+")
                lines.append(f"| {regime} | {pair} | `{method}` | {_pct(scores[first])} | "
                             f"{_pct(scores[second])} | {_pct(_mean(scores.values()))} | "
                             f"{_pct(normalised(scores, own))} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _num(value, digits=3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def diagnostics_table(results: dict) -> str:
    groups = results["groups"]
    verdicts = {r: g["diagnostics"]["verdict"] for r, g in groups.items()}
    numbers = {r: v["numbers"] for r, v in verdicts.items()}
    rows = [
        ("update sparsity (mean over experts; share of entries unchanged in bf16)",
         lambda n: _pct(n["sparsity"])),
        ("mean layer-wise cosine of task vectors", lambda n: _num(n["layer_cosine"])),
        ("entries: conflict / agreeing overlap / private (all pairs)",
         lambda n: f"{_pct(n['conflict'])} / {_pct(n['overlap'])} / {_pct(n['private'])}"),
        ("share of an expert's updates that are its own", lambda n: _pct(n["private_share"])),
        ("top-1 singular direction's share of update energy", lambda n: _pct(n["top1_energy"])),
        ("… relative to an i.i.d. noise matrix", lambda n: _num(n["top1_vs_noise"], 1) + "×"),
        ("stable rank before → after removing the head",
         lambda n: f"{_num(n['stable_rank_before'], 1)} → {_num(n['stable_rank_after'], 1)}"),
        ("head agreement S_H", lambda n: _num(n["head_agreement"])),
        ("residual coherence c_R", lambda n: _num(n["residual_coherence"])),
    ]
    lines = ["| measure | " + " | ".join(GROUP_TITLES[r] for r in groups) + " |",
             "|---|" + "---|" * len(groups)]
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(numbers[r]) for r in groups) + " |")
    tasks_order = list(next(iter(groups.values()))["experts"])
    model = {r: g["diagnostics"].get("model") for r, g in groups.items()}
    if all(model.values()):
        lines.append(f"| ‖τ‖ per expert ({', '.join(tasks_order)}) | " + " | ".join(
            ", ".join(f"{v:.2f}" for v in model[r]["task_vector_norm"]) for r in groups) + " |")
    families = sorted({f for g in groups.values() for f in g["diagnostics"].get("families") or {}})
    for family in families:
        cells = []
        for r in groups:
            scope = (groups[r]["diagnostics"].get("families") or {}).get(family)
            cells.append("—" if scope is None else
                         ", ".join(_pct(v) for v in scope["sparsity"]))
        lines.append(f"| sparsity of {family} tensors per expert | " + " | ".join(cells) + " |")
    lines.append("| verdict (jaxmerge.analysis) | " + " | ".join(
        f"{v['regime']}, {v['alignment']}, {v['concentration']}" for v in verdicts.values())
        + " |")
    lines.append("| methods the verdict recommends | " + " | ".join(
        ", ".join(f"`{m}`" for m in v["recommended"]) or "—" for v in verdicts.values()) + " |")
    return "\n".join(lines)


def summary(results: dict) -> str:
    """Facts computed from the results (gains over the base, best merges, skill keepers)."""
    base = results["base_model"]["scores"]
    lines = []
    training = results["base_model"].get("training", {})
    greedy, sampled = training.get("validation_greedy"), training.get("validation_sampled")
    if greedy and sampled:
        lines.append("- Base on the validation split, greedy / sampled at temperature 1 (GRPO's "
                     "starting reward): " + ", ".join(
                         f"{t} {_pct(greedy[t])} / {_pct(sampled[t])}" for t in greedy) + ".")
    for regime, group in results["groups"].items():
        own = _own_scores(group)
        gains = {t: own[t] - base[t] for t in own}
        lines.append(
            f"- {GROUP_TITLES[regime]}: own-task test accuracy "
            + ", ".join(f"{t} {_pct(base[t])} → {_pct(own[t])} ({100 * g:+.1f} points)"
                        for t, g in gains.items())
            + f"; smallest gain {100 * min(gains.values()):+.1f} points.")
        merged = {m: r["scores"] for m, r in group["methods"].items() if "scores" in r}
        if merged:
            ranked = sorted(merged, key=lambda m: -_mean(merged[m].values()))
            lines.append(f"- {GROUP_TITLES[regime]} merged: best average "
                         + ", ".join(f"`{m}` {_pct(_mean(merged[m].values()))}"
                                     for m in ranked[:3])
                         + f"; worst `{ranked[-1]}` {_pct(_mean(merged[ranked[-1]].values()))}.")
            keepers = [m for m in ranked if all(merged[m][t] >= 0.9 * own[t] for t in own)]
            lines.append(f"- {GROUP_TITLES[regime]}: methods keeping ≥ 90 % of every expert's "
                         "own-task accuracy: "
                         + (", ".join(f"`{m}`" for m in keepers) if keepers else "none") + ".")
    return "\n".join(lines)


def timing_table(results: dict) -> str:
    seconds = results["seconds"]
    lines = ["| stage | seconds |", "|---|---|"]
    lines += [f"| {stage.replace('_', ' ')} | {value:.0f} |" for stage, value in seconds.items()]
    env = results.get("environment", {})
    cached = results.get("cached_stages")
    if cached:
        lines.append(f"\nStages served from the workdir cache (not timed): {', '.join(cached)}.")
    else:
        lines.append("\nEvery stage ran (nothing cached): the total is the from-scratch time.")
    return "\n".join(lines) + (f"\n\nMachine: {env.get('cpus')} CPUs ({env.get('machine')}), "
                               f"Python {env.get('python')}, jax {env.get('jax')}, "
                               f"optax {env.get('optax')}, flax {env.get('flax')}.")


def results_markdown(results: dict, figures: str | None = None) -> str:
    """The whole results section of one base."""
    parts = [f"#### Summary (computed from `results/{results['base']}.json`)", summary(results)]
    for regime in results["groups"]:
        parts += [f"#### {GROUP_TITLES[regime]}: test accuracy (%)", main_table(results, regime)]
    pairs = pair_table(results)
    if pairs:
        parts += ["#### `slerp` on pairs of experts, beside `linear` on the same pair (%)", pairs]
    parts += ["#### Every expert on every task (%)", expert_table(results),
              "#### Diagnostics of the task vectors", diagnostics_table(results)]
    if figures:
        order = ", ".join(f"{i + 1} = {t}" for i, t in enumerate(results["tasks"]))
        parts += ["#### Plots",
                  f"![training curves]({figures}/training.png)",
                  f"Diagnostics plots (`jaxmerge.analysis`; experts {order}):"]
        shown = ("spectral", "sparsity")
        others = []
        for regime in results["groups"]:
            files = [f for f in results["groups"][regime]["diagnostics"]["files"]
                     if f.endswith(".png")]
            for name in shown:
                parts += [f"![{regime} {f}]({figures}/{regime}-{f})" for f in files
                          if f.startswith(name)]
            others += [f"[{regime} {f.removesuffix('.png')}]({figures}/{regime}-{f})"
                       for f in files if not f.startswith(shown)]
        if others:
            parts.append("More: " + ", ".join(others) + ".")
    parts += ["#### Run time", timing_table(results)]
    return "\n\n".join(parts)


def write_curves(results: dict, path) -> str | None:
    """GRPO mean reward per step (smoothed) and SFT loss, per task; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, (rl_axis, sft_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    for task, expert in results["groups"]["rl"]["experts"].items():
        curve = expert["curve"] or []
        window = max(len(curve) // 20, 1)
        smooth = [sum(curve[max(0, i - window + 1):i + 1]) / min(i + 1, window)
                  for i in range(len(curve))]
        rl_axis.plot(range(len(curve)), smooth, label=task)
    rl_axis.set(title="GRPO: mean sampled reward", xlabel="step", ylabel="reward", ylim=(0, 1))
    for task, expert in results["groups"]["sft"]["experts"].items():
        curve = expert["curve"] or []
        sft_axis.plot([s for s, _ in curve], [v for _, v in curve], label=task)
    sft_axis.set(title="SFT: response cross-entropy", xlabel="step", ylabel="nats / token",
                 yscale="log")
    for axis in (rl_axis, sft_axis):
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return str(path)


def render_readme(readme=README, results_dir=RESULTS) -> list[str]:
    """Rewrites every ``results:{base}`` block of the README from ``results/{base}.json``;
    returns the bases rendered."""
    readme = pathlib.Path(readme)
    text = readme.read_text()
    rendered = []
    for path in sorted(pathlib.Path(results_dir).glob("*.json")):
        base = path.stem
        begin, end = f"<!-- results:{base}:begin -->", f"<!-- results:{base}:end -->"
        if begin not in text:
            continue
        results = json.loads(path.read_text())
        figures = f"results/{base}" if (path.parent / base).is_dir() else None
        block = (f"{begin}\n<!-- generated by python -m experiments.render; edits are lost -->\n\n"
                 f"{results_markdown(results, figures)}\n\n{end}")
        start, stop = text.index(begin), text.index(end, text.index(begin)) + len(end)
        text = text[:start] + block + text[stop:]
        rendered.append(base)
    readme.write_text(text)
    return rendered


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.render")
    parser.add_argument("--results", default=None,
                        help="print this results JSON's tables instead of updating the README")
    args = parser.parse_args(argv)
    if args.results:
        print(results_markdown(json.loads(pathlib.Path(args.results).read_text())))
        return 0
    rendered = render_readme()
    print(f"rendered {', '.join(rendered) or 'nothing'} into {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
