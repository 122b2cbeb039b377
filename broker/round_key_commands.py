"""``fednca coordinator round-keys DIR SITE FILE``: take a site's signed batch of round keys.

Secure aggregation masks each round with a round key per site (:mod:`fednca.round_keys`). A
site makes its first batch with ``fednca keys round-keys`` beside its signing key and hands over
the public file (``round-keys.pub``); this command verifies every key against the site's enrolled
signing key and adds the batch to the federation's book (``store/<federation>/round-keys.json``),
from which each round's roster is drawn. A site enrolled before secure aggregation was turned on
keeps its identity: only the batch is added. Later batches travel inside its masked updates.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fednca import keys as k
from fednca.errors import FedNCAError
from fednca.round_keys import RoundKeyError, batch_from_json, read_book, write_book
from fednca.topics import check_id

from .config import CONFIG_NAME, CoordinatorConfig, load_config
from .secure_rounds import ROUND_KEY_BOOK


def book_path(cfg: CoordinatorConfig) -> Path:
    return cfg.store_root / cfg.federation.name / ROUND_KEY_BOOK


def add_batch(cfg: CoordinatorConfig, site: str, batch_file: Path) -> int:
    """Verify ``batch_file`` against ``site``'s enrolled key and add it; returns the site's unused keys."""
    registry = k.read_registry(cfg.registry_path)
    if site not in registry.sites:
        raise FedNCAError(f"site {site!r} is not enrolled (fednca coordinator enroll first)")
    try:
        entries = batch_from_json(Path(batch_file).read_text(), where=str(batch_file))
        if any(e.site != site for e in entries):
            raise RoundKeyError(f"{batch_file}: the batch is of site {entries[0].site!r}, not {site!r}")
        path = book_path(cfg)
        path.parent.mkdir(parents=True, exist_ok=True)
        book = read_book(path).add(entries, registry)
    except (RoundKeyError, OSError) as e:
        raise FedNCAError(str(e)) from None
    write_book(path, book)
    return book.unused(site)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=Path)
    p.add_argument("site")
    p.add_argument("batch", type=Path, help="the site's round-keys.pub (fednca keys round-keys)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.folder / CONFIG_NAME)
    site = check_id(args.site, what="site")
    unused = add_batch(cfg, site, args.batch)
    if args.json:
        print(json.dumps({"site": site, "unused_round_keys": unused, "book": str(book_path(cfg))}, sort_keys=True))
    else:
        print(f"site {site!r}: {unused} unused round key(s) in {book_path(cfg)}")
        if not cfg.federation.secure_aggregation.enabled:
            print("  (secure_aggregation is off in coordinator.yaml: the keys wait until it is turned on)")
    return 0
