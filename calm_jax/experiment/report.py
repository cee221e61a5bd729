"""A study's reports, each as JSON (the record), Markdown (the table) and PNG (the figure).

  table1    m_A, m_B and CALM on every eval set, the paper's figures beside ours
  ablations one row per ablation (calm_jax.experiment.study.ABLATIONS)
  sweep     CALM at each point of the task's sweep
  seeds     one Table 1 per data seed, with mean, min and max
"""

from __future__ import annotations

import statistics

from calm_jax.data import write_json, write_text

MODELS = ("m_A", "m_B", "calm")
_MODEL_NAMES = {"m_A": "m_A", "m_B": "m_B", "calm": "CALM"}


def write(out_dir: str, name: str, content: dict, markdown: str, plot=None) -> None:
    """OUT_DIR/NAME.json, NAME.md and (with `plot`, a function of the PNG path) NAME.png."""
    write_json(f"{out_dir}/{name}.json", content)
    write_text(f"{out_dir}/{name}.md", markdown)
    if plot is not None:
        plot(f"{out_dir}/{name}.png")


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def table1_markdown(task, results: dict, title: str, seconds: dict) -> str:
    """Table 1 with the paper's numbers beside ours (accuracy %)."""
    head = "| task | " + " | ".join(f"{_MODEL_NAMES[m]} paper | {_MODEL_NAMES[m]} ours" for m in MODELS) + " |"
    lines = [f"# Table 1: {task.title} ({title})", "", head, "|---|" + "---:|" * 6]
    for s in task.eval_sets:
        cells = []
        for model in MODELS:
            paper = task.paper.get(model, {}).get(s)
            cells += ["" if paper is None else f"{paper:.1f}", _pct(results[model].get(s))]
        lines.append(f"| {task.set_names[s]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + task.table_note + f"\nStage seconds: {seconds}\n"


def _bars(path: str, groups, series: dict, title: str, ticks=None, figsize=(9, 4.2), rotate=False, labels=True):
    """Grouped bars: one group per entry of `groups`, one bar per series ({name: values});
    ticks: {series name: values} drawn as black ticks (the paper's figures)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(groups))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=figsize)
    for k, (name, values) in enumerate(series.items()):
        offset = (k - (len(series) - 1) / 2) * width
        bars = ax.bar(x + offset, values, width, label=name)
        if labels:
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        if ticks and name in ticks:
            ax.scatter(x + offset, ticks[name], marker="_", s=250, color="black", zorder=3,
                       label="paper" if k == 0 else None)
    if rotate:
        ax.set_xticks(x, groups, rotation=30, ha="right", fontsize=8)
    else:
        ax.set_xticks(x, groups, fontsize=8)
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 122)  # room for the legend above 100%
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, ncol=4, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table1_plot(task, results: dict, title: str):
    """Grouped bars: our accuracy per eval set and model; the paper's as black ticks."""
    groups = [task.set_names[s].replace(" (", "\n(") for s in task.eval_sets]
    series = {f"{m} (ours)": [100 * results[m].get(s, 0.0) for s in task.eval_sets] for m in MODELS}
    ticks = {f"{m} (ours)": [task.paper.get(m, {}).get(s, float("nan")) for s in task.eval_sets] for m in MODELS}
    return lambda path: _bars(path, groups, series, title, ticks)


def ablations_markdown(task, table: dict, rows, title: str) -> str:
    """One row per ablation: accuracy % per eval set, trainable parameters, seconds, what it is."""
    sets = task.eval_sets
    lines = [f"# Ablations: {task.title} ({title})", "",
             "| row | " + " | ".join(task.set_names[s] for s in sets) + " | trainable params | s | what |",
             "|---|" + "---:|" * (len(sets) + 2) + "---|"]
    for name in rows:
        cells = [_pct(table[name][s]) for s in sets]
        count = table["trainable_params"][name]
        cells += [f"{count:,}" if count else "-", f"{table['seconds'][name]:.0f}", table["notes"][name]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    a = task.anchor_set
    forgetting = (f"\nForgetting: {task.set_names[a]} of m_B {_pct(table['m_B'][a])}% before, "
                  f"{_pct(table['finetune_m_B'][a])}% after full fine-tuning on D_C "
                  f"(CALM: {_pct(table['calm'][a])}%).\n") if "finetune_m_B" in rows else ""
    note = ("\nExact match of greedy generation (accuracy %); every trained row uses the same D_C and training "
            "stage. Paper (Table 5, FLORES languages better than m_B, same added parameters): CALM 175, vanilla "
            "m_A 115, random m_A 43, m_A as encoder 102, LoRA 82.\n")
    return "\n".join(lines) + "\n" + forgetting + note


def ablations_plot(task, table: dict, rows, title: str):
    series = {task.set_names[s]: [100 * table[r][s] for r in rows] for s in task.eval_sets}
    return lambda path: _bars(path, list(rows), series, title, figsize=(13, 4.5), rotate=True, labels=False)


def sweep_markdown(task, sweep: dict, title: str) -> str:
    sets = task.sweep_sets
    lines = [f"# Sweep: {task.title} ({title})", "",
             f"| {task.sweep_axis} | D_C (distinct) | " + " | ".join(f"{task.set_names[s]} | n" for s in sets)
             + " | s |", "|---|---:|" + "---:|---:|" * len(sets) + "---:|"]
    for p in sweep["points"]:
        cells = [task.sweep_label(p), f"{p['dc_examples']} ({p['dc_distinct']})"]
        cells += [c for s in sets for c in (_pct(p[s]), str(p["eval_sizes"][s]))]
        lines.append("| " + " | ".join(cells) + f" | {p['seconds']:.0f} |")
    return "\n".join(lines) + "\n\n" + task.sweep_note


def sweep_plot(task, sweep: dict, title: str):
    def plot(path):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = [task.sweep_label(p) for p in sweep["points"]]
        fig, ax = plt.subplots(figsize=(6, 4))
        for s in task.sweep_sets:
            ax.plot(labels, [100 * p[s] for p in sweep["points"]], "o-", label=task.set_names[s])
        ax.set_xlabel(task.sweep_axis)
        ax.set_ylabel("exact match (%)")
        ax.set_ylim(-2, 102)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return plot


def spread(tables: dict) -> dict:
    """{model: {eval set: {"mean", "min", "max"}}} over `tables` ({run name: Table 1 dict})."""
    first = next(iter(tables.values()))
    return {m: {s: {"mean": statistics.fmean(t[m][s] for t in tables.values()),
                    "min": min(t[m][s] for t in tables.values()), "max": max(t[m][s] for t in tables.values())}
                for s in first[m]} for m in MODELS}


def seeds_markdown(task, seeds: dict, title: str) -> str:
    """Per run and eval set CALM's accuracy, then mean, min and max of every model."""
    runs, summary = seeds["runs"], seeds["summary"]
    sets = task.eval_sets
    lines = [f"# Seeds: {task.title} ({title})", "", "| run | model | " + " | ".join(task.set_names[s] for s in sets)
             + " |", "|---|---|" + "---:|" * len(sets)]
    for name, table in runs.items():
        for m in MODELS:
            lines.append(f"| {name} | {_MODEL_NAMES[m]} | " + " | ".join(_pct(table[m][s]) for s in sets) + " |")
    for stat in ("mean", "min", "max"):
        for m in MODELS:
            lines.append(f"| **{stat}** | {_MODEL_NAMES[m]} | "
                         + " | ".join(_pct(summary[m][s][stat]) for s in sets) + " |")
    return "\n".join(lines) + f"\n\nExact match of greedy generation (accuracy %) over {len(runs)} runs.\n"
