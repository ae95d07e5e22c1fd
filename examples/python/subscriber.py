#!/usr/bin/env python3
"""A nubis monitoring consumer in Python, written only from `subjects.md`.

Subscribes to `nubis.mon.<primary>.>`, and for every message:

1. decodes the signed envelope (MessagePack map, `subjects.md` section 3);
2. checks version, body type, recipient `*`, subject, freshness and replay;
3. rebuilds the signed bytes and verifies the Ed25519 signature against the sender's key
   pinned on the command line or in a site configuration (never a key found on the bus);
4. decodes the MonitoringBatch body (section 9) and checks it against the subject;
5. opens a sealed payload with the primary site's X25519 secret key (libsodium
   `crypto_box_seal_open` through PyNaCl's SealedBox), when a key file is given;
6. prints the values, or why the message was rejected.

Needs nats-py, msgpack and PyNaCl (`scripts/setup.d/15-python.sh` installs them).
"""

import argparse
import asyncio
import base64
import json
import os
import stat
import struct
import sys
import time
import tomllib

import msgpack
import nats
from nacl.exceptions import BadSignatureError, CryptoError
from nacl.public import PrivateKey, SealedBox
from nacl.signing import SigningKey, VerifyKey

DOMAIN_TAG = b"nubis-envelope-v1\x00"
PROTOCOL_VERSION = 1
FRESHNESS_MS = 300_000
ENVELOPE_FIELDS = ("v", "type", "from", "to", "subject", "ts", "nonce", "re", "body", "sig")


class Rejected(Exception):
    """A message that fails a receiver check; the text is the error code of subjects.md §3."""


def decode_key(text, prefix, what):
    """`ed25519:<base64>` / `x25519:<base64>` → 32 bytes."""
    text = text.strip()
    if not text.startswith(prefix):
        raise SystemExit(f"{what}: expected \"{prefix}<base64 of 32 bytes>\"")
    raw = base64.b64decode(text[len(prefix):], validate=True)
    if len(raw) != 32:
        raise SystemExit(f"{what}: expected 32 bytes, got {len(raw)}")
    return raw


def load_key_file(path):
    """A key file written by `nubis keys gen`: (site, signing seed, sealing secret)."""
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SystemExit(f"key file {path} is readable by others; run `chmod 600 {path}`")
    with open(path, "rb") as f:
        keys = tomllib.load(f)
    return (
        keys["site"],
        decode_key(keys["signing_secret"], "ed25519:", f"{path}: signing_secret"),
        decode_key(keys["sealing_secret"], "x25519:", f"{path}: sealing_secret"),
    )


def signed_bytes(e):
    """The byte string the signature covers (subjects.md §3, "Signed bytes")."""

    def lp(s):
        b = s.encode("utf-8")
        return struct.pack(">H", len(b)) + b

    re = b"\x01" + e["re"] if e["re"] is not None else b"\x00"
    return (
        DOMAIN_TAG
        + struct.pack(">H", e["v"])
        + lp(e["type"])
        + lp(e["from"])
        + lp(e["to"])
        + lp(e["subject"])
        + struct.pack(">Q", e["ts"])
        + e["nonce"]
        + re
        + struct.pack(">I", len(e["body"]))
        + e["body"]
    )


def check_envelope_shape(e):
    if not isinstance(e, dict) or any(k not in e for k in ENVELOPE_FIELDS):
        raise Rejected("malformed")
    if e["v"] != PROTOCOL_VERSION:
        raise Rejected("unsupported_version")
    types = {
        "v": int, "type": str, "from": str, "to": str, "subject": str, "ts": int,
        "nonce": bytes, "body": bytes, "sig": bytes,
    }
    for field, kind in types.items():
        if not isinstance(e[field], kind):
            raise Rejected("malformed")
    if len(e["nonce"]) != 16 or len(e["sig"]) != 64:
        raise Rejected("malformed")
    if e["re"] is not None and not (isinstance(e["re"], bytes) and len(e["re"]) == 16):
        raise Rejected("malformed")


