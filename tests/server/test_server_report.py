"""The morning report's progress plot: what it numbers and what its legend names (issue 22)."""

from __future__ import annotations

from server import report


def test_stopped_runs_take_no_x_position_and_the_legend_names_only_what_is_drawn(lab, tmp_path):
    ledger = lab.ledger
    plan = [("ok", 2.0, True), ("cancelled", None, False), ("crash", None, False), ("interrupted", None, False),
            ("ok", 2.1, False), ("ok", 1.9, True), ("infra-error", None, False)]
    ids = []
    for status, val, kept in plan:
        rec = ledger.create_run("alice", status, None)
        ledger.finish(rec.run_id, status, val_bpb=val, kept=kept, decision="keep" if kept else None)
        ids.append(rec.run_id)
    rec = ledger.create_run("bob", "nothing kept yet", None)  # bob: one discarded run, no best
    ledger.finish(rec.run_id, "ok", val_bpb=2.5, kept=False, decision="discard")

    numbered = [(i, r.run_id) for i, r in report.experiments(lab.ledger.runs(agent="alice"))]
    assert numbered == [(1, ids[0]), (2, ids[2]), (3, ids[4]), (4, ids[5])]  # the crash counts, stops do not

    fig = report.draw(lab)
    ax = fig.axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["discarded", "alice best", "alice best ± margin (0.0250)", "alice kept"]  # bob: no best drawn
    assert [t for t in labels if t.startswith("bob")] == []
    kept_points = [c for c, label in zip(ax.collections, [c.get_label() for c in ax.collections]) if label == "alice kept"]
    assert kept_points[0].get_offsets().tolist() == [[1.0, 2.0], [4.0, 1.9]]
    [best] = [line for line in ax.get_lines() if line.get_label() == "alice best"]
    assert best.get_xdata().tolist() == [1, 4, 4]  # the staircase ends at the last experiment, not at run 7
    assert all(float(t).is_integer() for t in ax.get_xticks())
    assert report.plot(lab, tmp_path / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
