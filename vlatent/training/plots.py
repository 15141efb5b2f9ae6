"""Loss curves from a Trainer's ``log_history``: the total and each named loss."""

from __future__ import annotations

from pathlib import Path


def plot_losses(log_history: list[dict], path: str | Path, title: str = "") -> Path:
    """Write a PNG with one line per logged loss (``loss``, ``loss_ce``, ``loss_latent_alignment``, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list[int], list[float]]] = {}
    for entry in log_history:
        for key, value in entry.items():
            if (key == "loss" or key.startswith("loss_")) and "step" in entry:
                xs, ys = series.setdefault(key, ([], []))
                xs.append(entry["step"])
                ys.append(float(value))
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for key, (xs, ys) in sorted(series.items()):
        ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=key, linewidth=1.5 if key == "loss" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
