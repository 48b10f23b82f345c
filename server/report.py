"""The morning report: the lab's noise, each agent's results table and a progress plot like the
seed's progress.png (val_bpb per experiment, kept ones highlighted, the running best as a step line
inside its noise band: the margin a change must beat it by).
"""

from __future__ import annotations

from pathlib import Path

from server.lab import Lab
from server.models import CALIBRATION_AGENT, RunRecord


def agents(lab: Lab) -> list[str]:
    return [a for a in lab.ledger.agents() if a != CALIBRATION_AGENT]


def noise_line(lab: Lab) -> str:
    info = lab.noise_info()
    runs = ", ".join(f"{r.val_bpb:.6f} (seed {r.seed}, {r.run_id})" for r in info.calibration_runs)
    measured = f"σ = {info.sigma:.6f} over {len(info.calibration_runs)} seeds: {runs}" if info.sigma is not None else (
        "σ not measured (autoresearch-mcp calibrate)")
    return f"# noise: {measured}\n# {info.rule}\n"


def table(lab: Lab) -> str:
    """The lab's noise, then every agent's results.tsv, one after another, with the agent's name above it."""
    parts = [noise_line(lab)]
    for agent in agents(lab):
        path = lab.results_path(agent)
        body = path.read_text() if path.exists() else "(no finished runs)\n"
        parts.append(f"# {agent} ({path})\n{body}")
    return "\n".join(parts) if len(parts) > 1 else parts[0] + "no runs yet\n"


NO_POSITION = ("cancelled", "interrupted", "infra-error", "queued", "running")
"""Runs that were not an experiment of the agent's (stopped, or failed by the sandbox): no x position."""


def experiments(runs: list[RunRecord]) -> list[tuple[int, RunRecord]]:
    """One agent's experiments numbered 1, 2, ... as the plot places them: a confirm rerun belongs to
    its parent's experiment, and a run stopped before it was one takes no number."""
    return list(enumerate(sorted((r for r in runs if r.role != "confirm" and r.status not in NO_POSITION),
                                 key=lambda r: r.seq), 1))


def draw(lab: Lab):
    """The progress figure of all agents (matplotlib): each agent's discarded runs as dots, its kept
    ones and the running best as a step line inside its noise band; only what is drawn is in the legend."""
    import matplotlib  # noqa: PLC0415 - only the report needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(10, 5), dpi=120)
    margin = lab.noise().margin()
    for agent in agents(lab):
        numbered = experiments(lab.ledger.runs(agent=agent))
        done = [(i, r) for i, r in numbered if r.val_bpb is not None]
        if not done:
            continue
        last = numbered[-1][0]
        discarded = [(i, r.val_bpb) for i, r in done if not r.kept]
        if discarded:
            ax.scatter([i for i, _ in discarded], [v for _, v in discarded], s=14, color="lightgray", zorder=2,
                       label="discarded" if "discarded" not in ax.get_legend_handles_labels()[1] else None)
        kept = [(i, r.val_bpb) for i, r in done if r.kept]
        if kept:
            xs, ys = [i for i, _ in kept] + [last], [v for _, v in kept] + [kept[-1][1]]
            color = ax.step(xs, ys, where="post", label=f"{agent} best", zorder=3)[0].get_color()
            if margin > 0:
                ax.fill_between(xs, [y - margin for y in ys], [y + margin for y in ys], step="post", color=color,
                                alpha=0.12, zorder=1, label=f"{agent} best ± margin ({margin:.4f})")
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
    return fig


def plot(lab: Lab, out: Path) -> Path:
    """Write the progress plot of all agents to `out` (PNG)."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig = draw(lab)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
