"""Experiments on a Ray cluster (issue 21): Ray's resource accounting is the lease, and the node Ray
picks runs the lab's own backend (the hardened container, or a local process) there.

A lease is an actor (NodeSide) that needs one slot resource (and one GPU on GPU clusters, plus any
custom resource the lab requires): Ray grants it when a node has the resources free, and the slot is
free again when the actor ends, however it ends (the supervisor that owns it exits or dies, the node
dies). Both phases of a run go through the one lease, so they run on one node and one GPU. Each phase
travels as its RunSpec plus the files it names that only the server's host has (train.py, the
program, the score phase's export, the stream header); the prepared data is found on the node (the
lab's data folder at the same path, or `data_dir`), checked by hash when the lease starts. Progress
lines and the log stream back as they arrive; the output folder and the final log come back at the
end. The ledger, git and the worktrees never leave the server's host.

Needs the `ray` extra (`pip install 'autoresearch-mcp[ray]'`) on the server's host and on every node,
with this package installed there too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from sandbox.base import Backend, ProgressCallback, finish_despite_cancel
from sandbox.config import DEFAULT_STATE_DIR, BackendConfig
from sandbox.errors import LeaseError, SandboxError, SpecError
from sandbox.gpus import Lease, uuid_of
from sandbox.models import Limits, Mount, Reaped, RunOutcome, RunSpec
from sandbox.runio import open_regular

LEASE_PREFIX = "autoresearch-lease-"  # + the request's time in ns (zero-padded) + the holder: queue order
LOG_POLL_S = 0.5
LOG_CHUNK = 1 << 20
MAX_OUTPUT_BYTES = 8 << 30  # the output folder that comes back (the train phase's export is the bulk)
CANCEL_WAIT_S = 30.0


class ClusterUnavailableError(SandboxError, ConnectionError):
    """The Ray cluster cannot be reached, or has nothing to run on."""


class ClusterConfig(BaseModel):
    """Where a lab's experiments run when they run on a Ray cluster (lab.json `cluster`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    address: str = Field(description="The cluster's address, host:port, as `ray start --head` prints it.")
    namespace: str = Field(default="autoresearch", description="Ray namespace of the lease actors.")
    slot_resource: str = Field(default="autoresearch_slot", description="The custom resource a run needs one "
                               "of: start each node with `--resources '{\"autoresearch_slot\": N}'`, N runs at once.")
    gpus: bool = Field(default=False, description="Each run also needs one GPU (Ray's num_gpus), whose id the "
                       "node's backend passes to the run.")
    require: dict[str, float] = Field(default_factory=dict, description="Further custom resources a run needs, "
                                      "e.g. {\"H200\": 1} to pick a GPU type (start those nodes with it).")
    data_dir: Path | None = Field(default=None, description="Where every node holds the lab's prepared data; "
                                  "None: the lab's data folder at the same path (a shared filesystem).")
    node_root: Path = Field(default=DEFAULT_STATE_DIR / "ray", description="Each node's folder for runs in "
                            "flight and the agents' compile caches.")
    connect_timeout_s: float = Field(default=20.0, gt=0)
    poll_s: float = Field(default=0.2, gt=0, description="How often a waiting lease looks at the queue.")


# -- digests of the prepared data ------------------------------------------------------------------

