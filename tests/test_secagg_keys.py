"""Round keys at enrolment: a site makes a signed batch beside its signing key, the coordinator
adds it to its book for a site already enrolled (no new identity), and refuses a batch that is
not the site's."""

from __future__ import annotations

import json

from fednca.round_keys import ROUND_KEYS_PUBLIC_FILE, ROUND_KEYS_SECRET_FILE, read_book, read_secrets
from fednca_app.cli import main
from fednca_broker.config import load_config
from fednca_broker.round_key_commands import book_path


def test_a_site_batch_is_made_handed_over_and_verified(tmp_path, capsys):
    site = tmp_path / "site"
    assert main(["keys", "generate", "--role", "site", "--out", str(site)]) == 0
    assert main(["keys", "round-keys", str(site), "--site", "site-a", "--count", "5"]) == 0
    assert oct((site / ROUND_KEYS_SECRET_FILE).stat().st_mode & 0o777) == "0o600"
    assert len(read_secrets(site / ROUND_KEYS_SECRET_FILE)) == 5
    assert main(["keys", "round-keys", str(site), "--site", "site-a"]) != 0  # never replaces a batch silently
    fed = tmp_path / "fed"
    assert main(["coordinator", "init", str(fed), "--federation", "fed"]) == 0
    assert main(["coordinator", "enroll", str(fed), "site-a", str(site / "signing.pub")]) == 0
    assert main(["coordinator", "enroll", str(fed), "site-b", "ab" * 32]) == 0
    capsys.readouterr()
    assert main(["coordinator", "round-keys", str(fed), "site-a", str(site / ROUND_KEYS_PUBLIC_FILE), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unused_round_keys"] == 5
    # the batch is signed by site-a's key: site-b's enrolled key does not verify it
    assert main(["coordinator", "round-keys", str(fed), "site-b", str(site / ROUND_KEYS_PUBLIC_FILE)]) != 0
    book = read_book(book_path(load_config(fed / "coordinator.yaml")))
    assert book.unused("site-a") == 5 and book.unused("site-b") == 0
