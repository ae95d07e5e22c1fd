#!/usr/bin/env bash
# Installs the Python packages the interoperability tests and examples use: PyNaCl (libsodium) to
# open sealed boxes and verify ed25519 signatures, msgpack to decode envelopes, nats-py for the
# subscriber example.
set -euo pipefail
if python3 -c 'import nacl.public, nacl.signing, msgpack, nats' >/dev/null 2>&1; then
  echo "python packages are installed"
  exit 0
fi
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore pynacl msgpack nats-py
