#!/usr/bin/env bash
# Installs what is missing (scripts/setup.sh), builds nubis, and runs the main job: a local
# federation on loopback (a nats-server hub and four leaf sites, each with its site daemon,
# Transfer proxy and host agent) walking through delegated placement, the Control interface and
# an eviction that moves the VM to another site; then it keeps running until Ctrl-C.
# `./scripts/demo.sh --ci` runs the same walk non-interactively and exits non-zero on a failed step.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

./scripts/setup.sh
# The debug profile shares its build with scripts/test.sh, which saves minutes on a small machine.
cargo build -p nubis-tests --bin nubis-demo -p nubis-cli --bin nubis
exec "${CARGO_TARGET_DIR:-target}/debug/nubis-demo" "$@"
