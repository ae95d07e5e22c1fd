#!/usr/bin/env bash
# Installs fuse3 (fusermount3 and /etc/fuse.conf), which the KPI filesystem needs to mount without
# libfuse: the mount is done through the setuid fusermount3 helper, and allow_other needs
# `user_allow_other` only for unprivileged users. Idempotent and non-interactive; `apt-get update`
# runs only when NUBIS_APT_UPDATED is unset, so a setup run that already refreshed the lists skips it.
set -euo pipefail
if command -v fusermount3 >/dev/null 2>&1; then
  echo "fuse3 is installed ($(fusermount3 -V 2>&1 | head -n1))"
else
  echo "installing fuse3"
  export DEBIAN_FRONTEND=noninteractive
  if [ -z "${NUBIS_APT_UPDATED:-}" ]; then
    apt-get update -qq
  fi
  apt-get install -y -qq --no-install-recommends fuse3
  fusermount3 -V
fi
if [ ! -e /dev/fuse ]; then
  echo "warning: /dev/fuse is missing; FUSE mounts will fail on this machine" >&2
fi
