"""RunSpec validation: bad input is refused with a message naming the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from sandbox.config import DockerBackendConfig, LocalBackendConfig
from sandbox.models import Limits, Mount, RunSpec


def spec(**kw) -> RunSpec:
    base = dict(run_id="r1", image="img", command=["python3", "x.py"], output_dir=Path("/o"),
                log_path=Path("/o.log"), deadline_s=10)
    base.update(kw)
    return RunSpec(**base)


@pytest.mark.parametrize(("kw", "message"), [
    ({"run_id": "../etc"}, "run_id"),
    ({"run_id": ""}, "run_id"),
    ({"command": []}, "command"),
    ({"deadline_s": 0}, "deadline_s"),
    ({"output_dir": Path("rel/out")}, "absolute"),
    ({"env": {"BAD-NAME": "1"}}, "not valid"),
    ({"env": {"X": "a\x00b"}}, "NUL"),
    ({"labels": {"autoresearch-mcp.run-id": "spoof"}}, "reserved"),
    ({"mounts": [Mount(source=Path("/a"), target="/d"), Mount(source=Path("/b"), target="/d")]}, "more than once"),
    ({"unknown_field": 1}, "Extra inputs"),
    ({"log_path": Path("/o/log.txt")}, "must not be inside the writable folder"),
    ({"log_path": Path("/c/x/log.txt"), "mounts": [Mount(source=Path("/c"), target="/cache", read_only=False)]},
     "must not be inside the writable folder"),
])
def test_bad_specs_are_refused(kw, message):
    with pytest.raises(ValidationError, match=message):
        spec(**kw)


@pytest.mark.parametrize(("source", "target", "message"), [
    ("relative", "/d", "absolute host path"),
    ("/a", "d", "absolute path"),
    ("/a", "/", "absolute path other than /"),
    ("/a", "/work/../etc", "normalised"),
    ("/a", "/out", "reserved"),
    ("/a", "/out/sub", "reserved"),
])
def test_bad_mounts_are_refused(source, target, message):
    with pytest.raises(ValidationError, match=message):
        Mount(source=Path(source), target=target)


def test_specs_are_frozen_and_limits_have_sane_defaults():
    s = spec()
    with pytest.raises(ValidationError):
        s.run_id = "other"  # type: ignore[misc]
    lim = Limits()
    assert lim.memory_gb > 1 and lim.pids >= 256 and lim.log_cap_bytes >= 1 << 20
    assert s.limits == lim and s.gpu is None and s.env == {}


def test_backend_configs_are_a_discriminated_union():
    from pydantic import TypeAdapter

    from sandbox.config import BackendConfig

    ta = TypeAdapter(BackendConfig)
    assert isinstance(ta.validate_python({"type": "docker", "runtime": "runsc"}), DockerBackendConfig)
    assert isinstance(ta.validate_python({"type": "local"}), LocalBackendConfig)
    with pytest.raises(ValidationError):
        ta.validate_python({"type": "kubernetes"})
    with pytest.raises(ValidationError, match="Extra inputs"):
        ta.validate_python({"type": "docker", "imgae": "typo"})
    with pytest.raises(ValidationError, match="pattern"):
        DockerBackendConfig(user="root")
