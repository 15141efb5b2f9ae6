"""``report.md`` and ``scores.png`` of a finished run, from its settings, scores and prediction rows alone."""

from __future__ import annotations

from pathlib import Path

# (scores key, heading) per benchmark kind, coarse to fine; the chart shows the key in CHART
GROUPS = {
    "mmmu": (("per_discipline", "Per discipline"), ("per_subject", "Per subject")),
    "mmstar": (("per_category", "Per category"), ("per_l2_category", "Per l2 category")),
    "synthetic": (("per_task", "Per task"), ("per_question_type", "Per question type")),
}
CHART = {"mmmu": "per_subject", "mmstar": "per_category", "synthetic": "per_question_type"}
SHOWN_ERRORS = 20
SHOWN_EXAMPLES = 3  # right and wrong answers each
OUTPUT_CHARS = 400


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(groups: dict) -> list[str]:
    lines = ["| group | accuracy | correct | num | fallbacks |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {_cell(name)} | {100 * g['acc']:.1f} | {g['correct']} | {g['num']} | {g['fallbacks']} |"
              for name, g in groups.items()]
    return lines


def write_report(out: Path, kind: str, settings: dict, scores: dict, rows: list[dict]) -> None:
    """Tables (overall, each grouping, generation statistics, errors), a few right and wrong outputs, the chart."""
    done = [r for r in rows if not r.get("error")]
    errors = [r for r in rows if r.get("error")]
    lines = [f"# {settings['bench']} ({settings['split']})", "",
             " · ".join(f"{k}: `{v}`" for k, v in settings.items() if k not in ("bench", "split")), "",
             "## Overall", "", "| accuracy | correct | num | fallbacks | errors |", "|---:|---:|---:|---:|---:|",
             f"| {100 * scores['overall']:.2f} | {scores['correct']} | {scores['num']} | {scores['fallbacks']} | "
             f"{scores['errors']} |", "",
             "Fallbacks: answers not found in the output (MMMU: judged on its seeded random letter, as the official "
             "code does; otherwise judged wrong). Errors: examples that could not run, judged wrong.", ""]
    for key, heading in GROUPS[kind]:
        lines += [f"## {heading}", "", *_table(scores[key]), ""]
    if "multimodal_gain" in scores:
        g = scores["multimodal_gain"]
        ml = "—" if g["ml"] is None else f"{100 * g['ml']:.2f}"
        st = "—" if g["s_t"] is None else f"{100 * g['s_t']:.2f}"
        lines += ["## Multi-modal gain and leakage", "", "| S_v | S_wv | S_t | MG = S_v - S_wv | ML = max(0, S_wv - S_t) |",
                  "|---:|---:|---:|---:|---:|",
                  f"| {100 * g['s_v']:.2f} | {100 * g['s_wv']:.2f} | {st} | {100 * g['mg']:.2f} | {ml} |", "",
                  "As MMStar defines them: S_wv is this model with the images withheld, S_t its LLM base on the text "
                  "alone.", ""]
    if done:
        mean = {key: sum(r[key] for r in done) / len(done) for key in ("latent_tokens", "text_tokens", "seconds")}
        eos = sum(r["finish"] == "eos" for r in done) / len(done)
        lines += ["## Generation", "", "| latent tokens | text tokens | seconds | stopped at eos |",
                  "|---:|---:|---:|---:|",
                  f"| {mean['latent_tokens']:.1f} | {mean['text_tokens']:.1f} | {mean['seconds']:.3f} | "
                  f"{100 * eos:.0f}% |", "", "Means per example; seconds are the batch's time shared by its rows.", ""]
    if errors:
        lines += [f"## Errors ({len(errors)})", "", "| id | reason |", "|---|---|"]
        lines += [f"| {_cell(r['id'])} | {_cell(r['error'])} |" for r in errors[:SHOWN_ERRORS]]
        if len(errors) > SHOWN_ERRORS:
            lines.append(f"| ... | {len(errors) - SHOWN_ERRORS} more in predictions.jsonl |")
        lines.append("")
    shown = [r for r in done if r["correct"]][:SHOWN_EXAMPLES] + [r for r in done if not r["correct"]][:SHOWN_EXAMPLES]
    if shown:
        lines += ["## Example outputs", ""]
        for r in shown:
            output = r["output"] if len(r["output"]) <= OUTPUT_CHARS else r["output"][:OUTPUT_CHARS] + " ..."
            lines += [f"- `{r['id']}` {'right' if r['correct'] else 'wrong'}: gold `{r['answer']}`, parsed "
                      f"`{r['parsed']}`, {r['latent_tokens']} latent + {r['text_tokens']} text tokens",
                      "", "  ```text", *("  " + line for line in output.splitlines() or [""]), "  ```", ""]
    lines += ["## Chart", "", "![accuracy per group](scores.png)", ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
    title = f"{settings['bench']} ({settings['split']})"
    plot_groups(out / "scores.png", scores[CHART[kind]], scores["overall"], title)


def write_summary(out: Path, results: dict) -> str:
    """``summary.md`` of a command that ran several benchmarks (``results``: name -> (split, scores or the error)); its
    table is returned for the terminal too."""
    lines = ["| benchmark | split | accuracy | correct | num | fallbacks | errors | report |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for name, (split, scores) in results.items():
        if isinstance(scores, dict):
            link = f"[{name}/report.md]({name}/report.md)"
            lines.append(f"| {name} | {split} | {100 * scores['overall']:.2f} | {scores['correct']} | "
                         f"{scores['num']} | {scores['fallbacks']} | {scores['errors']} | {link} |")
        else:
            lines.append(f"| {name} | {split} | error: {_cell(scores)} | | | | | |")
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(f"# Summary\n\n{table}\n", encoding="utf-8")
    return table


def plot_groups(path: Path, groups: dict, overall: float, title: str) -> None:
    """Horizontal bars: accuracy (%) per group, with its example count, and the overall accuracy as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(groups)[::-1]  # first group on top
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.3 * max(len(names), 1)))
    ax.barh([f"{n} ({groups[n]['num']})" for n in names], [100 * groups[n]["acc"] for n in names], color="#4c72b0")
    ax.axvline(100 * overall, color="#c44e52", linestyle="--", label=f"overall {100 * overall:.1f}%")
    ax.set_xlim(0, 100)
    ax.set_xlabel("accuracy (%)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
