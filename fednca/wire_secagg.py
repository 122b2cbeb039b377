"""The messages of secure aggregation (docs/secure-aggregation.md), in the envelope of every
federation message (:mod:`fednca.wire_envelope`): same prefix, size limit first, key id, then seal
and signature before any field is read, then strict, bounded fields.

* ``S`` **masked update**, site -> coordinator on ``updates/<site>``, signed then sealed like an
  update. Its header holds every field of an update (:data:`fednca.wire_update.UPDATE_FIELDS`)
  plus ``weight``, ``ring_bits``, ``key_index`` (the round key it masked with) and ``refill`` (new
  signed public round keys). Tensors, as the codec's byte type I8: ``masked`` (the ring vector,
  little-endian) and ``shares`` (one sealed share of the self-mask seed per peer, in roster order).
* ``Q`` **unmask request**, coordinator -> one site on ``receipts/<site>``, signed: the round's
  survivors and missing sites, and the sealed shares the other survivors made for this site
  (``shares``, in the order of ``share_from``). Per site, because each site needs its own shares.
* ``N`` **unmask answer**, site -> coordinator on ``updates/<site>``, signed then sealed: the
  site's own self-mask seed, its share of each other survivor's seed (``share_of`` order) and its
  pairwise seed with each missing site (``pair_with`` order).

The round's parameters and roster travel in the round announcement (:mod:`fednca.secagg_params`,
the optional ``secagg`` field of :mod:`fednca.wire_round`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from nacl.public import PrivateKey, PublicKey
from nacl.signing import SigningKey, VerifyKey

from .keys import Registry, key_id
from .round_keys import RoundKeyError, SignedRoundKey
from .secagg_params import MAX_ROSTER, RosterEntry, SecureParams, secagg_field  # noqa: F401  (re-exported)
from .rounds_vocab import RoundReason
from .shamir import SHARE_BYTES
from .tensorcodec import (
    Document, Field, Reason, WireError, format_fields, id_field, int_field, malformed, parse_fields,
    read_document, word_field, write_document,
)
from .wire_envelope import (
    MAGIC, MASKED, MAX_MESSAGE_BYTES, PREFIX, SEAL_BYTES, SIGNATURE_BYTES, UNMASK_ANSWER, UNMASK_REQUEST, failer, make_prefix,
    open_sealed, open_signed, seal_signed,
)
from .wire_update import UPDATE_FIELDS, UpdateHeader

SEED_BYTES = 32
SEALED_SHARE_BYTES = 24 + 16 + SHARE_BYTES  # SecretBox nonce + tag + one Shamir share: 76 bytes
MAX_REFILL = 16
_SITE_LIST_MAX = MAX_ROSTER * 64


def kind_of(payload: bytes) -> bytes | None:
    """The kind byte of a FedNCA message, or None when it is not one (cheap, before any check)."""
    if len(payload) < PREFIX.size or payload[:4] != MAGIC:
        return None
    return bytes(payload[5:6])


# ------------------------------------------------------------------------------ small fields


def _parse_sites(raw: str) -> tuple[str, ...]:
    if raw == "":
        return ()
    sites = tuple(raw.split(","))
    for s in sites:
        id_field.parse(s)
    if len(set(sites)) != len(sites):
        raise ValueError("a site is listed twice")
    return sites


sites_field = Field(parse=_parse_sites, format=lambda v: ",".join(v), max_len=_SITE_LIST_MAX)


def _parse_refill(raw: str) -> tuple[str, ...]:
    items = tuple(raw.split(",")) if raw else ()
    if len(items) > MAX_REFILL:
        raise ValueError(f"at most {MAX_REFILL} round keys")
    return items


refill_field = Field(parse=_parse_refill, format=lambda v: ",".join(v), max_len=MAX_REFILL * 210)
RING = word_field({"16": 16, "32": 32, "64": 64})

MASKED_FIELDS: dict[str, Field] = {**UPDATE_FIELDS, "weight": int_field(1, 10**6), "ring_bits": RING,
                                   "key_index": int_field(0, 2**31 - 1), "refill": refill_field}
REQUEST_FIELDS: dict[str, Field] = {"federation": id_field, "site": id_field, "round": int_field(0, 2**31 - 1),
                                    "survivors": sites_field, "missing": sites_field, "share_from": sites_field}
ANSWER_FIELDS: dict[str, Field] = {"federation": id_field, "site": id_field, "round": int_field(0, 2**31 - 1),
                                   "site_key": UPDATE_FIELDS["site_key"], "share_of": sites_field,
                                   "pair_with": sites_field}


def _table(rows: Sequence[bytes], width: int) -> np.ndarray | None:
    """Rows of ``width`` bytes as one flat I8 tensor; None (the tensor is left out) when there are none."""
    if any(len(r) != width for r in rows):
        raise ValueError(f"every row must be {width} bytes")
    return np.frombuffer(b"".join(rows), dtype=np.int8) if rows else None


def _tensors(**tables: np.ndarray | None) -> dict[str, np.ndarray]:
    return {name: t for name, t in tables.items() if t is not None}


def _byte_rows(doc: Document, name: str, width: int, count: int, fail: Any) -> list[bytes]:
    """``count`` rows of ``width`` bytes from the flat I8 tensor ``name`` (absent when ``count`` is 0)."""
    entry = next((e for e in doc.entries if e.name == name), None)
    if entry is None and count == 0:
        return []
    if entry is None or entry.dtype != "I8" or entry.shape != (count * width,):
        raise fail(Reason.BAD_SHAPE, f"{name} must be I8 bytes of {count} rows of {width}")
    raw = bytes(doc.data[entry.begin:entry.end])
    return [raw[i * width:(i + 1) * width] for i in range(count)]


def _names(doc: Document, names: set[str], what: str) -> None:
    got = {e.name for e in doc.entries}
    if not got <= names:
        raise malformed(f"{what}: tensors {sorted(got)[:4]}, expected some of {sorted(names)}")


# ------------------------------------------------------------------------------ masked update


@dataclass(frozen=True)
class MaskedUpdate:
    """A masked update whose seal and signature are good; ``header`` as an update's."""

    header: UpdateHeader
    weight: int
    ring_bits: int
    key_index: int
    refill: tuple[SignedRoundKey, ...]
    masked: np.ndarray  # ring elements, read-only
    shares: tuple[bytes, ...]  # sealed, one per peer in roster order


