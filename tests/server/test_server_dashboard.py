"""The dashboard (issue 22): its HTTP answers, and the page in a real headless Chromium (Debian's
chromium and chromium-driver, driven by Selenium). Screenshots go to $AUTORESEARCH_ARTIFACTS
(default: the test's tmp folder)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import git
import httpx
import pytest
import uvicorn

from server.dashboard import build_app
from server.lab import Lab

AGENTS = ("alice", "bob", "carol")
HOSTILE = "<img src=x onerror=alert(1)> & <b>bold</b>"


def seed_lab(lab: Lab) -> dict[str, str]:
    """3 agents x 20 finished runs in the ledger (some kept, some crashed or cancelled); alice's
    7th run is a real commit on the lab's repo whose diff the run page must show."""
    repo = git.Repo(lab.root / "repo")
    main = repo.head.commit
    text = (main.tree / "train.py").data_stream.read().decode()
    worktree = lab.root / "seed-worktree"
    repo.git.worktree("add", "--detach", str(worktree), main.hexsha)
    (worktree / "train.py").write_text(text + "\n# alice: a wider model " + HOSTILE + "\n")
    wt = git.Repo(worktree)
    wt.git.add("train.py")
    wt.git.commit("-m", "alice: wider\n\nRun-Id: alice-0007\nVal-BPB: 2.560000\nStatus: discard")
    commit = wt.head.commit.hexsha
    ids = {}
    for k, agent in enumerate(AGENTS):
        best = 2.5
        for i in range(1, 21):
            status = "crash" if i % 9 == 0 else "cancelled" if i == 5 else "ok"
            val = None if status != "ok" else round(2.6 - 0.01 * i - 0.05 * k + (0.03 if i % 3 else 0.0), 6)
            kept = val is not None and val < best
            best = val if kept else best
            desc = f"{agent} idea {i}" + (f" {HOSTILE}" if i == 7 else "")
            rec = lab.ledger.create_run(agent, desc, main.hexsha)
            is_diff_run = agent == "alice" and i == 7
            lab.ledger.finish(rec.run_id, status, val_bpb=val, kept=kept, decision=(
                "keep" if kept else "discard" if val is not None else "crash" if status == "crash" else None),
                commit=commit if is_diff_run else None)
            ids[f"{agent}-{i}"] = rec.run_id
            if is_diff_run:
                run_dir = lab.run_dir(rec.run_id)
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "log.txt").write_text("step 00001 | loss 6.1\n" + HOSTILE + "\nthe end of the log\n")
    return ids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(lab):
    ids = seed_lab(lab)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(lab.root), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the dashboard did not start"
        time.sleep(0.05)
    yield lab, ids, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def lab_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.endswith("-shm")):
        h.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def test_the_dashboard_answers_escapes_and_refuses_what_is_not_there(served):
    lab, ids, url = served
    before = lab_digest(lab.root)
    state = httpx.get(f"{url}/api/lab").json()
    assert [b["agent"] for b in state["leaderboard"]] == ["carol", "bob", "alice"]  # best first
    alice = next(b for b in state["leaderboard"] if b["agent"] == "alice")
    assert alice["runs"] == 20 and alice["keeps"] == sum(r["kept"] for r in state["runs"] if r["agent"] == "alice")
    assert alice["improvement"] == pytest.approx(alice["baseline"] - alice["best"])
    assert max(p["x"] for p in state["series"]["alice"]) == 19  # the cancelled run takes no position
    page = httpx.get(f"{url}/runs/{ids['alice-7']}").text
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page  # escaped, every time
    assert "a wider model" in page and "Run-Id: alice-0007" in page and "the end of the log" in page
    assert "<th>val_bpb</th><td>2.56</td>" in page and "<th>gpu</th>" not in page  # no rows for unmeasured figures
    for bad in ("/runs/nobody-0001", "/runs/..%2F..%2Fledger.sqlite", "/static/..%2Fdashboard.py",
                "/static/../../ledger.sqlite", "/runs/%2e%2e", "/nothing/here", "/static/dashboard.py"):
        r = httpx.get(url + bad)
        assert r.status_code == 404 and "Not found" in r.text, bad
        assert "CREATE TABLE" not in r.text and "import" not in r.text, bad
    assert lab_digest(lab.root) == before  # the dashboard wrote nothing to the lab


def test_a_lab_of_1000_runs_is_served(served):
    lab, _, url = served
    for i in range(940):
        rec = lab.ledger.create_run("dave", f"idea {i}", None)
        lab.ledger.finish(rec.run_id, "ok", val_bpb=2.0 + (i % 17) / 100, kept=i % 50 == 0, decision="discard")
    for path in ("/", "/api/lab", "/runs/dave-0500"):  # how fast: python -m server.bench dashboard
        assert httpx.get(url + path).status_code == 200


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_path, "needs Debian's chromium and chromium-driver (.ci/run installs them)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1600",
                "--disable-dev-shm-usage", "--no-first-run", "--disable-background-networking"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    yield driver
    driver.quit()


def wait_for(check, timeout=15.0, what="the page"):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_the_page_in_a_real_browser_shows_the_lab_and_follows_it(served, browser, tmp_path):
    from selenium.webdriver.common.by import By

    lab, ids, url = served
    shots = Path(os.environ.get("AUTORESEARCH_ARTIFACTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    browser.get(url + "/")
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#runs tr")) > 50, what="the runs table")
    board = browser.find_element(By.ID, "board").text
    state = httpx.get(f"{url}/api/lab").json()
    for b in state["leaderboard"]:
        assert b["agent"] in board and f"{b['best']:.4f}" in board and f"{b['keeps']} / {b['runs']}" in board
    assert browser.find_elements(By.CSS_SELECTOR, "#chart canvas"), "no chart drawn"
    assert "<img" not in browser.find_element(By.ID, "runs").get_attribute("innerHTML").replace("&lt;img", "")
    browser.save_screenshot(str(shots / "dashboard-lab.png"))

    rec = lab.ledger.create_run("bob", "a run that finishes while the page is open", None)
    lab.ledger.finish(rec.run_id, "ok", val_bpb=1.2345, kept=True, decision="keep")
    wait_for(lambda: "1.2345" in browser.find_element(By.ID, "board").text, what="the new best on the board")
    assert rec.run_id in browser.find_element(By.ID, "runs").text

    from selenium.webdriver.support.ui import Select
    Select(browser.find_element(By.ID, "agent")).select_by_value("carol")
    rows = browser.find_elements(By.CSS_SELECTOR, "#runs tr")[1:]
    assert len(rows) == 20 and all("carol" in r.text for r in rows)

    browser.get(f"{url}/runs/{ids['alice-7']}")
    added = browser.find_elements(By.CSS_SELECTOR, "#diff .add")
    assert any("a wider model" in a.text for a in added), "the diff's added line is not highlighted"
    assert HOSTILE in browser.find_element(By.ID, "diff").text  # shown as text, not run as HTML
    browser.save_screenshot(str(shots / "dashboard-run.png"))
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors
