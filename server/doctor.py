"""`autoresearch-mcp doctor`: check every piece a lab needs and print the exact command that fixes
each missing one. Exit status 1 when something required is missing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from sandbox.config import DockerBackendConfig
from sandbox.nvidia import choose_mode


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def _docker(config: DockerBackendConfig, needs_gpu: bool = False) -> list[Check]:
    try:
        import docker  # noqa: PLC0415

        client = docker.from_env()
        client.ping()
        info = client.info()
    except Exception as e:  # noqa: BLE001 - any failure means "not reachable"
        return [Check("docker engine", False, f"not reachable: {e}",
                      "start it: `sudo systemctl start docker` (or `sudo dockerd &`); install: docker.io / docker-ce")]
    checks = [Check("docker engine", True, f"version {info.get('ServerVersion', '?')}")]
    mode, why = choose_mode(info.get("Runtimes", {}), config.nvidia_dev_dir, config.nvidia_proc_dir, config.gpu_mode)
    checks.append(Check("GPU access", mode is not None, f"{mode}: {why}" if mode else why,
                        "install the NVIDIA driver; then either nothing more (the devices mode) or the NVIDIA "
                        "Container Toolkit and `sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl "
                        "restart docker`", required=needs_gpu))
    security = info.get("SecurityOptions") or []
    seccomp = next((opt for opt in security if "name=seccomp" in opt), None)
    checks.append(Check("seccomp", seccomp is not None and "profile=unconfined" not in seccomp,
                        seccomp or "the engine applies no seccomp profile: runs go without a syscall filter "
                        f"(security options: {', '.join(security) or 'none'})",
                        "a kernel with CONFIG_SECCOMP and an engine built with seccomp (Debian's docker.io is)",
                        required=False))
    image = config.image
    if image:
        try:
            client.images.get(image)
            checks.append(Check("sandbox image", True, image))
        except Exception:  # noqa: BLE001
            flavor = "gpu" if image.endswith(":gpu") else "cpu"
            offline = (" (a host that reaches no registry or index: add --host-base --wheelhouse DIR, with the "
                       "Python that has torch)") if flavor == "gpu" else ""
            checks.append(Check("sandbox image", False, f"{image} is not on this host",
                                f"autoresearch-mcp build-image --flavor {flavor} --tag {image}{offline}"))
    return checks


def _gpus(needed: bool) -> Check:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return Check("GPUs", False, "nvidia-smi not found", "install the NVIDIA driver (GPU hosts only)", required=needed)
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return Check("GPUs", False, f"nvidia-smi failed: {e}", "check the NVIDIA driver", required=needed)
    lines = [ln for ln in out.splitlines() if ln.startswith("GPU ")]
    return Check("GPUs", bool(lines), "; ".join(lines) or "none listed", "check the NVIDIA driver", required=needed)


def _slots(lab) -> Check:  # noqa: ANN001 - a Lab
    """The host-wide run slots this lab leases from, and who holds them now."""
    try:
        from sandbox.gpus import SlotPool  # noqa: PLC0415

        pool = SlotPool(lab.config.pool)
        held = {slot: h for slot, h in pool.holders().items() if h}
    except Exception as e:  # noqa: BLE001
        return Check("run slots", False, str(e), f"fix `pool.state_dir` in {lab.root / 'lab.json'}")
    names = ", ".join(s for s, _ in pool.slots)
    busy = "; busy: " + ", ".join(f"{slot} ({h.get('holder', '?')})" for slot, h in held.items()) if held else ""
    needs_gpu = lab.program().device == "cuda"
    ok = not needs_gpu or any(gpu is not None for _, gpu in pool.slots)
    return Check("run slots", ok, f"{names} under {pool.root}{busy}",
                 "a cuda program needs GPU slots: check nvidia-smi, or list them in lab.json's pool.gpus")


def _cluster(lab) -> list[Check]:  # noqa: ANN001 - a Lab
    """A cluster lab: the cluster reachable, and each node's slots, GPUs, backend (engine, image) and
    copy of the lab's data, checked on the node itself."""
    from sandbox import cluster  # noqa: PLC0415

    config = lab.config.cluster
    try:
        cluster.connect(config)
        nodes = cluster.nodes()
    except Exception as e:  # noqa: BLE001
        return [Check("ray cluster", False, str(e), f"start it (`ray start --head` there), or fix cluster.address in "
                      f"{lab.root / 'lab.json'}")]
    alive = [n for n in nodes if n["Alive"]]
    dead = [n.get("NodeName") or n["NodeID"][:12] for n in nodes if not n["Alive"]]
    checks = [Check("ray cluster", bool(alive), f"{config.address}: {len(alive)} node(s) alive"
                    + (f"; lost: {', '.join(dead)}" if dead else ""), "start nodes with `ray start --address`")]
    data_dir = str(config.data_dir or lab.data_dir.resolve())
    expected = cluster.data_digests(lab.data_dir.resolve(), lab.root / "logs" / "data-digests.json")
    reports = cluster.on_each_node(cluster.node_report, lab.config.backend.model_dump(mode="json"), data_dir,
                                   expected, str(config.node_root))
    slots_total = 0
    for n in alive:
        name = n.get("NodeName") or n["NodeID"][:12]
        res = n["Resources"]
        slots, gpus = int(res.get(config.slot_resource, 0)), int(res.get("GPU", 0))
        slots_total += slots
        report = reports.get(name)
        what = f"{n['NodeManagerAddress']}, {slots} slot(s), {gpus} GPU(s)"
        if not isinstance(report, dict):
            checks.append(Check(f"node {name}", False, f"{what}; could not check it: {report}",
                                "install autoresearch-mcp[ray] on the node, with the same Python"))
            continue
        problems = [p for p in (report["backend"], report["data"]) if p]
        checks.append(Check(f"node {name}", not problems, what + ("; " + "; ".join(problems) if problems else
                            f"; {lab.config.backend.type} backend ready, the lab's data present"),
                            "on that node: build the image (autoresearch-mcp build-image) and put the lab's "
                            f"prepared data in {data_dir}", required=bool(slots)))
    checks.append(Check("run slots", slots_total > 0, f"{slots_total} on the cluster ({config.slot_resource})",
                        f"start nodes with --resources '{{\"{config.slot_resource}\": N}}'"))
    return checks


