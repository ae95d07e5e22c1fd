#!/usr/bin/env bash
# Transfer proxy benchmark: source host file -> verified destination file across two leaf sites
# (hub + sites a and b, real nats-server processes), side by side with `cp` on the same disk and
# `scp` over loopback to a throwaway sshd.
#
# Usage: bench/transfer.sh [dense sizes, MiB, comma-separated] [sparse MiB] [sparse allocated MiB]
# Defaults: 1024,4096 4096 1024. Needs nats-server, and openssh-server/client for the scp
# baseline, and free disk for three copies of the largest image.
set -euo pipefail
DENSE_MIBS=${1:-1024,4096}
SPARSE_MIB=${2:-4096}
SPARSE_ALLOC_MIB=${3:-1024}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/nubis-xfer-bench.XXXXXX")
SSHD_PID=
cleanup() { [ -n "$SSHD_PID" ] && kill "$SSHD_PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

cargo build --release -q -p nubis-proxy --example transfer_bench
BENCH="$ROOT/target/release/examples/transfer_bench"

now() { date +%s.%N; }
# CPU seconds of process $1 and of the children it has reaped (utime stime cutime cstime).
proc_cpu() { awk '{ sub(/.*\) /, ""); print ($12 + $13 + $14 + $15) / 100 }' "/proc/$1/stat"; }
rate() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.1f", b / s / 1048576 }'; }

echo "# generating files in $WORK"
truncate -s $((SPARSE_MIB << 20)) "$WORK/sparse.img"
# Allocated data spread over the image in 64 MiB runs.
runs=$((SPARSE_ALLOC_MIB / 64)); stride=$((SPARSE_MIB / runs))
for i in $(seq 0 $((runs - 1))); do
  dd if=/dev/urandom of="$WORK/sparse.img" bs=1M count=64 seek=$((i * stride)) conv=notrunc status=none
done
sync

# shellcheck source=sshd.sh
. "$ROOT/bench/sshd.sh"
SCP_OK=0
if start_sshd "$WORK/ssh"; then
  SCP=(scp -q -P "$SSHD_PORT" -i "$SSHD_KEY" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes)
  SCP_OK=1
fi

run_one() { # name file
  local name=$1 file=$2 size t0 t1 cp_s scp_s out
  size=$(stat -c %s "$file")
  # Each tool starts alike: the image in the page cache, nothing dirty; each ends with its
  # copy on disk (cp and scp: sync; nubis: the receiving proxy fsyncs before it verifies).
  sync; t0=$(now); cp "$file" "$WORK/cp.out"; sync "$WORK/cp.out"; t1=$(now)
  cp_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }'); rm -f "$WORK/cp.out"
  scp_s=NaN; scp_cpu=NaN
  if [ "$SCP_OK" = 1 ]; then
    local sshd0 sshd1 client
    sshd0=$(proc_cpu "$SSHD_PID")
    sync; t0=$(now)
    client=$( { TIMEFORMAT='%U %S'; time "${SCP[@]}" "$file" "127.0.0.1:$WORK/scp.out"; } 2>&1 )
    sync "$WORK/scp.out"; t1=$(now)
    sleep 0.5  # the listening sshd reaps its session process, whose time then counts as its own
    sshd1=$(proc_cpu "$SSHD_PID")
    scp_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }'); rm -f "$WORK/scp.out"
    scp_cpu=$(awk -v c="$client" -v a="$sshd0" -v b="$sshd1" 'BEGIN { split(c, t, " "); printf "%.2f", t[1] + t[2] + b - a }')
  fi
  rm -rf "$WORK/dst"; sync
  out=$("$BENCH" "$file" "$WORK/dst" 1024 32 8)
  local px_s published hwm key cpu=()
  field() { grep -oE "(^| )$1=[0-9.]+" <<<"$out" | head -n 1 | cut -d= -f2; }
  px_s=$(field seconds)
  published=$(field published)
  hwm=$(field vmhwm_kib)
  for key in source_proxy source_server hub destination_server destination_proxy; do
    cpu+=("$(field "cpu_${key}_s")")
  done
  local floor_s floor=()
  floor_s=$(field floor_seconds)
  for key in source_client source_server hub destination_server destination_client; do
    floor+=("$(field "floor_cpu_${key}_s")")
  done
  cmp -s "$file" "$WORK/dst/disk.img" || { echo "MISMATCH for $name"; exit 1; }
  # CPU-s per GiB of each component, then the total and the two sites' share (all but the hub,
  # the third of five).
  per_gib() { awk -v z="$size" -v c="$*" 'BEGIN { n = split(c, v, " "); g = z / 1073741824; t = 0
      for (i = 1; i <= n; i++) { t += v[i]; printf "%.2f / ", v[i] / g }
      printf "**%.2f** (sites %.2f)", t / g, (t - v[3]) / g }'; }
  printf '| %s | %d MiB | %.2f s (%s MiB/s) | %.2f s (%s MiB/s) | %s | %.2f | %s | %d MiB | %d MiB | %s | %s | %.2f s: %s |\n' \
    "$name" $((size >> 20)) "$px_s" "$(rate "$size" "$px_s")" "$cp_s" "$(rate "$size" "$cp_s")" \
    "$( [ "$scp_s" = NaN ] && echo n/a || printf '%.2f s (%s MiB/s)' "$scp_s" "$(rate "$size" "$scp_s")")" \
    "$(awk -v a="$cp_s" -v b="$px_s" 'BEGIN { print a / b }')" \
    "$( [ "$scp_s" = NaN ] && echo n/a || awk -v a="$scp_s" -v b="$px_s" 'BEGIN { printf "%.2f", a / b }')" \
    $((published >> 20)) $((hwm >> 10)) \
    "$(per_gib "${cpu[*]}")" \
    "$( [ "$scp_cpu" = NaN ] && echo n/a || awk -v z="$size" -v c="$scp_cpu" 'BEGIN { printf "%.2f", c / (z / 1073741824) }')" \
    "$floor_s" "$(per_gib "${floor[*]}")"
  rm -rf "$WORK/dst"
}

echo "| image | size | nubis proxies | cp | scp (loopback) | ×cp rate | ×scp rate | bytes published | peak RSS (both proxies) | nubis CPU-s per GiB: source proxy / source server / hub / destination server / destination proxy / **total** (two sites) | scp + sshd CPU-s per GiB | bus floor, same bytes as raw chunks: time, CPU-s per GiB: source client / source server / hub / destination server / destination client / **total** (two sites) |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
for mib in ${DENSE_MIBS//,/ }; do
  head -c $((mib << 20)) /dev/urandom > "$WORK/dense.img"; sync
  run_one "dense (random)" "$WORK/dense.img"
  rm -f "$WORK/dense.img"
done
run_one "sparse ($SPARSE_ALLOC_MIB MiB allocated)" "$WORK/sparse.img"
