#!/usr/bin/env bash
# Debian's Docker engine for a GPU host that has none and no network (issue 24): packed on a CPU box
# from Debian's own packages (docker.io, containerd, runc, tini) with the shared libraries they
# need, unpacked and started on the GPU host as root, with its own data root and socket, no
# bridge and no iptables (runs have no network anyway).
#   pack ARCHIVE     on the CPU box (apt-get works there): ARCHIVE, an xz tarball of ~47 MB
#   start ARCHIVE    on the GPU host: unpack into /tmp/engine, start dockerd, wait until it answers;
#                    prints the DOCKER_HOST to export
#   stop             on the GPU host: stop that dockerd
set -euo pipefail
ROOT=/tmp/engine
case ${1:-} in
  pack)
    out=$(realpath -m "${2:?usage: $0 pack ARCHIVE}") work=$(mktemp -d)
    (cd "$work" && apt-get download docker.io containerd runc tini >/dev/null
     for d in *.deb; do dpkg -x "$d" x; done
     mkdir -p bin lib
     cp x/usr/bin/containerd x/usr/bin/containerd-shim-runc-v2 x/usr/bin/docker x/usr/sbin/dockerd \
        x/usr/sbin/runc x/usr/sbin/docker-proxy bin/
     cp x/usr/bin/tini-static bin/docker-init
     # the libraries the binaries link beyond glibc (the GPU host's own glibc serves the rest)
     for b in bin/*; do ldd "$b" 2>/dev/null | awk '/=>/ {print $3}' || true; done | sort -u \
       | { grep -vE 'libc\.so|libpthread|libdl\.so|libm\.so|librt\.so|ld-linux' || true; } | xargs -r -I{} cp -L {} lib/
     tar -cf - bin lib | xz -T0 -6 > "$out")
    rm -rf "$work"; ls -l "$out";;
  start)
    archive=$(realpath "${2:?usage: $0 start ARCHIVE}")
    mkdir -p "$ROOT" && tar -C "$ROOT" -xJf "$archive"
    export PATH=$ROOT/bin:$PATH LD_LIBRARY_PATH=$ROOT/lib DOCKER_HOST=unix://$ROOT/docker.sock
    setsid dockerd --iptables=false --ip-forward=false --ip-masq=false --bridge=none --storage-driver=overlay2 \
      --data-root "$ROOT/root" --exec-root "$ROOT/exec" -H "$DOCKER_HOST" --pidfile "$ROOT/dockerd.pid" \
      > "$ROOT/dockerd.log" 2>&1 < /dev/null &
    for _ in $(seq 60); do docker info > /dev/null 2>&1 && break; sleep 1; done
    docker info --format 'engine {{.ServerVersion}}, {{.Driver}}, cgroup {{.CgroupVersion}}, security: {{.SecurityOptions}}' \
      || { tail -40 "$ROOT/dockerd.log"; exit 1; }
    echo "export DOCKER_HOST=$DOCKER_HOST PATH=$ROOT/bin:\$PATH LD_LIBRARY_PATH=$ROOT/lib";;
  stop) kill "$(cat "$ROOT/dockerd.pid")";;
  *) echo "usage: $0 pack ARCHIVE | start ARCHIVE | stop" >&2; exit 2;;
esac
