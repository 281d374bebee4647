"""What a run shows: the results table and the training curves."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def format_table(result: dict, title: str) -> str:
    """Accuracies with their 95% confidence intervals, one per line."""
    rows = [(k, v, result.get(k + "_ci95")) for k, v in result.items()
            if isinstance(v, float) and not k.endswith("_ci95") and k not in ("epsilon", "step_size")]
    width = max([len(k) for k, _, _ in rows] + [10])
    lines = [f"{title}: {result.get('samples', '?')} images, eps {result.get('epsilon', float('nan')):.4g}, "
             f"attack step {result.get('step_size', float('nan')):.4g}"]
    for key, value, ci in rows:
        interval = f"  [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
        lines.append(f"  {key:<{width}}  {value:.4f}{interval}")
    return "\n".join(lines)


def plot_curves(history: list[dict], path):
    """Loss, clean and robust accuracy and throughput against passes, written
    atomically so a viewer never sees half a file."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = [r for r in history if r.get("type") == "train"]
    evals = [r for r in history if r.get("type") == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    if train:
        x = [r.get("progress", r["epoch"]) for r in train]
        axes[0].plot(x, [r["loss"] for r in train])
        axes[2].plot(x, [r["images_per_s"] for r in train])
    if evals:
        ex = [r["epoch"] for r in evals]
        axes[1].plot(ex, [r["clean_top1"] for r in evals], "o-", label="clean")
        robust = [k for k in evals[-1] if k.startswith(("pgd-", "cw-")) and not k.endswith("_ci95")]
        for k in robust:
            axes[1].plot(ex, [r.get(k) for r in evals], "o-", label=k)
        axes[1].legend()
    for ax, title in zip(axes, ("training loss", "held-out accuracy", "images/s")):
        ax.set_title(title)
        ax.set_xlabel("pass")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
