"""The training's loss curve as a picture (matplotlib), saved beside the adapter and sent to the tracker."""

from __future__ import annotations

from pathlib import Path


def save_loss_curve(
    path: Path, loss: list[tuple[int, float]], evals: list[tuple[int, float]], title: str = ""
) -> Path:
    """Train loss per step (and eval loss where measured) as a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.2), dpi=110)
    if loss:
        axes.plot(
            [s for s, _ in loss], [v for _, v in loss], label="train loss", color="#2563eb", linewidth=1.6
        )
    if evals:
        axes.plot(
            [s for s, _ in evals],
            [v for _, v in evals],
            label="held-out loss (training_eval_loss)",
            color="#dc2626",
            marker="o",
        )
    axes.set_xlabel("step")
    axes.set_ylabel("loss per trained token")
    if title:
        axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    if loss or evals:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return Path(path)
