#!/usr/bin/env bash
# Installs libvirt (daemon, clients, development headers for the `virt` crate), QEMU for x86 and
# busybox-static, then starts virtlogd and libvirtd without systemd, so that `qemu:///system` answers.
# Idempotent and non-interactive. `apt-get update` runs only when NUBIS_APT_UPDATED is unset.
#
# Installing Debian 12's qemu-system-x86 would remove a newer qemu-utils from bookworm-backports
# (their qemu-block-extra versions conflict), so qemu-utils is pinned to bookworm's version in the
# same command, with --allow-downgrades.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

pkgs=(libvirt-dev pkg-config libvirt-daemon-system libvirt-clients qemu-system-x86 busybox-static)
missing=()
for p in "${pkgs[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed'; then
    missing+=("$p")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  if [ -z "${NUBIS_APT_UPDATED:-}" ]; then
    apt-get update -qq
    export NUBIS_APT_UPDATED=1
  fi
  extra=()
  # Only pin qemu-utils when the installed one is not bookworm's own (e.g. from backports).
  if dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null | grep -q 'bpo'; then
    extra=(qemu-utils/bookworm --allow-downgrades)
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" "${extra[@]}"
fi

# libvirtd without systemd.
mkdir -p /var/log/libvirt /var/lib/libvirt/qemu /run/libvirt
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
getent passwd libvirt-qemu >/dev/null ||
  useradd --system --gid libvirt-qemu --home-dir /var/lib/libvirt --no-create-home \
    --shell /usr/sbin/nologin libvirt-qemu
getent group libvirt >/dev/null || groupadd --system libvirt

# QEMU runs as root, and in the host's mount namespace (`namespaces = []`): a private namespace
# per guest would keep a copy of every FUSE mount present when the guest started (the KPI
# filesystems of other VMs), so unmounting one would never end its session while that guest runs.
conf=/etc/libvirt/qemu.conf
changed=
if [ -f "$conf" ]; then
  before=$(md5sum "$conf")
  for key in user group; do
    if grep -Eq "^${key}[[:space:]]*=" "$conf"; then
      sed -i -E "s|^${key}[[:space:]]*=.*|${key} = \"root\"|" "$conf"
    else
      echo "${key} = \"root\"" >> "$conf"
    fi
  done
  if grep -Eq "^namespaces[[:space:]]*=" "$conf"; then
    sed -i -E "s|^namespaces[[:space:]]*=.*|namespaces = []|" "$conf"
  else
    echo "namespaces = []" >> "$conf"
  fi
  [ "$before" = "$(md5sum "$conf")" ] || changed=1
fi
if [ -n "$changed" ] && pgrep -x libvirtd >/dev/null; then
  # Running guests survive a libvirtd restart; new ones get the new configuration.
  pkill -x libvirtd
  for _ in $(seq 1 40); do pgrep -x libvirtd >/dev/null || break; sleep 0.25; done
fi

if ! pgrep -x virtlogd >/dev/null; then
  virtlogd -d
fi
if ! pgrep -x libvirtd >/dev/null; then
  libvirtd -d
fi

for _ in $(seq 1 120); do
  if virsh -c qemu:///system version >/dev/null 2>&1; then
    virsh -c qemu:///system version
    exit 0
  fi
  sleep 0.5
done
echo "libvirtd did not answer on qemu:///system" >&2
exit 1
