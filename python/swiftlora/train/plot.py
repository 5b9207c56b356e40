"""The loss curve of a training run as a PNG (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path


def loss_points(log_history: list[dict]) -> tuple[list[int], list[float]]:
    """``(steps, losses)`` from a Trainer's ``state.log_history`` (the entries carrying a training ``loss``)."""
    points = [(entry["step"], float(entry["loss"])) for entry in log_history if "loss" in entry and "step" in entry]
    return [s for s, _ in points], [v for _, v in points]


def plot_loss_curve(log_history: list[dict], path, title: str = "training loss") -> Path:
    """Write the training loss against the optimizer step to ``path`` (PNG); returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    steps, losses = loss_points(log_history)
    if not steps:
        raise ValueError("no training loss was logged (set logging_steps so at least one step is logged)")
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, losses, marker="o" if len(steps) < 40 else None, linewidth=1, alpha=0.6, label="per step")
    if len(steps) >= 8:  # per-step losses of small batches are noisy: an exponential moving average shows the trend
        smooth, value = [], 0.0
        for t, loss in enumerate(losses, 1):
            value = 0.8 * value + 0.2 * loss
            smooth.append(value / (1 - 0.8**t))  # bias-corrected: the first points are not pulled towards 0
        ax.plot(steps, smooth, linewidth=2, label="moving average")
        ax.legend()
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
