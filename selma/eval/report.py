"""The comparison across models: ``eval/summary.json``, ``eval/report.md`` and ``eval/report.png``."""

from __future__ import annotations

import io

from selma.core.rundir import RunDir

TITLES = {"dsg": "DSG-1K", "tifa": "TIFA v1.0", "prompts": "prompts (DSG)", "world": "shapes world"}
MODEL_ORDER = ("base", "merged")


def model_summaries(run: RunDir) -> dict[str, dict]:
    """Every ``eval/<model>/summary.json`` of the run, base first, then merged, then the rest by name."""
    found = {}
    for name in run.list_dirs("eval"):
        if run.exists("eval", name, "summary.json"):
            found[name] = run.read_json(f"eval/{name}/summary.json")
    order = [m for m in MODEL_ORDER if m in found] + sorted(m for m in found if m not in MODEL_ORDER)
    return {name: found[name] for name in order}


def headline_metrics(summaries: dict[str, dict]) -> list[tuple[str, str, callable]]:
    """(column title, benchmark, getter) for every number the main table shows."""
    benchmarks = sorted({b for s in summaries.values() for b in s["benchmarks"]}, key=list(TITLES).index)
    metrics = []
    for benchmark in benchmarks:
        title = TITLES[benchmark]
        overall = lambda s, b=benchmark: s["benchmarks"].get(b, {}).get("overall", {})  # noqa: E731
        metrics.append((f"{title} item mean", benchmark, lambda s, o=overall: o(s).get("item_mean")))
        metrics.append((f"{title} question mean", benchmark, lambda s, o=overall: o(s).get("question_mean")))
        if any("item_mean_no_dependencies" in overall(s) for s in summaries.values()):
            metrics.append((f"{title} item mean, no dependencies", benchmark,
                            lambda s, o=overall: o(s).get("item_mean_no_dependencies")))
        rewards = sorted({r for s in summaries.values() for r in s["benchmarks"].get(benchmark, {}).get("rewards", {})})
        for reward in rewards:
            metrics.append((f"{reward} ({title})", benchmark,
                            lambda s, b=benchmark, r=reward: s["benchmarks"].get(b, {}).get("rewards", {}).get(r)))
    return metrics


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _number(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def markdown_report(summaries: dict[str, dict]) -> str:
    metrics = headline_metrics(summaries)
    base = summaries.get("base")
    lines = ["# selma evaluation", "",
             "Scores in % (item mean: the mean over prompts of each prompt's mean question score; question mean: "
             "over all questions). DSG scores a question 0 when a question it depends on was answered \"no\". "
             "Reward columns are mean raw scores.", ""]
    header = ["model", *[title for title, _, _ in metrics]]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, summary in summaries.items():
        cells = [name]
        for title, _, get in metrics:
            value = get(summary)
            is_reward = "mean" not in title
            text = _number(value) if is_reward else _percent(value)
            if base is not None and name != "base" and value is not None and get(base) is not None and not is_reward:
                text += f" ({100 * (value - get(base)):+.1f})"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "In brackets: the change from `base` in points." if base is not None and len(summaries) > 1 else ""]
    for benchmark in sorted({b for s in summaries.values() for b in s["benchmarks"]}, key=list(TITLES).index):
        for key, label in (("per_category_broad", "category"), ("per_category_detailed", "detailed category"),
                           ("per_source", "source")):
            groups = sorted({g for s in summaries.values() for g in s["benchmarks"].get(benchmark, {}).get(key, {})})
            if not groups:
                continue
            column = "item_mean" if key == "per_source" else "question_mean"
            lines += ["", f"## {TITLES[benchmark]} by {label} ({column.replace('_', ' ')}, %)", "",
                      "| " + " | ".join([label, *summaries]) + " |", "|" + "---|" * (len(summaries) + 1)]
            for group in groups:
                cells = [group]
                for summary in summaries.values():
                    cells.append(_percent(summary["benchmarks"].get(benchmark, {}).get(key, {}).get(group, {}).get(column)))
                lines.append("| " + " | ".join(cells) + " |")
    for benchmark in sorted({b for s in summaries.values() for b in s["benchmarks"]}, key=list(TITLES).index):
        items = {m: s["benchmarks"][benchmark]["overall"]["items"] for m, s in summaries.items() if benchmark in s["benchmarks"]}
        if len(set(items.values())) > 1:
            lines += ["", f"**Not comparable:** the models saw different {TITLES[benchmark]} prompt sets "
                          f"(prompts per model: {items}); evaluate them again with the same --limit."]
    counts = {b: s["benchmarks"][b]["overall"] for s in summaries.values() for b in s["benchmarks"]}
    lines += ["", "Evaluated: " + ", ".join(f"{TITLES[b]} {c['items']} prompts / {c['questions']} questions per model"
                                           for b, c in counts.items())]
    return "\n".join(lines) + "\n"


def grouped_bars(groups: list[str], series: dict[str, tuple[list[float], list[float] | None]], *, ylabel: str,
                 title: str, labels: bool = False, width_per_bar: float = 0.8) -> bytes:
    """A grouped bar chart as PNG bytes: one bar per series in each group, optional error bars."""
    try:
        import matplotlib  # optional: the [eval] extra
    except ImportError:
        raise ImportError("the evaluation chart needs matplotlib: pip install 'selma[eval]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / max(len(series), 1)
    figure, axes = plt.subplots(figsize=(max(4.0, width_per_bar * len(groups) * max(1, len(series))), 3.6), dpi=120)
    for index, (name, (values, errors)) in enumerate(series.items()):
        positions = [g + (index - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = axes.bar(positions, values, width, yerr=errors, capsize=2 if errors else 0, label=name)
        if labels:
            axes.bar_label(bars, fmt="%.1f", fontsize=7)
    axes.set_xticks(range(len(groups)), groups)
    axes.set_ylabel(ylabel)
    axes.set_ylim(0, 100)
    axes.set_title(title)
    axes.legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def bar_chart(summaries: dict[str, dict]) -> bytes:
    """A grouped bar chart (PNG) of each benchmark's item mean per model."""
    metrics = [(t, b, g) for t, b, g in headline_metrics(summaries) if t.endswith("item mean")]
    series = {model: ([100 * (get(summary) or 0.0) for _, _, get in metrics], None)
              for model, summary in summaries.items()}
    return grouped_bars([title.replace(" item mean", "") for title, _, _ in metrics], series, ylabel="score (%)",
                        title="selma evaluation (item mean)", labels=True)


def write_report(run: RunDir, progress=print) -> dict:
    """Write the comparison of every model evaluated in ``run``; returns where it went."""
    summaries = model_summaries(run)
    run.write_json("eval/summary.json", summaries)
    run.write_bytes("eval/report.md", markdown_report(summaries).encode())
    run.write_bytes("eval/report.png", bar_chart(summaries))
    progress(f"[eval] report: {run.uri_of('eval', 'report.md')} and report.png")
    return {"markdown": run.uri_of("eval", "report.md"), "chart": run.uri_of("eval", "report.png")}