def doctor(root: Path) -> int:
    from server.lab import Lab  # noqa: PLC0415

    checks: list[Check] = []
    lab = None
    if (root / "lab.json").is_file():
        lab = Lab(root)
        where = f", on the Ray cluster at {lab.config.cluster.address}" if lab.config.cluster else ""
        checks.append(Check("lab", True, f"{root} (program {lab.config.program}, backend {lab.config.backend.type}{where})"))
    else:
        checks.append(Check("lab", False, f"{root} is not a lab",
                            f"autoresearch-mcp prepare tiny-stdlib --lab {root}   (or gpt-climbmix on a GPU host)"))
    try:
        docker_cfg = lab.config.backend if lab and isinstance(lab.config.backend, DockerBackendConfig) else None
        on_cluster = lab is not None and lab.config.cluster is not None
        if (lab is None or docker_cfg is not None) and not on_cluster:  # a cluster's nodes are checked there
            needs_gpu = lab is not None and lab.program().device == "cuda"
            config = docker_cfg or DockerBackendConfig()
            checks += _docker(config, needs_gpu)
        if lab is not None:
            meta = lab.data_dir / "meta.json"
            checks.append(Check("prepared data", meta.is_file(), str(lab.data_dir),
                                f"autoresearch-mcp prepare {lab.config.program} --lab {root}"))
            if on_cluster:
                checks += _cluster(lab)
            else:
                checks.append(_gpus(needed=lab.program().device == "cuda"))
                checks.append(_slots(lab))
            info = lab.noise_info()
            checks.append(Check("noise", info.sigma is not None,
                                f"σ = {info.sigma:.6f} over {len(info.calibration_runs)} seeds" if info.sigma is not None
                                else "not measured: " + info.rule, f"autoresearch-mcp calibrate --lab {root}",
                                required=False))
        else:
            checks.append(_gpus(needed=False))
    finally:
        if lab is not None:
            lab.close()
    bad = 0
    for c in checks:
        mark = "ok " if c.ok else ("MISSING" if c.required else "absent ")
        print(f"[{mark}] {c.name}: {c.detail}")
        if not c.ok:
            print(f"          fix: {c.fix}")
            bad += c.required
    print("all required pieces are in place" if not bad else f"{bad} required piece(s) missing", file=sys.stderr)
    return 1 if bad else 0
