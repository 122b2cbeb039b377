"""``fednca keys``: generate a site's or the coordinator's keys, and show public keys.

``generate --role site --out DIR`` writes ``signing.key`` (0600) and ``signing.pub``;
``--role coordinator`` also writes ``box.key`` (0600) and ``box.pub``. The folder is made 0700.
``round-keys DIR --site SITE`` adds a batch of X25519 round keys for secure aggregation beside the
site's signing key: ``round-keys.key`` (0600, the secrets) and ``round-keys.pub`` (the public halves
signed with ``signing.key``), the file the operator hands to ``fednca coordinator round-keys``.
``show DIR`` prints each public key in hex with its key id: what an operator copies into the
site registry (a site's ``signing.pub``) or hands to every site (the coordinator's two).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fednca import keys as k
from fednca.errors import FedNCAError


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    gen = sub.add_parser("generate", help="generate new keys into a folder")
    gen.add_argument("--role", choices=["site", "coordinator"], required=True)
    gen.add_argument("--out", type=Path, required=True, help="key folder (made with mode 0700)")
    gen.add_argument("--force", action="store_true", help="replace keys already there")
    gen.add_argument("--json", action="store_true", help="print the new public keys as one JSON object")
    rk = sub.add_parser("round-keys", help="make a site's signed batch of round keys (secure aggregation)")
    rk.add_argument("folder", type=Path, help="the site's key folder (holds signing.key)")
    rk.add_argument("--site", required=True, help="the site id the keys are signed for")
    rk.add_argument("--count", type=int, default=16, help="round keys in the batch (default %(default)s)")
    rk.add_argument("--force", action="store_true", help="replace a batch already there")
    show = sub.add_parser("show", help="print the public keys and key ids in a folder")
    show.add_argument("folder", type=Path)
    show.add_argument("--json", action="store_true", help="one JSON object instead of lines")


def _public_keys(folder: Path) -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {}
    readers = {k.SIGNING_PUB_FILE: ("signing (Ed25519)", k.read_verify_key),
               k.BOX_PUB_FILE: ("box (X25519)", k.read_box_public_key)}
    for name, (what, read) in readers.items():
        if (folder / name).exists():
            key = read(folder / name)
            found[name] = {"kind": what, "public": bytes(key).hex(), "key_id": k.key_id(key)}
    if not found:
        raise FedNCAError(f"{folder}: no {k.SIGNING_PUB_FILE} or {k.BOX_PUB_FILE} here")
    return found


def _round_keys(args: argparse.Namespace) -> int:
    from nacl.utils import random

    from fednca import round_keys as rk
    from fednca.atomic import write_text
    from fednca.topics import check_id

    site = check_id(args.site, what="site")
    secret_path, public_path = args.folder / rk.ROUND_KEYS_SECRET_FILE, args.folder / rk.ROUND_KEYS_PUBLIC_FILE
    if secret_path.exists() and not args.force:
        raise FedNCAError(f"{secret_path}: already exists; refusing to replace round keys (pass --force)")
    if not 1 <= args.count <= 1024:
        raise FedNCAError(f"--count must be 1..1024, got {args.count}")
    signing = k.read_site_keys(args.folder).signing
    secrets, public = rk.make_batch(site=site, signing_key=signing, start=0, count=args.count, rand=random)
    rk.write_secrets(secret_path, secrets)
    write_text(public_path, rk.batch_to_json(site, public), mode=0o644)
    print(f"{args.count} round keys of site {site!r}: secrets in {secret_path} (0600), signed public batch in "
          f"{public_path}; give the coordinator: fednca coordinator round-keys DIR {site} {public_path.name}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.action == "round-keys":
        return _round_keys(args)
    if args.action == "generate":
        if args.role == "site":
            k.write_site_keys(args.out, k.SiteKeys.generate(), force=args.force)
        else:
            k.write_coordinator_keys(args.out, k.CoordinatorKeys.generate(), force=args.force)
        folder = args.out
    else:
        folder = args.folder
    keys = _public_keys(folder)
    if getattr(args, "json", False):
        print(json.dumps({"folder": str(folder), "keys": keys}, sort_keys=True))
        return 0
    role = "coordinator" if k.BOX_PUB_FILE in keys else "site"
    print(f"{folder} ({role} keys)")
    for name, info in keys.items():
        print(f"  {name:<12} {info['kind']:<18} id {info['key_id']}  {info['public']}")
    return 0
