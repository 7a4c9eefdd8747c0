"""`make plot RUN=<id>`: loss, loss per supervision step and refinement from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def plot(run_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: has the run logged a step yet?")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train (last step)")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val (EMA)")
    ax.set(xlabel="step", ylabel="loss", title=f"{run_dir.name}: loss")
    ax.legend()
    written.append(save(fig, out_dir / "loss.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    n = len(train[0]["step_losses"]) if train else 0
    for s in range(n):
        ax.plot([r["step"] for r in train], [r["step_losses"][s] for r in train],
                label=f"step {s + 1}")
    ax.set(xlabel="step", ylabel="loss", title="loss per supervision step")
    ax.legend(fontsize=7)
    written.append(save(fig, out_dir / "step_losses.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["refinement"] for r in train], label="train")
    if val:
        ax.plot([r["step"] for r in val], [r["val_refinement"] for r in val], "o-", label="val")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(xlabel="step", ylabel="(L_1 − L_N) / L_1", title="refinement")
    ax.legend()
    written.append(save(fig, out_dir / "refinement.png"))
    return written


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
