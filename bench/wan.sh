#!/usr/bin/env bash
# WAN benchmark: the federation with every site behind a userspace WAN link of the test kit
# (25 ms one way at 1 Gbit/s and at 100 Mbit/s, loopback as reference): a placement's control
# plane, a raw TCP stream, a transfer between two sites' proxies, `scp` through the same kind of
# links, and the KPI write → primary's subscriber latency (tests/benches/wan.rs).
#
# Usage: bench/wan.sh [extra arguments of the benchmark binary]
# The environment variables NUBIS_WAN_* of tests/benches/wan.rs shorten a run, e.g.
#   NUBIS_WAN_PROFILES=1g NUBIS_WAN_MIB=64 NUBIS_WAN_PARTS=raw,transfer,scp bench/wan.sh
# This script adds a throwaway sshd on a loopback port for the scp rows (installing
# openssh-server where it is missing; without it those rows say n/a).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/nubis-wan-bench.XXXXXX")
SSHD_PID=
cleanup() { [ -n "$SSHD_PID" ] && kill "$SSHD_PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

# shellcheck source=sshd.sh
. "$ROOT/bench/sshd.sh"
if start_sshd "$WORK/ssh"; then
  export NUBIS_WAN_SSH_PORT=$SSHD_PORT NUBIS_WAN_SSH_KEY=$SSHD_KEY
fi

cd "$ROOT"
cargo bench -p nubis-tests --bench wan -- "$@"