def max_masked_bytes(n_values: int, roster: int = MAX_ROSTER) -> int:
    return PREFIX.size + SEAL_BYTES + SIGNATURE_BYTES + 8 + 8 * n_values + roster * SEALED_SHARE_BYTES + (24 << 10)


def make_masked_update(*, federation: str, site: str, round: int, base_sha256: str, samples: int, steps: int,
                       partial: bool, metrics: Mapping[str, float], weight: int, key_index: int, masked: np.ndarray,
                       shares: Sequence[bytes], refill: Sequence[SignedRoundKey], signing_key: SigningKey,
                       coordinator_box: PublicKey, update_id: str | None = None) -> bytes:
    """A site's masked update, signed with its key, then sealed to the coordinator's box key."""
    ring_bits = masked.dtype.itemsize * 8
    if masked.dtype.kind != "u" or ring_bits not in (16, 32, 64) or masked.ndim != 1:
        raise ValueError(f"masked must be a 1-D unsigned ring vector, got {masked.dtype} {masked.shape}")
    fields = dict(federation=federation, site=site, round=round, base_sha256=base_sha256,
                  update_id=secrets.token_hex(16) if update_id is None else update_id,
                  site_key=key_id(signing_key.verify_key), samples=samples, steps=steps, partial=partial,
                  metrics=metrics, weight=weight, ring_bits=ring_bits, key_index=key_index,
                  refill=tuple(e.to_text() for e in refill))
    tensors = _tensors(masked=np.ascontiguousarray(masked, dtype=masked.dtype.newbyteorder("<")).view(np.int8),
                       shares=_table(list(shares), SEALED_SHARE_BYTES))
    body = write_document(tensors, format_fields(fields, MASKED_FIELDS, "masked update"))
    return seal_signed(MASKED, body, signing_key, coordinator_box)


