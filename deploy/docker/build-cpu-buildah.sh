#!/bin/sh
# Build the CPU image without a Docker daemon, with Debian 12's own packages only (buildah, debootstrap),
# where Docker Hub and download.pytorch.org are out of reach: the base image is made with debootstrap
# (Debian 12's Python 3.11), torch's CPU wheel comes from a local directory. Run as root from the
# repository root:
#   sudo apt-get install -y buildah debootstrap
#   deploy/docker/build-cpu-buildah.sh            # -> localhost/tessera:cpu
# Environment: WHEELS (a directory holding torch's CPU wheel, default /opt/wheels; empty: download.pytorch.org),
# CA_BUNDLE (the CA bundle pip must trust, default the host's, for TLS-intercepting proxies), ROOTFS.
set -eu
ROOTFS=${ROOTFS:-/tmp/tessera-rootfs}
WHEELS=${WHEELS-/opt/wheels}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
B="buildah --storage-driver vfs"
BASE=localhost/debian-python:3.11-bookworm

if ! $B inspect --type image "$BASE" >/dev/null 2>&1; then
    # debootstrap does not resolve python3.11-venv's dependency on python3.11-distutils; apt does, below
    debootstrap --variant=minbase \
        --include=python3.11,python3.11-venv,python-is-python3,libpython3.11,ca-certificates,passwd \
        bookworm "$ROOTFS" http://deb.debian.org/debian || true
    cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
    chroot "$ROOTFS" sh -c 'export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q -f \
        && apt-get install -y -q python3.11-venv && apt-get clean && python -m venv /tmp/v && rm -rf /tmp/v'
    rm -rf "$ROOTFS/debootstrap"
    ctr=$($B from scratch)
    mnt=$($B mount "$ctr")
    cp -a "$ROOTFS/." "$mnt/"
    $B umount "$ctr"
    $B config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/sh "$ctr"
    $B commit -q "$ctr" "$BASE"
    $B rm "$ctr" >/dev/null
fi

pipconf=$(mktemp)
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$pipconf"
set -- --build-arg BASE_IMAGE="$BASE" -v "$pipconf:/etc/pip.conf:ro" -v "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro"
if [ -n "$WHEELS" ]; then
    set -- "$@" -v "$WHEELS:/wheels:ro" --build-arg TORCH_FIND_LINKS=/wheels
fi
$B bud --isolation chroot "$@" --ignorefile deploy/docker/Dockerfile.cpu.dockerignore \
    -f deploy/docker/Dockerfile.cpu -t localhost/tessera:cpu .
rm -f "$pipconf"
