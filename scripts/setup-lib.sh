#!/usr/bin/env bash
# Helpers for scripts/setup.sh and scripts/setup.d/*.sh; source it, do not run it.
#
#   is_root            true when running as root
#   apt_update_once    `apt-get update`, unless it already ran during this setup: NUBIS_APT_UPDATED=1
#                      in the environment, or the stamp file in NUBIS_SETUP_STATE (a directory that
#                      scripts/setup.sh shares with every step, so one step's update serves the next)
#   apt_install PKG..  installs the packages non-interactively (updating the lists first, once)

is_root() { [ "$(id -u)" -eq 0 ]; }

apt_update_once() {
  if [ "${NUBIS_APT_UPDATED:-}" = 1 ]; then
    return 0
  fi
  if [ -n "${NUBIS_SETUP_STATE:-}" ] && [ -e "$NUBIS_SETUP_STATE/apt-updated" ]; then
    export NUBIS_APT_UPDATED=1
    return 0
  fi
  if ! is_root; then
    echo "setup: installing packages needs root; run scripts/setup.sh as root" >&2
    return 1
  fi
  apt-get update -qq
  export NUBIS_APT_UPDATED=1
  if [ -n "${NUBIS_SETUP_STATE:-}" ]; then
    touch "$NUBIS_SETUP_STATE/apt-updated"
  fi
}

apt_install() {
  if ! is_root; then
    echo "setup: missing packages $*; run scripts/setup.sh as root to install them" >&2
    return 1
  fi
  apt_update_once
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}
