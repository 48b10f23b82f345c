#!/usr/bin/env bash
# The Linux source tree of GPU_RUNS.md's larger corpus (CORPUS=linux in gpu_corpus.sh), which the GPU
# host cannot download: packed on a CPU box from Debian's linux-source-6.1, carried over in parts
# (a call carries at most 64 MiB), unpacked on the GPU host into /tmp/big/src.
#   pack DIR [PARTS]   on the CPU box: DIR/linux.tar.xz.00, .01, ... (default 2 parts)
#   stash DIR          on the GPU host, once per call that carries parts: copy them to /tmp/big/parts
#   unpack             on the GPU host, once all parts are there: the tree into /tmp/big/src
# The tree: its .c .S .rst .txt .h under 200 kB, without the generated AMD register headers
# (~755 MB in ~61,500 files).
set -euo pipefail
case ${1:-} in
  pack)
    dir=$(mkdir -p "${2:?usage: $0 pack DIR [PARTS]}" && cd "$2" && pwd) work=$(mktemp -d)
    (cd "$work" && apt-get download linux-source-6.1 >/dev/null
     dpkg-deb --fsys-tarfile linux-source-6.1_*_all.deb | tar -xO --wildcards './usr/src/linux-source-6.1.tar.xz' \
       | tar -xJ
     cd linux-source-6.1
     find . -type f \( -name '*.c' -o -name '*.S' -o -name '*.rst' -o -name '*.txt' -o -name '*.h' \) -size -200k \
       -not -path './drivers/gpu/drm/amd/include/asic_reg/*' | sort > ../list
     tar -cf - -T ../list | xz -9 -T0 > "$work/linux.tar.xz")
    split -n "${3:-2}" -d "$work/linux.tar.xz" "$dir/linux.tar.xz."
    rm -rf "$work"; ls -l "$dir";;
  stash) mkdir -p /tmp/big/parts && cp "${2:?usage: $0 stash DIR}"/linux.tar.xz.* /tmp/big/parts/ && ls -l /tmp/big/parts;;
  unpack)
    mkdir -p /tmp/big/src && cat /tmp/big/parts/linux.tar.xz.* | xz -dc -T0 | tar -x -C /tmp/big/src
    echo "unpacked: $(find /tmp/big/src -type f | wc -l) files, $(du -sh /tmp/big/src | cut -f1)";;
  *) echo "usage: $0 pack DIR [PARTS] | stash DIR | unpack" >&2; exit 2;;
esac
