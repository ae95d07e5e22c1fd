#!/usr/bin/env bash
# Decides whether real guests use KVM or software emulation (TCG) on this machine, by trying:
# a `/dev/kvm` that exists is not enough (some virtual machines offer one that real kernels
# crash under), so the test guest built by 40-guest.sh is booted once with `-accel kvm`, and KVM
# is used only if it reaches its ready marker. The answer ("kvm" or "tcg") is written to
# $NUBIS_GUEST_DIR/accelerator (default /var/cache/nubis/guest/accelerator), where the tests and
# the main job read it (`NUBIS_USE_KVM=1` or `=0` overrides it). Idempotent: an answer is kept.
set -euo pipefail

dir=${NUBIS_GUEST_DIR:-/var/cache/nubis/guest}
answer="$dir/accelerator"
if [ -f "$answer" ]; then
  echo "guest accelerator: $(cat "$answer") (from $answer)"
  exit 0
fi
[ -f "$dir/vmlinuz" ] || { echo "test guest not built in $dir (run 40-guest.sh first)" >&2; exit 1; }

accel=tcg
if [ -c /dev/kvm ] && [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
  out=$(mktemp)
  timeout 30 qemu-system-x86_64 -accel kvm -m 128 -nographic -no-reboot -nodefaults \
    -serial "file:$out" -kernel "$dir/vmlinuz" -initrd "$dir/initramfs.cpio.gz" \
    -append "console=ttyS0 quiet panic=-1" >/dev/null 2>&1 &
  pid=$!
  for _ in $(seq 1 50); do
    if grep -q NUBIS-GUEST-READY "$out" 2>/dev/null; then
      accel=kvm
      break
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -f "$out"
fi
echo "$accel" > "$answer"
echo "guest accelerator: $accel (a guest booted under KVM: $([ "$accel" = kvm ] && echo yes || echo no))"
