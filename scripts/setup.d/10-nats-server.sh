#!/usr/bin/env bash
# Installs nats-server >= 2.10 from Debian trixie's official package (a static binary that needs only
# libc6 >= 2.34), without adding trixie to the system's sources: a private apt state directory is used
# for the look-up and the download, and the .deb is installed with dpkg.
#
# Debian 12 ships nats-server 2.9, whose JetStream API async-nats cannot create buckets with.
# A server named by NUBIS_NATS_SERVER (for example an upstream release) counts as installed.
set -euo pipefail
need="2.10"

version_of() {
  "$1" --version 2>/dev/null | sed -n 's/.*v\([0-9][0-9.]*\).*/\1/p' | head -n1
}
new_enough() {
  [ -n "$1" ] && [ "$(printf '%s\n%s\n' "$need" "$1" | sort -V | head -n1)" = "$need" ]
}

# The Debian package puts the binary in /usr/sbin, which a non-root PATH often lacks.
candidates=()
[ -n "${NUBIS_NATS_SERVER:-}" ] && candidates+=("$NUBIS_NATS_SERVER")
if command -v nats-server >/dev/null 2>&1; then candidates+=("$(command -v nats-server)"); fi
candidates+=(/usr/local/sbin/nats-server /usr/sbin/nats-server)
have=""
for bin in "${candidates[@]}"; do
  [ -x "$bin" ] || continue
  have=$(version_of "$bin")
  if new_enough "$have"; then
    echo "nats-server $have is installed ($bin)"
    exit 0
  fi
done

if [ "$(id -u)" -ne 0 ]; then
  echo "nats-server >= $need is missing (found: ${have:-none}); run scripts/setup.sh as root," >&2
  echo "or set NUBIS_NATS_SERVER to a nats-server >= $need binary" >&2
  exit 1
fi
echo "installing nats-server from Debian trixie (found: ${have:-none})"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# apt downloads as the unprivileged _apt user, which must be able to enter the directory.
chmod 755 "$work"
mkdir -p "$work/lists/partial" "$work/archives/partial"
cat > "$work/trixie.list" <<LIST
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
LIST
opts=(-o "Dir::Etc::sourcelist=$work/trixie.list" -o "Dir::Etc::sourceparts=-"
      -o "Dir::State::Lists=$work/lists" -o "Dir::Cache::Archives=$work/archives"
      -o "APT::Get::List-Cleanup=0" -o "Debug::NoLocking=1")
apt-get "${opts[@]}" update -qq
(cd "$work" && apt-get "${opts[@]}" download nats-server)
dpkg -i "$work"/nats-server_*.deb
/usr/sbin/nats-server --version