def verify_masked(payload: bytes, *, topic_site: str, coordinator_keys: PrivateKey | Sequence[PrivateKey],
                  registry: Registry, max_bytes: int = MAX_MESSAGE_BYTES) -> MaskedUpdate:
    """Unseal, verify with ``topic_site``'s enrolled key, parse: a masked update with an authenticated
    header; its round, roster and lengths are :func:`check_masked`'s."""
    body, verify_key, kid_bytes = open_sealed(payload, MASKED, topic_site=topic_site,
                                              coordinator_keys=coordinator_keys, registry=registry, max_bytes=max_bytes)
    doc, kid = read_document(body), kid_bytes.hex()
    fields = parse_fields(doc.metadata, MASKED_FIELDS, "masked update")
    extra = {k: fields.pop(k) for k in ("weight", "ring_bits", "key_index", "refill")}
    header = UpdateHeader(**fields, coordinator_key=kid)
    fail = failer(header)
    if header.site != topic_site:
        raise fail(Reason.SITE_MISMATCH, f"masked update names site {header.site!r} but came from {topic_site!r}")
    if header.site_key != key_id(verify_key):
        raise fail(Reason.MALFORMED, f"masked update names signing key {header.site_key}, verified with {key_id(verify_key)}")
    _names(doc, {"masked", "shares"}, "masked update")
    item = np.dtype(f"<u{extra['ring_bits'] // 8}")
    entry = next((e for e in doc.entries if e.name == "masked"), None)
    if entry is None or entry.dtype != "I8" or len(entry.shape) != 1 or entry.shape[0] % item.itemsize:
        raise fail(Reason.BAD_SHAPE, f"masked must be I8 bytes of {item.itemsize}-byte ring elements")
    masked = np.frombuffer(doc.data, dtype=item, count=entry.shape[0] // item.itemsize, offset=entry.begin)
    share_entry = next((e for e in doc.entries if e.name == "shares"), None)
    count = 0 if share_entry is None or len(share_entry.shape) != 1 else share_entry.shape[0] // SEALED_SHARE_BYTES
    shares = tuple(_byte_rows(doc, "shares", SEALED_SHARE_BYTES, count, fail))
    try:
        refill = tuple(SignedRoundKey.from_text(topic_site, t) for t in extra["refill"])
        for key in refill:
            key.verify(verify_key)
    except RoundKeyError as e:
        raise fail(Reason.MALFORMED, f"refill: {e}") from None
    return MaskedUpdate(header=header, weight=extra["weight"], ring_bits=extra["ring_bits"],
                        key_index=extra["key_index"], refill=refill, masked=masked, shares=shares)


def check_masked(update: MaskedUpdate, *, params: SecureParams, n_values: int) -> None:
    """The masked update fits the round's roster and encoding: raise a WireError naming what does not."""
    h, fail = update.header, failer(update.header)
    entry = params.entry(h.site)
    if entry is None:
        raise fail(RoundReason.NOT_ON_ROSTER, f"site {h.site!r} is not on the roster of round {h.round}")
    if update.key_index != entry.key_index:
        raise fail(RoundReason.NOT_ON_ROSTER, f"masked with round key {update.key_index}, the roster names {entry.key_index}")
    if update.ring_bits != params.fixed_point.ring_bits:
        raise fail(Reason.BAD_DTYPE, f"ring of {update.ring_bits} bits, the round announced {params.fixed_point.ring_bits}")
    if update.masked.shape != (n_values,):
        raise fail(Reason.BAD_SHAPE, f"masked vector of {update.masked.shape[0]} values, the model has {n_values}")
    if update.weight != min(h.samples, params.max_weight):
        raise fail(Reason.MALFORMED, f"weight {update.weight} is not min(samples {h.samples}, max_weight {params.max_weight})")
    if len(update.shares) != len(params.roster) - 1:
        raise fail(Reason.BAD_SHAPE, f"{len(update.shares)} sealed shares for {len(params.roster) - 1} peers")


# ------------------------------------------------------------------------------ unmask request


@dataclass(frozen=True)
class UnmaskRequest:
    federation: str
    site: str  # the site it is addressed to
    round: int
    survivors: tuple[str, ...]
    missing: tuple[str, ...]
    shares: Mapping[str, bytes]  # survivor -> the sealed share it made for this site
    key_id: str


def make_unmask_request(*, federation: str, site: str, round: int, survivors: Sequence[str], missing: Sequence[str],
                        shares: Mapping[str, bytes], signing_key: SigningKey) -> bytes:
    """The coordinator's signed request to ``site``: survivors, missing sites, and its shares."""
    order = tuple(sorted(shares))
    fields = dict(federation=federation, site=site, round=round, survivors=tuple(survivors), missing=tuple(missing),
                  share_from=order)
    body = write_document(_tensors(shares=_table([shares[s] for s in order], SEALED_SHARE_BYTES)),
                          format_fields(fields, REQUEST_FIELDS, "unmask request"))
    prefix = make_prefix(UNMASK_REQUEST, signing_key.verify_key)
    return prefix + signing_key.sign(prefix + body).signature + body


def open_unmask_request(payload: bytes, *, coordinator_verify_key: VerifyKey | Sequence[VerifyKey], federation: str,
                        site: str, max_bytes: int = MAX_MESSAGE_BYTES) -> UnmaskRequest:
    """A verified unmask request for ``site``: signature first, then every field."""
    doc, kid = open_signed(payload, UNMASK_REQUEST, coordinator_verify_key, max_bytes)
    f = parse_fields(doc.metadata, REQUEST_FIELDS, "unmask request")
    _names(doc, {"shares"}, "unmask request")
    rows = _byte_rows(doc, "shares", SEALED_SHARE_BYTES, len(f["share_from"]), lambda r, w: WireError(r, w))
    request = UnmaskRequest(federation=f["federation"], site=f["site"], round=f["round"], survivors=f["survivors"],
                            missing=f["missing"], shares=dict(zip(f["share_from"], rows)), key_id=kid)
    if request.federation != federation:
        raise WireError(Reason.WRONG_FEDERATION, f"unmask request is for federation {request.federation!r}")
    if request.site != site:
        raise WireError(Reason.SITE_MISMATCH, f"unmask request is addressed to {request.site!r}, not {site!r}")
    if not set(request.shares) <= set(request.survivors):
        raise malformed("unmask request carries shares from sites that are not survivors")
    return request


# ------------------------------------------------------------------------------ unmask answer


@dataclass(frozen=True)
class UnmaskAnswer:
    federation: str
    site: str
    round: int
    self_seed: bytes
    shares: Mapping[str, bytes]  # survivor -> this site's Shamir share of its self-mask seed (36 bytes)
    pair_seeds: Mapping[str, bytes]  # missing site -> the pairwise seed of this site with it


def make_unmask_answer(*, federation: str, site: str, round: int, self_seed: bytes, shares: Mapping[str, bytes],
                       pair_seeds: Mapping[str, bytes], signing_key: SigningKey, coordinator_box: PublicKey) -> bytes:
    """A survivor's answer, signed with its key, then sealed to the coordinator."""
    share_of, pair_with = tuple(sorted(shares)), tuple(sorted(pair_seeds))
    fields = dict(federation=federation, site=site, round=round, site_key=key_id(signing_key.verify_key),
                  share_of=share_of, pair_with=pair_with)
    tensors = _tensors(self_seed=_table([self_seed], SEED_BYTES), shares=_table([shares[s] for s in share_of], SHARE_BYTES),
                       pair_seeds=_table([pair_seeds[s] for s in pair_with], SEED_BYTES))
    body = write_document(tensors, format_fields(fields, ANSWER_FIELDS, "unmask answer"))
    return seal_signed(UNMASK_ANSWER, body, signing_key, coordinator_box)


def open_unmask_answer(payload: bytes, *, topic_site: str, coordinator_keys: PrivateKey | Sequence[PrivateKey],
                       registry: Registry, federation: str, max_bytes: int = MAX_MESSAGE_BYTES) -> UnmaskAnswer:
    """A verified answer from ``topic_site``; whether it fits the request is the coordinator's check."""
    body, verify_key, _ = open_sealed(payload, UNMASK_ANSWER, topic_site=topic_site,
                                      coordinator_keys=coordinator_keys, registry=registry, max_bytes=max_bytes)
    doc = read_document(body)
    f = parse_fields(doc.metadata, ANSWER_FIELDS, "unmask answer")
    if f["site"] != topic_site:
        raise WireError(Reason.SITE_MISMATCH, f"unmask answer names site {f['site']!r} but came from {topic_site!r}")
    if f["site_key"] != key_id(verify_key):
        raise malformed(f"unmask answer names signing key {f['site_key']}, verified with {key_id(verify_key)}")
    if f["federation"] != federation:
        raise WireError(Reason.WRONG_FEDERATION, f"unmask answer is for federation {f['federation']!r}")
    _names(doc, {"self_seed", "shares", "pair_seeds"}, "unmask answer")
    fail = lambda r, w: WireError(r, w)  # noqa: E731
    seed = _byte_rows(doc, "self_seed", SEED_BYTES, 1, fail)[0]
    shares = _byte_rows(doc, "shares", SHARE_BYTES, len(f["share_of"]), fail)
    pairs = _byte_rows(doc, "pair_seeds", SEED_BYTES, len(f["pair_with"]), fail)
    return UnmaskAnswer(federation=f["federation"], site=f["site"], round=f["round"], self_seed=seed,
                        shares=dict(zip(f["share_of"], shares)), pair_seeds=dict(zip(f["pair_with"], pairs)))
