#!/usr/bin/env bash
# Installs nats-server >= 2.10 from Debian trixie's official package (a static binary that needs only
# libc6 >= 2.34), without adding trixie to the system's sources: a private apt state directory is used
# for the look-up and the download, and the .deb is installed with dpkg.
set -euo pipefail
need="2.10"
have=""
if command -v nats-server >/dev/null 2>&1; then
  have=$(nats-server --version 2>/dev/null | sed -n 's/.*v\([0-9][0-9.]*\).*/\1/p')
fi
if [ -n "$have" ] && [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -n1)" = "$need" ]; then
  echo "nats-server $have is installed"
  exit 0
fi
echo "installing nats-server from Debian trixie (found: ${have:-none})"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
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
nats-server --version
