"""A poisoning site: an enrolled device whose owner turned hostile, run as a process of its own.

It holds what an enrolled site holds (its signing key, the coordinator's public keys, its broker
password, its daemon YAML, its phantom images) and speaks the project's wire format, so every
update it sends is well formed, signed with its enrolled key and sealed to the coordinator: only
the numbers inside are poisoned. Each round it reads the signed announcement, trains honestly on
its own images from the global model (keeping its Adam moments, as a daemon does) to get an
honest delta, then sends one attack made from that delta, the attacks taken in turn round by
round:

* ``huge``: every value 1e30 with the honest delta's sign (finite in float32, the dtype it uses);
* ``inflated``: ten times the honest delta, claiming 10**9 samples (the most the wire allows), so
  that an aggregator weighting by samples would follow it alone;
* ``flipped``: the honest delta with its sign flipped;
* ``negated_sum``: what would cancel the round if it were averaged with the others. A site sees
  the global model but never the others' updates, so it estimates their sum as ``n - 1`` times its
  own honest delta (``n`` sites in the round) and sends ``-(n - 1)`` times its honest delta.

Run as ``python hostile_support.py --config DAEMON_YAML --sites N --attacks a,b,... --out FILE``;
it appends one JSON line per update sent (round, attack, update id, samples, delta norm) to
``FILE`` and runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import sys
from pathlib import Path
from typing import Mapping

import numpy as np
import yaml

ATTACKS = ("huge", "inflated", "flipped", "negated_sum")
HUGE = 1e30  # finite in float32 (max ~3.4e38), far beyond any weight
INFLATED_SAMPLES = 10**9  # the wire's upper bound on a sample count
INFLATED_SCALE = 10.0


def poison(attack: str, honest: Mapping[str, np.ndarray], *, samples: int,
           sites: int) -> tuple[dict[str, np.ndarray], int]:
    """The poisoned (delta, claimed samples) that ``attack`` makes of an honest delta; ``sites`` is
    the number of sites in the round (the estimate behind ``negated_sum``)."""
    if attack == "huge":
        return {n: np.where(v < 0, -HUGE, HUGE).astype(np.float32) for n, v in honest.items()}, samples
    if attack == "inflated":
        return {n: (INFLATED_SCALE * v).astype(np.float32) for n, v in honest.items()}, INFLATED_SAMPLES
    if attack == "flipped":
        return {n: (-v).astype(np.float32) for n, v in honest.items()}, samples
    if attack == "negated_sum":
        return {n: (-(sites - 1) * v).astype(np.float32) for n, v in honest.items()}, samples
    raise ValueError(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}")


def _norm(delta: Mapping[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum(np.square(v.astype(np.float64))) for v in delta.values())))


def run(*, config: Path, sites: int, attacks: list[str], out: Path) -> None:
    from fednca import wire
    from fednca.keys import read_coordinator_public, read_site_keys
    from fednca.phantom import phantom_dataset
    from fednca.topics import Topics
    from fednca.train import Trainer
    from fednca.transport.mqtt import MqttClient

    daemon = yaml.safe_load(config.read_text())
    site, federation = daemon["site"], daemon["federation"]
    keys = read_site_keys(daemon["keys"]["site"])
    coordinator = read_coordinator_public(daemon["keys"]["coordinator"])
    password = Path(daemon["broker"]["password_file"]).read_text().strip()
    phantom = daemon["data"]["phantom"]
    topics = Topics(federation)
    client = MqttClient(url=daemon["broker"]["url"], client_id=f"fednca-{federation}-{site}", username=site,
                        password=password)
    if not client.connect(30):
        raise SystemExit(f"{site}: cannot connect to {daemon['broker']['url']}")
    client.subscribe(topics.round, 1)
    trainer: Trainer | None = None
    done: set[int] = set()
    while True:
        message = client.receive(1.0)
        if message is None:
            continue
        client.ack(message)
        if message.topic != topics.round or not message.payload:
            continue
        announcement = wire.open_announcement(message.payload, coordinator_verify_key=coordinator.verify,
                                              federation=federation)
        header = announcement.header
        if header.round in done:
            continue
        done.add(header.round)
        base = {n: np.array(v, dtype=np.float32) for n, v in announcement.tensors.items()}
        if trainer is None:
            data = phantom_dataset(site=phantom["site"], count=phantom["count"], size=header.model.input_size,
                                   seed=phantom["seed"])
            trainer = Trainer(model_cfg=header.model, train_cfg=header.train, data=data,
                              seed=daemon["training"]["seed"])
        trainer.set_weights(base)
        chunk = trainer.run(max_steps=trainer.batches_per_epoch * header.train.local_epochs)
        honest = {n: (w - base[n]).astype(np.float32) for n, w in trainer.weights().items()}
        attack = attacks[(header.round - 1) % len(attacks)]
        delta, samples = poison(attack, honest, samples=chunk.samples, sites=sites)
        update_id = secrets.token_hex(16)
        payload = wire.make_update(
            federation=federation, site=site, round=header.round, base_sha256=header.model_sha256, samples=samples,
            steps=chunk.steps, partial=False, metrics={}, delta=delta, signing_key=keys.signing,
            coordinator_box=coordinator.box, dtype="float32", update_id=update_id)  # fmt: skip
        client.publish(topics.updates(site), payload).result(30)
        with out.open("a") as f:
            f.write(json.dumps({"round": header.round, "attack": attack, "update_id": update_id, "samples": samples,
                                "norm": _norm(delta), "honest_norm": _norm(honest)}) + "\n")
        print(f"round {header.round}: sent {attack} ({_norm(delta):.3g} vs honest {_norm(honest):.3g})", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="the hostile site's daemon YAML")
    parser.add_argument("--sites", type=int, required=True, help="sites in a round, the hostile one included")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="attacks taken in turn, one per round")
    parser.add_argument("--out", type=Path, required=True, help="one JSON line per update sent is appended here")
    args = parser.parse_args(argv)
    attacks = args.attacks.split(",")
    for attack in attacks:
        if attack not in ATTACKS:
            parser.error(f"unknown attack {attack!r}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    run(config=args.config, sites=args.sites, attacks=attacks, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