class Consumer:
    def __init__(self, primary, pinned, sealing_secret):
        self.primary = primary
        self.pinned = {site: VerifyKey(key) for site, key in pinned.items()}
        self.sealed_box = SealedBox(PrivateKey(sealing_secret)) if sealing_secret else None
        # (from, nonce) → ts; entries older than the freshness window are dropped.
        self.seen = {}

    def open(self, raw, subject):
        """Verifies and decodes one message; returns the batch with its payload opened."""
        try:
            e = msgpack.unpackb(raw, raw=False)
        except Exception:
            raise Rejected("malformed") from None
        check_envelope_shape(e)
        key = self.pinned.get(e["from"])
        if key is None:
            raise Rejected("unknown_sender")
        try:
            key.verify(signed_bytes(e), e["sig"])
        except BadSignatureError:
            raise Rejected("bad_signature") from None
        if e["to"] != "*":
            raise Rejected("wrong_recipient")
        if e["subject"] != subject:
            raise Rejected("wrong_subject")
        now = int(time.time() * 1000)
        if abs(now - e["ts"]) > FRESHNESS_MS:
            raise Rejected("stale")
        self.seen = {k: ts for k, ts in self.seen.items() if abs(now - ts) <= FRESHNESS_MS}
        if (e["from"], e["nonce"]) in self.seen:
            raise Rejected("replayed")
        self.seen[(e["from"], e["nonce"])] = e["ts"]
        if e["type"] != "MonitoringBatch":
            raise Rejected("malformed")
        try:
            batch = msgpack.unpackb(e["body"], raw=False)
            payload = batch["payload"]
            tokens = subject.split(".")
            consistent = (
                batch["primary_site"] == self.primary
                and len(tokens) >= 5
                and tokens[2] == self.primary
                and tokens[3] == batch["vm"]
            )
        except Exception:
            raise Rejected("malformed") from None
        if not consistent:
            raise Rejected("wrong_subject")
        batch["from"] = e["from"]
        if payload.get("kind") == "sealed":
            batch["sealed"] = True
            if self.sealed_box is None:
                batch["opened"] = False
                return batch
            try:
                clear = self.sealed_box.decrypt(payload["ciphertext"])
            except CryptoError:
                raise Rejected("sealed payload does not open with this key") from None
            batch["payload"] = msgpack.unpackb(clear, raw=False)
            batch["payload"]["kind"] = "clear"
            batch["opened"] = True
        elif payload.get("kind") == "clear":
            batch["sealed"] = False
        else:
            raise Rejected("malformed")
        return batch


def as_json(batch, subject):
    payload = batch["payload"]
    out = {
        "event": "batch",
        "subject": subject,
        "from": batch["from"],
        "vm": batch["vm"],
        "producer": batch["producer"],
        "epoch_ms": batch["epoch_ms"],
        "seq": batch["seq"],
        "sealed": batch["sealed"],
    }
    if batch["sealed"] and not batch["opened"]:
        out["opened"] = False
        out["ciphertext_len"] = len(payload["ciphertext"])
        return out
    if batch["sealed"]:
        out["opened"] = True
    out["samples"] = payload.get("samples", [])
    out["processed"] = payload.get("processed", [])
    out["encrypted_kpi"] = [
        {"table": r["table"], "ts_ms": r["ts_ms"], "bytes": len(r["blob"])}
        for r in payload.get("encrypted_kpi", [])
    ]
    return out


def print_human(batch, subject):
    j = as_json(batch, subject)
    state = "sealed" if j["sealed"] else "clear"
    if j["sealed"]:
        state += ", opened" if j.get("opened") else f", not opened ({j['ciphertext_len']} bytes; pass --key)"
    print(f"{subject}  from {j['from']}  vm {j['vm']}  seq {j['seq']}  [{state}]")
    for s in j.get("samples", []):
        print(f"  {s['data_point']} @ {s['ts_ms']}: {s['value']}")
    for p in j.get("processed", []):
        print(
            f"  {p['data_point']} {p['aggregate']} over [{p['window_start_ms']}, "
            f"{p['window_end_ms']}) of {p['count']} samples: {p['value']}"
        )
    for r in j.get("encrypted_kpi", []):
        print(f"  encrypted kpi row {r['table']} @ {r['ts_ms']}: {r['bytes']} bytes")


