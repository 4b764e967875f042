#!/usr/bin/env bash
# Local base images for the deployment tests, made without any registry (none can be pulled here):
#   meshbase:bookworm  Debian 12 minbase + python3, python3-venv, ca-certificates (docker import)
#                      -> the project image is built FROM it (compose/Dockerfile, BASE=...)
#   meshvm:bookworm    the same + systemd as PID 1: the "VM" of the hybrid test
# Each is built only if missing (the machine keeps images between runs: that is the cache).
# Needs root, debootstrap and a running dockerd (.ci/run sees to both). ~1 min per image.
set -euo pipefail

MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE=${MESH_BASE_TAG:-meshbase:bookworm}   # other tags only to test this script
VM=${MESH_VM_TAG:-meshvm:bookworm}
# Bump a REV when the recipe changes: a cached image with another mesh.image.rev is rebuilt.
BASE_REV=1
VM_REV=2   # 2: + procps (/bin/kill for ExecReload=)
have() {  # have IMAGE REV: present with that revision (no label = revision 1)
  rev=$(docker image inspect -f '{{ index .Config.Labels "mesh.image.rev" }}' "$1" 2>/dev/null) || return 1
  case "$rev" in ""|"<no value>") rev=1 ;; esac
  [ "$rev" = "$2" ]
}

if have "$BASE" "$BASE_REV" && have "$VM" "$VM_REV"; then
  echo "base-image: $BASE and $VM present (cached)"
  exit 0
fi

work=$(mktemp -d /tmp/meshbase.XXXXXX)
cleanup() {
  # debootstrap may leave proc/sys mounted inside the rootfs
  for m in proc sys dev/pts dev; do umount -l "$work/rootfs/$m" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
rootfs=$work/rootfs

echo "base-image: debootstrap bookworm (minbase) into $rootfs"
debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
  || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
chroot "$rootfs" /bin/sh -c 'export DEBIAN_FRONTEND=noninteractive; apt-get install -y -qq --no-install-recommends python3 python3-venv ca-certificates >/dev/null && apt-get clean && rm -rf /var/lib/apt/lists/*'
# the imported image would otherwise carry the build machine's name service config
: >"$rootfs/etc/hostname"

if ! have "$BASE" "$BASE_REV"; then
  tar -C "$rootfs" -c . | docker import -c 'CMD ["python3"]' -c "LABEL mesh.image.rev=$BASE_REV" - "$BASE" >/dev/null
  echo "base-image: $BASE imported"
fi

if ! have "$VM" "$VM_REV"; then
  chroot "$rootfs" /bin/sh -c 'export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd systemd-sysv dbus procps >/dev/null && apt-get clean && rm -rf /var/lib/apt/lists/*'
  # a container "VM": no getty, no udev trigger; boots to multi-user.target
  chroot "$rootfs" /bin/sh -c 'systemctl mask getty.target console-getty.service systemd-udev-trigger.service systemd-udevd.service systemd-remount-fs.service sys-kernel-debug.mount >/dev/null 2>&1 || true'
  : >"$rootfs/etc/machine-id"
  tar -C "$rootfs" -c . | docker import -c 'CMD ["/sbin/init"]' -c "LABEL mesh.image.rev=$VM_REV" - "$VM" >/dev/null
  echo "base-image: $VM imported"
fi
