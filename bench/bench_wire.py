"""Update decode-and-verify throughput on one core: unseal, verify, parse and check; and the
bytes a site moves per round in each wire format.

Opens distinct sealed updates of the default model (as the coordinator does for each message on
``updates/+``) for a fixed time and prints one JSON object; ``--out`` also writes it to a file.
The encode side (sign and seal, what a site does once per round) is measured the same way.

    .venv/bin/python bench/bench_wire.py --seconds 3
    .venv/bin/python bench/bench_wire.py --bytes      # only the per-round bytes, no timing

The per-round bytes are the lengths of real messages of the default model (signed, sealed),
for each combination of update encoding (float16, q8) and model down (whole, q8 delta):
``model_and_update`` is the update payload up plus the round announcement payload down; ``all``
adds what else a site exchanges in a round at MQTT level: each PUBLISH packet's header and topic,
the QoS 1 acknowledgements both ways, the signed receipt, and one status message (a training
site's telemetry as the daemon writes it; a site sends one per telemetry interval, so scale by
the rounds' length). A round announced as a delta costs a site that missed rounds the whole
model once more (``fallback_whole_model``); the first round always goes whole.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import nacl
from benchlib import emit

from fednca import wire
from fednca_app.commands.wire import FEDERATION, SITE, sample


def _rate(work: Callable[[int], object], seconds: float) -> tuple[float, int]:
    """Calls per second of ``work(i)`` over at least ``seconds`` (after a short warm-up)."""
    for i in range(20):
        work(i)
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(50):
            work(count)
            count += 1
    return count / elapsed, count


PUBACK = 4  # an MQTT 3.1.1/5 PUBACK without properties


def _status_sample() -> bytes:
    """A training site's status message as the daemon publishes it (every field the daemon fills)."""
    from fednca_daemon.telemetry import Snapshot, status_json

    return status_json(Snapshot(site=SITE, version="0.9.0", time=1_900_000_000.5, state="training", round=17,
                                steps=120, planned=300, samples_per_s=3.1, chunk_s=5.0, cpu_percent=97.5,
                                rss_bytes=142_000_000, memory_percent=14.2, temperature_c=61.3,
                                bytes_sent=1_234_567, bytes_received=2_345_678, outbox=0,
                                last_receipt="accepted", clock_offset_s=0.4))


def per_round_bytes() -> dict[str, object]:
    """Bytes per site per round, from the lengths of real messages, for each wire option."""
    from fednca.quantise import apply, quantise_with_feedback
    from fednca.topics import Topics
    from fednca.transport.base import publish_packet_size

    s = sample("fednca")
    topics = Topics(FEDERATION)
    opened = wire.open_announcement(s.announcement, coordinator_verify_key=s.coordinator.signing.verify_key,
                                    federation=FEDERATION)
    base = dict(opened.tensors)
    change = s.delta(seed=1)
    sent, _ = quantise_with_feedback(change, None)
    new = apply(base, sent.dequantised())
    h = opened.header
    fields = dict(federation=FEDERATION, round=2, deadline=1_900_000_000, quorum=3, train=h.train, model=h.model,
                  signing_key=s.coordinator.signing, seconds_left=3600)
    receipt = wire.make_receipt(federation=FEDERATION, site=SITE, round=2, update_id="0" * 32, reason=None,
                                signing_key=s.coordinator.signing)
    status = _status_sample()
    rows = {}
    for update_dtype in ("float16", "q8"):
        for model_delta in ("off", "q8"):
            told = None if (update_dtype, model_delta) == ("float16", "off") else update_dtype  # today: not told
            whole = wire.make_announcement(**fields, tensors=new, update_dtype=told)
            down = whole if model_delta == "off" else wire.make_announcement(
                **fields, tensors=new, update_dtype=told, delta=(wire.model_sha256(base), sent))
            up = s.update(dtype=update_dtype, delta=change, round=2, base_sha256=wire.model_sha256(new))
            packets = [publish_packet_size(topics.updates(SITE), len(up), 1),
                       publish_packet_size(topics.round, len(down), 1),
                       publish_packet_size(topics.receipts(SITE), len(receipt), 1),
                       publish_packet_size(topics.status(SITE), len(status), 1)]
            alone = len(up) + len(down)
            everything = sum(packets) + PUBACK * len(packets)
            rows[f"update_{update_dtype}+model_{'whole' if model_delta == 'off' else 'delta_q8'}"] = {
                "update": len(up), "announcement": len(down), "model_and_update": alone,
                "model_and_update_mib": round(alone / 2**20, 4), "all": everything,
                "all_mib": round(everything / 2**20, 4),
                "fallback_whole_model": len(whole) if model_delta != "off" else 0,
            }
    return {"bench": "wire_bytes", "receipt": len(receipt), "status": len(status), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0, help="measuring time per figure")
    p.add_argument("--updates", type=int, default=200, help="distinct updates cycled through")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32", "q8"])
    p.add_argument("--bytes", action="store_true", help="only the bytes per site per round, no timing")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.bytes:
        emit(per_round_bytes(), args.out)
        return 0
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    s = sample("fednca")
    updates = [s.update(dtype=args.dtype, seed=i) for i in range(args.updates)]

    def decode(i: int) -> object:
        return wire.open_update(
            updates[i % len(updates)], topic_site=SITE, coordinator_keys=[s.coordinator.box],
            registry=s.registry, federation=FEDERATION, round=1, base_sha256=s.base_sha256, shapes=s.shapes,
            max_bytes=wire.max_update_bytes(s.shapes),
        )

    delta = s.delta(seed=0)

    def encode(i: int) -> object:
        return s.update(dtype=args.dtype, delta=delta)

    decode_rate, decoded = _rate(decode, args.seconds)
    encode_rate, encoded = _rate(encode, args.seconds / 2)
    result = {
        "bench": "wire",
        "dtype": args.dtype,
        "update_bytes": len(updates[0]),
        "decode_verify_per_s": round(decode_rate, 1),
        "decode_us": round(1e6 / decode_rate, 1),
        "decoded": decoded,
        "encode_sign_seal_per_s": round(encode_rate, 1),
        "encoded": encoded,
        "cores": 1,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "pynacl": nacl.__version__,
    }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
