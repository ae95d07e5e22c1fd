# Sourced by the benchmarks with an scp baseline: installs openssh-server where it is missing and
# starts a throwaway sshd on a loopback port, with a temporary host key and authorized key.
#
# start_sshd DIR   needs $ROOT; sets SSHD_PID, SSHD_PORT and SSHD_KEY (the client's key) and
#                  returns 0, or returns 1 when there is no sshd or scp (the caller then reports
#                  its scp rows as n/a). The caller kills $SSHD_PID when it exits.

start_sshd() {
  local dir=$1
  if ! [ -x /usr/sbin/sshd ]; then
    # shellcheck source=../scripts/setup-lib.sh
    . "$ROOT/scripts/setup-lib.sh"
    apt_install openssh-server openssh-client || echo "# openssh-server not installed: no scp baseline"
  fi
  [ -x /usr/sbin/sshd ] && command -v scp >/dev/null || return 1
  mkdir -p "$dir" /run/sshd  # sshd refuses to start without its privilege-separation dir
  ssh-keygen -q -t ed25519 -N '' -f "$dir/host" && ssh-keygen -q -t ed25519 -N '' -f "$dir/id"
  cp "$dir/id.pub" "$dir/authorized_keys"; chmod 600 "$dir/authorized_keys"
  SSHD_PORT=$((20000 + RANDOM % 20000))
  /usr/sbin/sshd -D -p "$SSHD_PORT" -h "$dir/host" -o ListenAddress=127.0.0.1 \
    -o AuthorizedKeysFile="$dir/authorized_keys" -o StrictModes=no -o PidFile=none \
    -o PasswordAuthentication=no -e 2>"$dir/log" & SSHD_PID=$!
  SSHD_KEY=$dir/id
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$SSHD_PORT) 2>/dev/null && return 0; sleep 0.1; done
  echo "# sshd did not listen on port $SSHD_PORT: no scp baseline ($dir/log)"; return 1
}
