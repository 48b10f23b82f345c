"""The whole suite: pytest-xdist hands out test files in the order they are collected (`--dist
loadfile --no-loadscope-reorder`), so the slowest files are put first; started last, the longest one
would end last and alone (issue 33: `make test` within 15 minutes on 2 cores). The rest keep their order."""

from __future__ import annotations

import pytest

SLOW_FIRST = (  # the longest files first, from .ci/run's --durations (seconds on the 2-core CI box, 3 workers)
    "tests/server/test_server_cluster.py",  # 730
    "tests/server/test_server_bench.py",  # 430
    "tests/trainer/test_bench.py",  # 390
    "tests/server/test_server_e2e_stdio.py",  # 330
    "tests/sandbox/test_sandbox_image.py",  # 150
    "tests/server/test_server_sealed.py",
    "tests/server/test_server_runs_lifecycle.py",
    "tests/server/test_server_noise.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))  # sort is stable