def data_digests(folder: Path, cache: Path | None = None) -> dict[str, str]:
    """sha256 of every regular file directly in `folder` (what a run mounts), by name. With `cache`,
    a file whose size and mtime are unchanged is not read again."""
    known: dict[str, Any] = {}
    if cache is not None:
        try:
            known = json.loads(cache.read_text())
        except (OSError, ValueError):
            known = {}
    out, fresh = {}, {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not path.is_file() or path.is_symlink():
            continue
        st = path.stat()
        key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        digest = known.get(key)
        if digest is None:
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        out[path.name], fresh[key] = digest, digest
    if cache is not None and fresh != known:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
        tmp.write_text(json.dumps(fresh))
        os.replace(tmp, cache)
    return out


def data_problem(expected: dict[str, str], found: dict[str, str], where: Path) -> str | None:
    """Why the data found on a node is not the lab's, or None when it is."""
    if not found:
        return f"no prepared data in {where}"
    missing = sorted(set(expected) - set(found))
    differ = sorted(n for n in expected if n in found and found[n] != expected[n])
    if missing or differ:
        return (f"the prepared data in {where} is not the lab's: " + "; ".join(
            part for part in (f"missing {', '.join(missing)}" if missing else "",
                              f"different content in {', '.join(differ)}" if differ else "") if part))
    return None


# -- the node's side ---------------------------------------------------------------------------------

class NodeSide:
    """One lease on the node Ray picked (a Ray actor): runs the phases' specs on the node's backend.

    Created with the lab's backend config; reaps what dead owners left on this node first (a node
    that comes back after a crash reaps its orphans when it next runs something), then checks the
    node's copy of the data.
    """

    def __init__(self, backend: dict, node_root: str, data_dir: str, expected: dict[str, str],
                 slot_resource: str) -> None:
        import ray  # noqa: PLC0415

        from sandbox.config import make_backend  # noqa: PLC0415

        self.backend = make_backend(TypeAdapter(BackendConfig).validate_python(backend))
        self.root = Path(node_root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_dir = Path(data_dir)
        self.reaped = [r.model_dump(mode="json") for r in self.backend.reap()]
        self.problem = data_problem(expected, data_digests(self.data_dir, self.root / "data-digests.json"),
                                    self.data_dir)
        ctx = ray.get_runtime_context()
        self.node_id = ctx.get_node_id()
        node = next((n for n in ray.nodes() if n["NodeID"] == self.node_id), {})
        self.node_name = node.get("NodeName") or node.get("NodeManagerAddress") or self.node_id[:12]
        self.address = node.get("NodeManagerAddress", "")
        slots = max(1, int(node.get("Resources", {}).get(slot_resource, 1)))
        gpus = [str(g) for g in ray.get_gpu_ids()]
        self.gpu = gpus[0] if gpus else None
        self.gpu_uuid = uuid_of(self.gpu)
        host_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        cores = len(os.sched_getaffinity(0))
        self.limits = Limits(memory_gb=min(Limits().memory_gb, round(0.85 * host_gb / slots, 1)),
                             cpus=None if slots <= 1 else round(cores / slots, 2))
        self.tasks: dict[str, asyncio.Task] = {}

    def info(self) -> dict:
        slot = f"{self.node_name}/gpu-{self.gpu}" if self.gpu is not None else f"{self.node_name}/slot"
        return {"node_id": self.node_id, "node_name": self.node_name, "address": self.address, "gpu": self.gpu,
                "gpu_uuid": self.gpu_uuid,
                "slot": slot, "pid": os.getpid(), "problem": self.problem, "reaped": self.reaped,
                "limits": self.limits.model_dump(mode="json")}

    async def cancel(self, run_id: str) -> bool:
        task = self.tasks.get(run_id)
        if task is None:
            return False
        task.cancel()
        return True

    async def run(self, packed: dict):
        """Yields ("progress", dict) and ("log", bytes) as they come, then one of ("outcome",
        {outcome, outputs, log}), ("cancelled", None) once the run is gone, or ("spec-error", text)."""
        spec = RunSpec.model_validate(packed["spec"])
        folder = self.root / "runs" / spec.run_id
        shutil.rmtree(folder, ignore_errors=True)
        try:
            local = self._localise(spec, packed, folder)
        except (OSError, ValueError) as e:
            yield ("spec-error", f"on node {self.node_name}: {e}")
            return
        queue: asyncio.Queue = asyncio.Queue()
        task = asyncio.ensure_future(self.backend.run(local, lambda p: queue.put_nowait(("progress", p))))
        self.tasks[spec.run_id] = task
        follow = asyncio.ensure_future(self._follow(local.log_path, queue))
        try:
            while not task.done() or not queue.empty():
                get = asyncio.ensure_future(queue.get())
                await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
                if get.done():
                    yield get.result()
                else:
                    get.cancel()
            follow.cancel()
            try:
                outcome = task.result()
            except asyncio.CancelledError:
                yield ("cancelled", None)
                return
            except SpecError as e:
                yield ("spec-error", str(e))
                return
            yield ("outcome", {"outcome": outcome.model_dump(mode="json"), "outputs": _read_outputs(local.output_dir),
                               "log": _read_file(local.log_path)})
        finally:
            follow.cancel()
            if not task.done():  # the caller went away: the run goes too
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            self.tasks.pop(spec.run_id, None)
            shutil.rmtree(folder, ignore_errors=True)

    def _localise(self, spec: RunSpec, packed: dict, folder: Path) -> RunSpec:
        """The spec with the server's paths replaced by this node's: shipped files written under the
        run's folder, the data from the node's data folder, writable mounts kept per agent on the node."""
        host_data = Path(packed["data_dir"])
        files: dict[str, dict[str, bytes]] = packed["files"]
        inputs = folder / "in"

        def place(source: Path, n: str) -> Path:
            if source.parent == host_data:
                return self.data_dir / source.name
            shipped = files.get(str(source))
            if shipped is None:
                raise ValueError(f"{source} was neither shipped nor part of the data")
            if "" in shipped:  # a single file
                dest = inputs / n / source.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(shipped[""])
                return dest
            dest = inputs / n / source.name
            for rel, data in shipped.items():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                (dest / rel).write_bytes(data)
            dest.mkdir(parents=True, exist_ok=True)
            return dest

        mounts = []
        for i, m in enumerate(spec.mounts):
            if m.read_only:
                source = place(m.source, f"m{i}")
            else:
                source = self.root / "rw" / hashlib.sha256(str(m.source).encode()).hexdigest()[:20]
                source.mkdir(parents=True, exist_ok=True)
                source.chmod(0o777)  # the sandbox user writes its compile cache here
            mounts.append(Mount(source=source, target=m.target, read_only=m.read_only))
        stdin = [place(p, f"s{i}") for i, p in enumerate(spec.stdin)]
        out = folder / "out"
        out.mkdir(parents=True)
        out.chmod(0o777)
        for p in [folder, inputs, *inputs.rglob("*")] if inputs.exists() else [folder]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        return spec.model_copy(update={"mounts": mounts, "stdin": stdin, "output_dir": out,
                                       "log_path": folder / "log.txt"})

    async def _follow(self, path: Path, queue: asyncio.Queue) -> None:
        offset = 0
        while True:
            await asyncio.sleep(LOG_POLL_S)
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if size < offset:  # the log was capped (its middle dropped): the final copy comes at the end
                offset = size
            if size > offset:
                with open(path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read(min(size - offset, LOG_CHUNK))
                offset += len(chunk)
                queue.put_nowait(("log", chunk))


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _read_outputs(out: Path) -> dict[str, bytes]:
    """The run's output folder as {relative path: bytes}: regular files only (a symlink the run
    planted there must not make the node read one of its own files), at most MAX_OUTPUT_BYTES."""
    files, total = {}, 0
    for dirpath, _dirs, names in os.walk(out):
        for name in names:
            path = Path(dirpath) / name
            f = open_regular(path)
            if f is None:
                continue
            with f:
                data = f.read(MAX_OUTPUT_BYTES - total + 1)
            total += len(data)
            if total > MAX_OUTPUT_BYTES:
                return files
            files[str(path.relative_to(out))] = data
    return files


# -- the server's side -------------------------------------------------------------------------------

def connect(config: ClusterConfig) -> None:
    """Join the cluster as a driver (once per process); ClusterUnavailableError says why not."""
    try:
        import ray  # noqa: PLC0415
    except ImportError as e:
        raise ClusterUnavailableError("this lab runs on a Ray cluster, but ray is not installed here: "
                                      "pip install 'autoresearch-mcp[ray]'") from e
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import logging  # noqa: PLC0415
    import threading  # noqa: PLC0415

    failed: list[BaseException] = []

    def init() -> None:  # on a daemon thread: ray.init to a dead address retries for minutes
        try:
            ray.init(address=config.address, namespace=config.namespace, logging_level=logging.ERROR,
                     log_to_driver=False)
        except BaseException as e:  # noqa: BLE001 - ray raises ConnectionError, RuntimeError, ...
            failed.append(e)

    thread = threading.Thread(target=init, name="ray-connect", daemon=True)
    thread.start()
    thread.join(config.connect_timeout_s)
    if thread.is_alive():
        raise ClusterUnavailableError(f"the Ray cluster at {config.address} did not answer within "
                                      f"{config.connect_timeout_s:g} s; is `ray start --head` running there?")
    if failed:
        e = failed[0]
        raise ClusterUnavailableError(f"cannot reach the Ray cluster at {config.address}: {type(e).__name__}: "
                                      f"{str(e)[:300]}")


def nodes() -> list[dict]:
    import ray  # noqa: PLC0415

    return ray.nodes()


def _ship(path: Path) -> dict[str, bytes]:
    if path.is_dir():
        return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    return {"": path.read_bytes()}


def pack(spec: RunSpec, data_dir: Path) -> dict:
    """What travels with a phase: its spec and the files of the server's host it names, other than
    the prepared data (found on the node) and writable mounts (kept on the node)."""
    files = {}
    for m in spec.mounts:
        if m.read_only and m.source.parent != data_dir:
            files[str(m.source)] = _ship(m.source)
    for p in spec.stdin:
        if p.parent != data_dir:
            files[str(p)] = _ship(p)
    return {"spec": spec.model_dump(mode="json"), "files": files, "data_dir": str(data_dir)}


class RemoteRunner(Backend):
    """Runs specs on one lease's node (Lease.runner of a cluster lease)."""

    name = "ray"

    def __init__(self, actor: Any, info: dict, data_dir: Path) -> None:
        self.actor, self.info, self.data_dir = actor, info, data_dir

    @property
    def node(self) -> str:
        return f"{self.info['node_name']} ({self.info['address']}, node id {self.info['node_id'][:12]})"

    async def run(self, spec: RunSpec, on_progress: ProgressCallback | None = None) -> RunOutcome:
        t0 = time.monotonic()
        pump = asyncio.ensure_future(self._pump(spec, on_progress))
        try:
            return await asyncio.shield(pump)
        except asyncio.CancelledError:
            if not pump.done():
                self.actor.cancel.remote(spec.run_id)
                try:
                    await finish_despite_cancel(asyncio.ensure_future(asyncio.wait_for(pump, CANCEL_WAIT_S)))
                except (TimeoutError, Exception):  # noqa: BLE001 - the lease's end kills the actor anyway
                    pass
            raise
        except SpecError:
            raise
        except Exception as e:  # noqa: BLE001 - the node or the actor died: the sandbox failed
            return RunOutcome(run_id=spec.run_id, status="infra-error", exit_code=None, log_path=spec.log_path,
                              log_tail="", wall_s=round(time.monotonic() - t0, 3),
                              detail=f"the cluster node {self.node} was lost during the run ({self._why(e)})")

    def _why(self, e: Exception) -> str:
        alive = next((n["Alive"] for n in nodes() if n["NodeID"] == self.info["node_id"]), False)
        return ("the node died" if not alive else "its worker died") + f": {type(e).__name__}"

    async def _pump(self, spec: RunSpec, on_progress: ProgressCallback | None) -> RunOutcome:
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(spec.log_path, "wb") as log:
            async for ref in self.actor.run.remote(pack(spec, self.data_dir)):
                kind, value = await ref
                if kind == "progress" and on_progress is not None:
                    on_progress(value)
                elif kind == "log":
                    log.write(value)
                    log.flush()
                elif kind == "spec-error":
                    raise SpecError(value)
                elif kind == "cancelled":
                    raise asyncio.CancelledError
                elif kind == "outcome":
                    log.seek(0)
                    log.truncate()
                    log.write(value["log"])
                    for rel, data in value["outputs"].items():
                        dest = spec.output_dir / rel
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        dest.write_bytes(data)
                    remote = RunOutcome.model_validate(value["outcome"])
                    return remote.model_copy(update={"log_path": spec.log_path})
        raise SandboxError(f"the node {self.node} ended the run without an outcome")

    def reap(self) -> list[Reaped]:
        return []

    def check(self) -> None:
        return None


def _no_slots(config: ClusterConfig) -> str:
    return (f"no node of the Ray cluster at {config.address} offers the slot resource {config.slot_resource!r}; "
            f"start nodes with --resources '{{\"{config.slot_resource}\": N}}'")


class ClusterBackend(Backend):
    """The lab's backend when it runs on a cluster: runs go through leases (RayPool); this one
    checks the cluster and reaps on every node."""

    name = "ray"

    def __init__(self, config: ClusterConfig, backend: BackendConfig) -> None:
        self.config, self.backend_config = config, backend

    async def run(self, spec: RunSpec, on_progress: ProgressCallback | None = None) -> RunOutcome:
        raise SpecError("on a cluster, a run goes through a lease (RayPool.acquire) and its runner")

    def check(self) -> None:
        connect(self.config)
        alive = [n for n in nodes() if n["Alive"]]
        if not any(n["Resources"].get(self.config.slot_resource, 0) >= 1 for n in alive):
            raise ClusterUnavailableError(_no_slots(self.config))

    def reap(self) -> list[Reaped]:
        connect(self.config)
        found = []
        for result in on_each_node(_node_reap, self.backend_config.model_dump(mode="json")).values():
            if isinstance(result, list):
                found += [Reaped.model_validate(r) for r in result]
        return found


def _node_reap(backend: dict) -> list[dict]:
    from sandbox.config import make_backend  # noqa: PLC0415

    return [r.model_dump(mode="json") for r in make_backend(TypeAdapter(BackendConfig).validate_python(backend)).reap()]


def node_report(backend: dict, data_dir: str, expected: dict[str, str], node_root: str) -> dict:
    """On one node, for `doctor`: can the backend run there (engine, image), is the lab's data there."""
    from sandbox.config import make_backend  # noqa: PLC0415

    report: dict[str, Any] = {"cores": os.cpu_count()}
    try:
        make_backend(TypeAdapter(BackendConfig).validate_python(backend)).check()
        report["backend"] = None
    except Exception as e:  # noqa: BLE001 - reported, not raised
        report["backend"] = f"{type(e).__name__}: {e}"
    report["data"] = data_problem(expected, data_digests(Path(data_dir), Path(node_root) / "data-digests.json"),
                                  Path(data_dir))
    return report


def on_each_node(fn: Any, *args: Any, timeout_s: float = 60.0) -> dict[str, Any]:
    """fn(*args) once on every alive node, by node name; an exception's text where it failed."""
    import ray  # noqa: PLC0415
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: PLC0415

    remote = ray.remote(num_cpus=0, max_retries=0)(fn)
    refs = {}
    for n in nodes():
        if n["Alive"]:
            name = n.get("NodeName") or n["NodeID"][:12]
            refs[name] = remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(*args)
    out: dict[str, Any] = {}
    for name, ref in refs.items():
        try:
            out[name] = ray.get(ref, timeout=timeout_s)
        except Exception as e:  # noqa: BLE001
            out[name] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


_NODE_SIDE: Any = None


def _node_side() -> Any:
    """NodeSide as a Ray actor class, made once per process."""
    global _NODE_SIDE
    if _NODE_SIDE is None:
        import ray  # noqa: PLC0415

        _NODE_SIDE = ray.remote(NodeSide)
    return _NODE_SIDE


class RayPool:
    """The lab's run slots on a Ray cluster; `async with pool.acquire(on_position=cb) as lease:`,
    like SlotPool. Waiting is Ray's: the lease actor stays pending until a node has the resources."""

    def __init__(self, config: ClusterConfig, backend: BackendConfig, data_dir: Path, digest_cache: Path) -> None:
        self.config, self.backend = config, backend
        self.data_dir = data_dir.resolve()
        self.node_data = str(config.data_dir or self.data_dir)
        self.digest_cache = digest_cache
        self.slots: list[tuple[str, str | None]] = []  # a cluster's slots are Ray's, not a list here

    def _ahead(self, name: str) -> int:
        """Lease actors of every lab on the cluster still waiting that asked before this one."""
        from ray._private import state  # noqa: PLC0415 - the GCS's actor table; the state API needs a dashboard

        pending = state.actors(actor_state_name="PENDING_CREATION").values()
        return sum(1 for a in pending if (a.get("Name") or "").startswith(LEASE_PREFIX) and a["Name"] < name)

    @asynccontextmanager
    async def acquire(self, on_position: Any = None, holder: str = "") -> AsyncIterator[Lease]:
        import ray  # noqa: PLC0415

        connect(self.config)
        cluster = ray.cluster_resources()
        if cluster.get(self.config.slot_resource, 0) < 1:
            raise LeaseError(_no_slots(self.config))
        expected = await asyncio.to_thread(data_digests, self.data_dir, self.digest_cache)
        t0 = time.monotonic()
        name = f"{LEASE_PREFIX}{time.time_ns():020d}-{holder}"
        actor = _node_side().options(
            name=name, namespace=self.config.namespace, num_cpus=0, num_gpus=1 if self.config.gpus else 0,
            resources={self.config.slot_resource: 1, **self.config.require}, max_restarts=0, max_concurrency=8,
            scheduling_strategy="SPREAD",  # runs spread over the nodes that have a slot free
        ).remote(self.backend.model_dump(mode="json"), str(self.config.node_root), self.node_data, expected,
                 self.config.slot_resource)
        try:
            ready = asyncio.wrap_future(actor.info.remote().future())
            last = -1
            while not ready.done():
                ahead = await asyncio.to_thread(self._ahead, name)
                if ahead != last and on_position is not None:
                    res = on_position(ahead)
                    if asyncio.iscoroutine(res):
                        await res
                last = ahead
                await asyncio.wait({ready}, timeout=self.config.poll_s)
            try:
                info = ready.result()
            except Exception as e:  # noqa: BLE001 - the actor could not start on its node
                raise LeaseError(f"the lease could not start on its cluster node: {type(e).__name__}: "
                                 f"{str(e)[-500:]}") from None
            if info["problem"]:
                raise LeaseError(f"cluster node {info['node_name']} ({info['address']}): {info['problem']}; "
                                 f"prepare the lab's data there, or set the lab's cluster.data_dir to a path every "
                                 f"node shares")
            yield Lease(slot=info["slot"], gpu=info["gpu"], waited_s=time.monotonic() - t0,
                        runner=RemoteRunner(actor, info, self.data_dir), limits=Limits.model_validate(info["limits"]),
                        gpu_uuid=info["gpu_uuid"])
        finally:
            ray.kill(actor, no_restart=True)