def pins_from_args(args):
    pinned = {}
    for pin in args.pin:
        site, sep, key = pin.partition("=")
        if not sep:
            raise SystemExit(f"--pin {pin!r}: expected SITE=ed25519:<base64>")
        pinned[site] = decode_key(key, "ed25519:", f"--pin {site}")
    if args.site_config:
        with open(args.site_config, "rb") as f:
            config = tomllib.load(f)
        for i, p in enumerate(config.get("partners", [])):
            pinned[p["site"]] = decode_key(
                p["signing_key"], "ed25519:", f"{args.site_config}: partners[{i}].signing_key"
            )
    return pinned


async def run(args):
    pinned = pins_from_args(args)
    sealing_secret = None
    if args.key:
        site, signing_seed, sealing_secret = load_key_file(args.key)
        if site != args.primary:
            raise SystemExit(f"{args.key} holds the keys of site {site!r}, not of {args.primary!r}")
        # The primary's own batches are signed with its own key.
        pinned.setdefault(site, bytes(SigningKey(signing_seed).verify_key))
    if not pinned:
        raise SystemExit("no sender key pinned: pass --pin SITE=ed25519:..., --site-config or --key")
    consumer = Consumer(args.primary, pinned, sealing_secret)

    def emit(obj, human):
        if args.json:
            print(json.dumps(obj), flush=True)
        else:
            human()
            sys.stdout.flush()

    done = asyncio.Event()
    received = 0

    async def on_message(msg):
        nonlocal received
        try:
            batch = consumer.open(msg.data, msg.subject)
            emit(as_json(batch, msg.subject), lambda: print_human(batch, msg.subject))
        except Rejected as r:
            emit(
                {"event": "rejected", "subject": msg.subject, "reason": str(r)},
                lambda: print(f"{msg.subject}  REJECTED: {r}"),
            )
        received += 1
        if args.count and received >= args.count:
            done.set()

    password = args.password or os.environ.get("NUBIS_NATS_PASSWORD")
    credentials = {"user": args.user, "password": password} if args.user else {}
    nc = await nats.connect(args.server, name="nubis-python-subscriber", **credentials)
    subject = f"nubis.mon.{args.primary}.>"
    await nc.subscribe(subject, cb=on_message)
    await nc.flush()
    emit({"event": "subscribed", "subject": subject}, lambda: print(f"subscribed to {subject}"))
    try:
        if args.timeout:
            await asyncio.wait_for(done.wait(), args.timeout)
        else:
            await done.wait()
    except asyncio.TimeoutError:
        print(f"timed out after {args.timeout}s with {received} messages", file=sys.stderr)
        return 1
    finally:
        await nc.drain()
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="nats://127.0.0.1:4222", help="NATS URL of a site's server")
    parser.add_argument(
        "--user", help="NATS user; a site's `operator` user may watch monitoring subjects",
    )
    parser.add_argument(
        "--password", help="its password (or set NUBIS_NATS_PASSWORD, which stays out of `ps`)",
    )
    parser.add_argument("--primary", required=True, help="primary site whose VMs to watch")
    parser.add_argument(
        "--pin", action="append", default=[], metavar="SITE=ed25519:KEY",
        help="pin a sender's signing key (repeatable)",
    )
    parser.add_argument("--site-config", help="pin the [[partners]] keys of this site.toml")
    parser.add_argument("--key", help="the primary's key file (nubis keys gen) to open sealed batches")
    parser.add_argument("--count", type=int, default=0, help="exit after this many messages")
    parser.add_argument("--timeout", type=float, default=0, help="give up after this many seconds")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args()
    try:
        sys.exit(asyncio.run(run(args)))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
