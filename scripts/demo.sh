#!/usr/bin/env bash
# Installs what is missing (scripts/setup.sh), builds nubis, and runs the local federation:
# a nats-server hub and sites a, b, c on loopback, checked and left running until Ctrl-C.
# Arguments go to nubis-localfed; `./scripts/demo.sh --ci` checks and exits.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

./scripts/setup.sh
# The debug profile shares its build with scripts/test.sh, which saves minutes on a small machine.
cargo build -p nubis-testkit --bin nubis-localfed
exec "${CARGO_TARGET_DIR:-target}/debug/nubis-localfed" "$@"
