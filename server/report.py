"""The morning report: each agent's results table and a progress plot like the seed's progress.png
(val_bpb per experiment, kept ones highlighted, the running best as a step line).
"""

from __future__ import annotations

from pathlib import Path

from server.lab import Lab
from server.models import RunRecord


def table(lab: Lab) -> str:
    """Every agent's results.tsv, one after another, with the agent's name above it."""
    parts = []
    for agent in lab.ledger.agents():
        path = lab.results_path(agent)
        body = path.read_text() if path.exists() else "(no finished runs)\n"
        parts.append(f"# {agent} ({path})\n{body}")
    return "\n".join(parts) or "no runs yet\n"


def plot(lab: Lab, out: Path) -> Path:
    """Write the progress plot of all agents to `out` (PNG)."""
    import matplotlib  # noqa: PLC0415 - only the report needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(10, 5), dpi=120)
    for agent in lab.ledger.agents():
        runs: list[RunRecord] = sorted(lab.ledger.runs(agent=agent), key=lambda r: r.seq)
        done = [(i, r) for i, r in enumerate(runs, 1) if r.val_bpb is not None]
        if not done:
            continue
        xs, ys = [i for i, _ in done], [r.val_bpb for _, r in done]
        ax.scatter(xs, ys, s=14, color="lightgray", zorder=2, label="discarded" if not ax.collections else None)
        kept = [(i, r.val_bpb) for i, r in done if r.kept]
        line = ax.step([i for i, _ in kept] + [len(runs)], [v for _, v in kept] + [kept[-1][1]], where="post",
                       label=f"{agent} best", zorder=3) if kept else None
        color = line[0].get_color() if line else None
        ax.scatter([i for i, _ in kept], [v for _, v in kept], s=36, color=color, zorder=4, label=f"{agent} kept")
        unverified = [(i, r.val_bpb) for i, r in done if r.verified is False]
        if unverified:  # scored in train.py's own process: drawn hollow, named in the legend
            ax.scatter([i for i, _ in unverified], [v for _, v in unverified], s=90, facecolors="none",
                       edgecolors="red", zorder=5, label=f"{agent} unverified (in-process score)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("experiment # (per agent)")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.set_title(f"autoresearch progress: {lab.config.program}")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
