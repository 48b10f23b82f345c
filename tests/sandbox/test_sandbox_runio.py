"""The capped log, the progress follower and the output readers, on plain files."""

from __future__ import annotations

import json
import os

from sandbox.runio import CappedLog, ProgressFollower, copy_output, disk_usage, read_output


def test_small_log_is_kept_whole(tmp_path):
    log = CappedLog(tmp_path / "log", 1000)
    for i in range(10):
        log.write(f"line {i}\n".encode())
    log.close()
    assert (tmp_path / "log").read_text() == "".join(f"line {i}\n" for i in range(10))
    assert not log.truncated
    assert log.tail_text().endswith("line 9\n")


def test_big_log_keeps_head_and_tail_with_a_marker(tmp_path):
    log = CappedLog(tmp_path / "log", 100)
    data = b"".join(b"%04d\n" % i for i in range(1000))  # 5000 bytes
    for k in range(0, len(data), 7):  # odd chunk sizes cross the head/tail boundary
        log.write(data[k:k + 7])
    log.close()
    text = (tmp_path / "log").read_bytes()
    head, rest = text[:50], text[50:]
    assert head == data[:50]
    assert rest.endswith(data[-50:])
    assert b"4900 bytes of log omitted" in rest
    assert log.truncated and log.total == 5000
    assert log.tail_text(10) == data[-10:].decode()


def test_log_memory_stays_bounded(tmp_path):
    log = CappedLog(tmp_path / "log", 1 << 12)
    for _ in range(10_000):
        log.write(b"y" * 1000)
        assert log._tail_len <= (1 << 11) + 1000
    log.close()


def test_progress_follower_parses_whole_lines_only_and_skips_garbage(tmp_path):
    path = tmp_path / "progress.jsonl"
    seen: list[dict] = []
    f = ProgressFollower(path, seen.append)
    f.drain()  # no file yet: nothing, no error
    with open(path, "w") as out:
        out.write('{"step": 1}\n{"step": 2')
    f.drain()
    assert seen == [{"step": 1}]
    with open(path, "a") as out:
        out.write('}\nnot json\n[1]\n' + "x" * 70_000 + '\n{"step": 3}\n')
    f.drain()
    assert seen == [{"step": 1}, {"step": 2}, {"step": 3}]


def test_progress_callback_errors_do_not_propagate(tmp_path):
    path = tmp_path / "progress.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n')
    calls = []

    def boom(item):
        calls.append(item)
        raise RuntimeError("callback bug")

    ProgressFollower(path, boom).drain()
    assert len(calls) == 2


def test_read_output_and_copy_output_refuse_links_and_caps(tmp_path):
    assert read_output(tmp_path, "result.json") == (None, "no result.json")
    (tmp_path / "result.json").write_text('{"status": "ok"}')
    assert read_output(tmp_path, "result.json") == (b'{"status": "ok"}', "")
    (tmp_path / "result.json").write_bytes(b" " * (2 << 20))
    assert "larger than" in read_output(tmp_path, "result.json")[1]
    (tmp_path / "secret").write_text("host file")
    (tmp_path / "link.json").symlink_to(tmp_path / "secret")
    assert "not a regular file" in read_output(tmp_path, "link.json")[1]
    src, dest = tmp_path / "model", tmp_path / "copy"
    src.mkdir()
    (src / "a").write_bytes(b"x" * 100)
    (src / "b").symlink_to(tmp_path / "secret")  # the run may plant a link to a host file
    assert "b is missing or not a regular file" == copy_output(src, dest, ("a", "b"), 1000)
    (src / "b").unlink()
    (src / "b").write_bytes(b"y" * 100)
    assert copy_output(src, dest, ("a", "b"), 1000) == "" and (dest / "b").read_bytes() == b"y" * 100
    assert "larger than" in copy_output(src, tmp_path / "c2", ("a", "b"), 150)


def test_disk_usage_counts_each_inode_once_and_never_follows_links(tmp_path):
    inside, outside = tmp_path / "run", tmp_path / "host"
    inside.mkdir()
    outside.mkdir()
    (outside / "big.bin").write_bytes(os.urandom(4 << 20))
    (inside / "a.bin").write_bytes(os.urandom(1 << 20))
    os.link(inside / "a.bin", inside / "a-again.bin")  # one file, two names
    (inside / "link").symlink_to(outside)  # a link to a big host folder is not the run's usage
    (inside / "sub").mkdir()
    (inside / "sub" / "b.bin").write_bytes(os.urandom(1 << 20))
    used = disk_usage([inside])
    assert 2 << 20 <= used < 3 << 20, used
    assert disk_usage([tmp_path / "missing"]) == 0
    for i in range(1000):  # empty files take no blocks, but each costs an inode
        (inside / "sub" / f"empty{i}").touch()
    assert disk_usage([inside]) - used >= 1000 * 4096
