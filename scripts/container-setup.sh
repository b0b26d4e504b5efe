#!/usr/bin/env bash
# Installs what the container tests (server/tests/it/containers.rs) need — podman, runc,
# busybox-static, and skopeo for the README's workflow — when missing, then proves that podman
# can start a trivial FROM scratch container here, with the flags the tests use:
#
#   podman --storage-driver=vfs --runtime runc run --ulimit nofile=1024:1024 \
#          --ulimit nproc=1024:1024 --network=host IMAGE
#
# (vfs: no overlay mounts needed; runc: crun fails on hybrid cgroup hosts; the ulimits avoid a
# setrlimit the host refuses; host network: containers reach a server on the host's loopback.)
#
#   scripts/container-setup.sh [--no-install]
#
# Exit 0: containers work. Exit 1: they do not (the reason is printed); the test suite would
# then skip, loudly. Needs root (rootful podman) and Debian/Ubuntu's apt for installing.
set -euo pipefail

install=1
[[ "${1:-}" == "--no-install" ]] && install=0

missing=()
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || missing+=(runc)
command -v skopeo >/dev/null || missing+=(skopeo)
if ! dpkg -s busybox-static >/dev/null 2>&1; then missing+=(busybox-static); fi

if ((${#missing[@]})); then
    if ((install == 0)); then
        echo "container-setup: missing: ${missing[*]}" >&2
        exit 1
    fi
    echo "container-setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    sudo=""
    [[ "$(id -u)" == 0 ]] || sudo=sudo
    $sudo apt-get install -y -q "${missing[@]}" ||
        { $sudo apt-get update -q && $sudo apt-get install -y -q "${missing[@]}"; }
fi

podman --version
dir=$(mktemp -d /tmp/wp-container-setup.XXXXXX)
pod=(podman --root "$dir/storage" --runroot "$dir/run" --tmpdir "$dir/tmp"
     --storage-driver=vfs --runtime=runc --cgroup-manager=cgroupfs --events-backend=none)
cleanup() {
    "${pod[@]}" rm -af -t 0 >/dev/null 2>&1 || true
    "${pod[@]}" rmi -af >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT

mkdir -p "$dir/rootfs/bin"
cp /bin/busybox "$dir/rootfs/bin/busybox"
tar -C "$dir/rootfs" -cf "$dir/rootfs.tar" .
"${pod[@]}" import -q "$dir/rootfs.tar" localhost/wp-setup-probe:1 >/dev/null
if out=$("${pod[@]}" run --rm --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 --network=host \
        localhost/wp-setup-probe:1 /bin/busybox echo container-ok 2>&1) && [[ "$out" == *container-ok* ]]; then
    echo "container-setup: podman runs FROM scratch containers here"
else
    echo "container-setup: podman cannot start a trivial container: $out" >&2
    exit 1
fi
