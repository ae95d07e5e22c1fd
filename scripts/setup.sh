#!/usr/bin/env bash
# Installs what nubis needs on a fresh Debian 12 machine, and nothing that is already there.
#
# Runs every scripts/setup.d/*.sh in lexical order. Each of those installs one prerequisite
# (10-nats-server.sh: nats-server >= 2.10; later ones: FUSE, libvirt, ...) and must be
# idempotent: it checks first and exits quietly when the prerequisite is present.
#
# For those scripts, this one exports:
#   DEBIAN_FRONTEND=noninteractive   so apt never prompts
#   NUBIS_APT_UPDATED=1              once the package lists are fresh; skip `apt-get update` then
#   NUBIS_SETUP_STATE                a directory shared by all steps of this run
#   NUBIS_REPO                       the repository root
# and scripts/setup-lib.sh offers `apt_install PKG...`, which honours the flag.
#
# Installing needs root; when everything is present, any user can run this.
set -euo pipefail

NUBIS_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export NUBIS_REPO
export DEBIAN_FRONTEND=noninteractive
NUBIS_SETUP_STATE="$(mktemp -d)"
export NUBIS_SETUP_STATE
trap 'rm -rf "$NUBIS_SETUP_STATE"' EXIT
# shellcheck source=setup-lib.sh
. "$NUBIS_REPO/scripts/setup-lib.sh"

# Base tools every Rust build here needs: a C toolchain (ring, libsqlite3-sys), pkg-config for
# system libraries, and the archive keyring that 10-nats-server.sh verifies trixie's package with.
base=(build-essential pkg-config ca-certificates debian-archive-keyring)
missing=()
for pkg in "${base[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed"; then
    missing+=("$pkg")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  apt_install "${missing[@]}"
fi

for step in "$NUBIS_REPO"/scripts/setup.d/*.sh; do
  [ -e "$step" ] || continue
  echo "setup: $(basename "$step")"
  bash "$step"
done

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust 1.85 or newer with rustup (https://rustup.rs)" >&2
  exit 1
fi
echo "setup: done"
