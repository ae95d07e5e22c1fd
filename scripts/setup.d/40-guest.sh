#!/usr/bin/env bash
# Builds the tiny test guest used by the real-QEMU tests into a cache directory
# (NUBIS_GUEST_DIR, default /var/cache/nubis/guest): a Debian 6.1 kernel, unpacked with `dpkg -x`
# (nothing is installed system-wide), a busybox initramfs and a small template qcow2 disk.
#
# The guest's /init loads the virtio and ACPI-button modules, mounts every virtio-9p share under
# /mnt/<tag> except the KPI share (tag `nubis-kpi`), prints NUBIS-GUEST-READY on the serial console, then once a second increments a
# counter kept in the first sector of /dev/vda and prints `NUBIS-COUNTER <n> <uptime>`. At boot it
# continues from the counter found on the disk. An ACPI power-button press powers it off, so a
# graceful shutdown really completes. With a KPI share, a sidecar reports the KPI
# `guest.current_users` every two seconds with /bin/nubis-kpi-report, which mounts the share only
# while it writes (a guest holding a 9p share mounted cannot be saved, hence not migrated), and
# prints `NUBIS-KPI <n>` (or `NUBIS-KPI-FAILED <n>`). Idempotent: a complete cache is left alone.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

dir=${NUBIS_GUEST_DIR:-/var/cache/nubis/guest}
stamp="$dir/.complete-v4"
if [ -f "$stamp" ]; then
  echo "test guest is ready in $dir"
  exit 0
fi

for tool in busybox qemu-img dpkg gzip; do
  command -v "$tool" >/dev/null || { echo "missing $tool (run 30-libvirt.sh first)" >&2; exit 1; }
done
# Debian's busybox-static is the one that can be copied into an initramfs as a single file.
bb=/bin/busybox
if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed'; then
  echo "busybox-static is not installed (run 30-libvirt.sh first)" >&2
  exit 1
fi

if [ -z "${NUBIS_APT_UPDATED:-}" ] && [ -z "$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$')" ]; then
  apt-get update -qq
fi
pkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | awk '{print $1}' | sort -V | tail -n1)
if [ -z "$pkg" ]; then
  echo "no linux-image-6.1.0-*-amd64 package found" >&2
  exit 1
fi
echo "building the test guest from $pkg into $dir"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
(cd "$work" && apt-get download "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
deb=$(ls "$work"/linux-image-*.deb)
dpkg -x "$deb" "$work/kernel"
moddir=$(ls -d "$work"/kernel/lib/modules/*)

# Resolve module dependencies from each module's own .modinfo (the package ships no modules.dep).
declare -A seen=()
order=()
resolve() {
  local name=$1 file deps dep
  [ -n "${seen[$name]:-}" ] && return 0
  seen[$name]=1
  file=$(find "$moddir/kernel" -name "$name.ko" | head -n1)
  if [ -z "$file" ]; then
    echo "module $name not found in $pkg" >&2
    exit 1
  fi
  deps=$(grep -a -o 'depends=[^[:cntrl:]]*' "$file" | head -n1 | cut -d= -f2)
  for dep in ${deps//,/ }; do
    resolve "$dep"
  done
  order+=("$name")
  cp "$file" "$work/root/lib/modules/$name.ko"
}
mkdir -p "$work/root"/{bin,dev,proc,sys,mnt,lib/modules,etc/acpi/PWRF}
for m in virtio_pci virtio_blk virtio_net virtio_balloon 9pnet_virtio 9p button evdev; do
  resolve "$m"
done
printf '%s\n' "${order[@]}" > "$work/root/lib/modules/order"

cp "$bb" "$work/root/bin/busybox"
cat > "$work/root/etc/acpi/PWRF/00000080" <<'SH'
#!/bin/sh
echo "NUBIS-GUEST-POWEROFF" > /dev/console
sync
poweroff -f
SH
chmod 755 "$work/root/etc/acpi/PWRF/00000080"

# The sidecar of the paper's closed-source case: an application that cannot write KPI files
# itself has them written by a script. Usage: nubis-kpi-report TABLE HEADER VALUES.
cat > "$work/root/bin/nubis-kpi-report" <<'SH'
#!/bin/busybox sh
# Writes one two-line KPI report into unencrypted/TABLE of the KPI share. The share is mounted
# only for the write: QEMU refuses to save (and so to migrate) a guest that holds it mounted.
table=$1 header=$2 values=$3
dir=/run/nubis-kpi
mkdir -p "$dir"
mount -t 9p -o trans=virtio,version=9p2000.L nubis-kpi "$dir" 2>/dev/null || exit 1
# A refusal found at write() (too long, non-UTF-8) is the exit status; one found only at close()
# (ragged CSV) is logged by the host.
printf '%s\n%s\n' "$header" "$values" > "$dir/kpi/unencrypted/$table"
rc=$?
umount "$dir" || umount -l "$dir"
exit "$rc"
SH
chmod 755 "$work/root/bin/nubis-kpi-report"

cat > "$work/root/init" <<'SH'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /lib/modules/order); do
  insmod "/lib/modules/$m.ko" 2>/dev/null
done
i=0
while [ ! -b /dev/vda ] && [ "$i" -lt 100 ]; do
  sleep 0.1
  i=$((i + 1))
done
kpi_share=
for f in /sys/bus/virtio/drivers/9pnet_virtio/*/mount_tag; do
  [ -f "$f" ] || continue
  tag=$(tr -d '\000' < "$f")
  # The KPI share is mounted only while a report is written (see nubis-kpi-report).
  if [ "$tag" = nubis-kpi ]; then
    kpi_share=1
    continue
  fi
  mkdir -p "/mnt/$tag"
  mount -t 9p -o trans=virtio,version=9p2000.L "$tag" "/mnt/$tag" && echo "NUBIS-SHARE $tag"
done
# Not daemonised (-d): the daemonised busybox acpid was seen not to run its actions here.
acpid -d -c /etc/acpi &
if [ -n "$kpi_share" ]; then
  (
    k=0
    while true; do
      sleep 2
      k=$((k + 1))
      if nubis-kpi-report guest current_users "$k"; then
        echo "NUBIS-KPI $k"
      else
        echo "NUBIS-KPI-FAILED $k"
      fi
    done
  ) &
fi
n=0
if [ -b /dev/vda ]; then
  first=$(dd if=/dev/vda bs=512 count=1 2>/dev/null | head -n1 | tr -cd '0-9')
  [ -n "$first" ] && n=$first
  echo "NUBIS-GUEST-READY disk=vda counter=$n"
else
  echo "NUBIS-GUEST-READY disk=none counter=$n"
fi
while true; do
  n=$((n + 1))
  if [ -b /dev/vda ]; then
    printf '%s\n' "$n" | dd of=/dev/vda bs=512 count=1 conv=sync,notrunc,fsync 2>/dev/null
  fi
  echo "NUBIS-COUNTER $n $(cut -d' ' -f1 /proc/uptime)"
  sleep 1
done
SH
chmod 755 "$work/root/init"

mkdir -p "$dir"
(cd "$work/root" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -9) > "$work/initramfs.cpio.gz"
cp "$work"/kernel/boot/vmlinuz-* "$dir/vmlinuz"
mv "$work/initramfs.cpio.gz" "$dir/initramfs.cpio.gz"
rm -f "$dir/disk.qcow2"
qemu-img create -q -f qcow2 "$dir/disk.qcow2" 16M
echo "$pkg" > "$dir/kernel-package"
touch "$stamp"
echo "test guest is ready in $dir"
ls -la "$dir"
