#!/usr/bin/env bash
# Runs the whole nubis test suite: installs missing prerequisites (scripts/setup.sh), then checks
# formatting, lints, and runs every test of every crate against real servers.
#
# Under CI=true, a test whose prerequisite (nats-server, libvirt, FUSE, ...) is missing fails
# instead of being skipped.
#
# Every step runs even when an earlier one failed, so one run reports everything; the last line
# says PASSED or FAILED and the exit status agrees.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "${CI:-}" = true ]; then
  export CI=true
fi

./scripts/setup.sh

failed=()
step() {
  local name=$1
  shift
  echo
  echo "==> $name: $*"
  if "$@"; then
    echo "==> $name: ok"
  else
    echo "==> $name: FAILED"
    failed+=("$name")
  fi
}

step fmt cargo fmt --all -- --check
step clippy cargo clippy --workspace --all-targets -- -D warnings
# --no-fail-fast: a failing crate does not hide the results of the others.
step tests cargo test --workspace --all-targets --no-fail-fast
step doctests cargo test --workspace --doc
step readme ./scripts/readme-check.sh

echo
if [ "${#failed[@]}" -eq 0 ]; then
  echo "nubis test suite: PASSED"
else
  echo "nubis test suite: FAILED (${failed[*]})"
  exit 1
fi
