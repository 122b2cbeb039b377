"""The coordinator's signed messages (docs/wire.md): the round announcement, which carries the
global model and the round's training configuration, and the receipt that answers an update.

Both are signed with the coordinator's key and readable by anyone on the topic; neither is
sealed. ``open_*`` verifies the signature before it parses a field.

An announcement carries the global model whole (float32), or as a delta: the optional field
``base_sha256`` names the model the delta applies to, and the tensors are a q8 delta
(:mod:`fednca.wire_q8`). The receiver passes the models it holds (``held``); one whose sha256 is
the base gets the delta added (:func:`fednca.quantise.apply`), and the result must have the signed
``model_sha256``, so a delta can only ever give the coordinator's own model. A receiver holding
neither the base nor the new model is refused with ``wrong_base_model`` and fetches the whole
model (the retained ``model`` topic). So is one whose base plus the delta does not give the signed
sha256: its base is not the coordinator's in effect (float32 arithmetic that differs, such as
flushing subnormals to zero), and refusing it as ``malformed`` would leave it unable to take any
round announced as a delta; the whole model is then opened with every check, as any announcement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from nacl.signing import SigningKey, VerifyKey

from . import wire_q8
from .config import ModelConfig, TrainConfig
from .errors import ConfigError
from .quantise import Quantised, apply
from .rounds_vocab import Verdict
from .tensorcodec import (
    Field, Reason, WireError, code_field, config_field, format_fields, hex_field, id_field, int_field, malformed,
    model_sha256, parse_fields, word_field, write_document,
)
from .secagg_params import SecureParams, secagg_field
from .wire_envelope import (
    ANNOUNCEMENT, MAX_MESSAGE_BYTES, MAX_RECEIPT_BYTES, RECEIPT, ROUND, UPDATE_ID, VERSION, check_tensors, failer,
    float32, make_prefix, open_signed,
)


@dataclass(frozen=True)
class AnnouncementHeader:
    federation: str
    round: int
    deadline: int  # unix seconds
    quorum: int
    train: TrainConfig
    model: ModelConfig
    model_sha256: str
    key_id: str  # the coordinator signing key's id
    # Seconds from publication to the deadline, by the coordinator's clock; None in an announcement
    # of a coordinator that predates the field. Sites time the round by it, on their own clock.
    seconds_left: int | None = None
    # The model the tensors are a delta from; None when they are the whole model.
    base_sha256: str | None = None
    # How the coordinator asks sites to send their updates this round; None: as each site is configured.
    update_dtype: str | None = None
    # Buffered asynchronous rounds: an update trained this many rounds back is still judged (and
    # weighted down), so a site keeps sending it; None: a synchronous round, older updates are stale.
    max_staleness: int | None = None
    # Secure aggregation's fixed point, threshold and roster (fednca.wire_secagg); None: plain updates.
    secagg: SecureParams | None = None
    version: int = VERSION

    @property
    def published(self) -> int | None:
        """When the coordinator published it (unix seconds of its clock), if it said."""
        return None if self.seconds_left is None else self.deadline - self.seconds_left


@dataclass(frozen=True)
class Announcement:
    header: AnnouncementHeader
    tensors: Mapping[str, np.ndarray]  # the global model, float32, read-only


@dataclass(frozen=True)
class Receipt:
    federation: str
    site: str
    round: int
    update_id: str
    accepted: bool
    reason: str  # "" when accepted, else a reason code
    key_id: str
    version: int = VERSION


ANNOUNCEMENT_FIELDS: dict[str, Field] = {
    "federation": id_field, "round": ROUND, "deadline": int_field(0, 2**40), "quorum": int_field(1, 10**6),
    "train": config_field(TrainConfig), "model": config_field(ModelConfig), "model_sha256": hex_field(64),
}
# Optional fields: absent in announcements of older coordinators, parsed as strictly when present.
ANNOUNCEMENT_OPTIONAL: dict[str, Field] = {
    "seconds_left": int_field(0, 2**31 - 1), "base_sha256": hex_field(64),
    "update_dtype": word_field({e: e for e in ("float16", "float32", "q8")}), "max_staleness": int_field(0, 1000),
    "secagg": secagg_field,
}
RECEIPT_FIELDS: dict[str, Field] = {
    "federation": id_field, "site": id_field, "round": ROUND, "update_id": UPDATE_ID,
    "verdict": word_field({v.value: v for v in Verdict}), "reason": code_field,
}



def make_announcement(
    *,
    federation: str,
    round: int,
    deadline: int,
    quorum: int,
    train: TrainConfig,
    model: ModelConfig,
    tensors: Mapping[str, Any],
    signing_key: SigningKey,
    seconds_left: int | None = None,
    delta: tuple[str, Quantised] | None = None,
    update_dtype: str | None = None,
    max_staleness: int | None = None,
    secagg: SecureParams | None = None,
) -> bytes:
    """A signed round announcement carrying the global model as float32.

    ``seconds_left`` is the time from now to ``deadline`` by the coordinator's clock; a site times
    the round by it on its own clock, so a site whose clock is wrong still meets the deadline.
    ``delta`` (base sha256, quantised delta) sends the model as that delta instead: the caller
    vouches that the base plus the dequantised delta (:func:`fednca.quantise.apply`) is ``tensors``,
    whose sha256 is announced. ``update_dtype`` tells sites how to send their updates;
    ``max_staleness`` that the round is buffered and asynchronous (docs/rounds.md).
    """
    arrays = float32(tensors, "tensor")
    fields: dict[str, Any] = dict(federation=federation, round=round, deadline=deadline, quorum=quorum, train=train,
                                  model=model, model_sha256=model_sha256(arrays))
    spec = dict(ANNOUNCEMENT_FIELDS)
    optional = dict(seconds_left=seconds_left, update_dtype=update_dtype, secagg=secagg, max_staleness=max_staleness,
                    base_sha256=None if delta is None else delta[0])
    for name, value in optional.items():
        if value is not None:
            fields[name] = value
            spec[name] = ANNOUNCEMENT_OPTIONAL[name]
    _check_seconds_left(fields)
    prefix = make_prefix(ANNOUNCEMENT, signing_key.verify_key)
    sent = arrays if delta is None else wire_q8.pack(delta[1])
    body = write_document(sent, format_fields(fields, spec, "announcement"))
    return prefix + signing_key.sign(prefix + body).signature + body


def make_receipt(
    *, federation: str, site: str, round: int, update_id: str, reason: str | None, signing_key: SigningKey
) -> bytes:
    """A signed receipt: ``reason`` None means accepted, else the reason code of the refusal."""
    fields = dict(federation=federation, site=site, round=round, update_id=update_id,
                  verdict=Verdict.ACCEPTED if reason is None else Verdict.REJECTED, reason=str(reason or ""))
    prefix = make_prefix(RECEIPT, signing_key.verify_key)
    body = write_document({}, format_fields(fields, RECEIPT_FIELDS, "receipt"))
    return prefix + signing_key.sign(prefix + body).signature + body


def open_announcement(
    payload: bytes,
    *,
    coordinator_verify_key: VerifyKey | Sequence[VerifyKey],
    federation: str,
    shapes: Mapping[str, Sequence[int]] | None = None,
    min_round: int | None = None,
    max_bytes: int = MAX_MESSAGE_BYTES,
    held: Sequence[Mapping[str, Any]] = (),
) -> Announcement:
    """A verified round announcement and its float32 global model.

    ``shapes`` default to those of the announced model configuration. ``min_round`` refuses an
    older announcement (a broker replaying a stale retained message) as ``stale_round``.
    ``held`` are models the receiver has: a delta announcement needs one of them to be its base
    (or already the announced model), else it is refused as ``wrong_base_model``.
    """
    doc, kid = open_signed(payload, ANNOUNCEMENT, coordinator_verify_key, max_bytes)
    spec = {**ANNOUNCEMENT_FIELDS, **{k: f for k, f in ANNOUNCEMENT_OPTIONAL.items() if k in doc.metadata}}
    fields = parse_fields(doc.metadata, spec, "announcement")
    _check_seconds_left(fields)
    header = AnnouncementHeader(**fields, key_id=kid)
    fail = failer(header)
    if header.federation != federation:
        raise fail(Reason.WRONG_FEDERATION, f"announcement is for federation {header.federation!r}, not {federation!r}")
    if min_round is not None and header.round < min_round:
        raise fail(Reason.STALE_ROUND, f"announcement of round {header.round} is older than round {min_round}")
    if shapes is None:
        shapes = _model_shapes(header.model, fail)
    if header.base_sha256 is not None:
        return Announcement(header=header, tensors=_from_delta(doc, header, shapes, held, fail))
    if any(e.dtype != "F32" for e in doc.entries):
        raise fail(Reason.BAD_DTYPE, "the global model must travel as F32")
    tensors = check_tensors(doc, shapes, fail)
    if model_sha256(tensors) != header.model_sha256:
        raise fail(Reason.MALFORMED, "model_sha256 does not match the announced tensors")
    return Announcement(header=header, tensors=tensors)


def _from_delta(doc: Any, header: AnnouncementHeader, shapes: Mapping[str, Sequence[int]],
                held: Sequence[Mapping[str, Any]], fail: Any) -> Mapping[str, np.ndarray]:
    """The announced model from a q8 delta and the base among ``held`` (checked before any is used)."""
    if not wire_q8.is_q8(doc):
        raise fail(Reason.BAD_DTYPE, "an announcement with base_sha256 carries a q8 delta")
    delta = wire_q8.unpack(doc, shapes, fail)
    base = None
    for model in held:
        arrays = {k: np.asarray(v, dtype=np.float32) for k, v in model.items()}
        if arrays.keys() != shapes.keys() or any(a.shape != tuple(shapes[k]) for k, a in arrays.items()):
            continue
        sha = model_sha256(arrays)
        if sha == header.model_sha256:
            return _frozen(arrays)
        if sha == header.base_sha256:
            base = arrays
    if base is None:
        raise fail(Reason.WRONG_BASE_MODEL, f"announcement is a delta from model {header.base_sha256[:16]}…, "
                   "which this receiver does not hold")  # type: ignore[index]
    with np.errstate(over="ignore", invalid="ignore"):
        tensors = apply(base, delta.dequantised())
    if model_sha256(tensors) != header.model_sha256:
        raise fail(Reason.WRONG_BASE_MODEL, "the delta applied to the held base does not give the announced "
                   "model_sha256 (this receiver's float32 arithmetic differs): the whole model is needed")
    return _frozen(tensors)


def _frozen(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {k: np.array(v, dtype=np.float32, copy=True) for k, v in arrays.items()}
    for a in out.values():
        a.flags.writeable = False
    return out


def _check_seconds_left(fields: Mapping[str, Any]) -> None:
    """The publication time (deadline - seconds_left) is a unix time like the deadline: not before 1970."""
    left = fields.get("seconds_left")
    if left is not None and type(left) is int and type(fields["deadline"]) is int and left > fields["deadline"]:
        raise malformed(f"announcement field seconds_left: {left} is more than the deadline {fields['deadline']}")


def _model_shapes(cfg: ModelConfig, fail: Any) -> dict[str, tuple[int, ...]]:
    from .config import tensor_shapes

    try:
        return tensor_shapes(cfg)
    except ConfigError as e:
        raise fail(Reason.MALFORMED, f"announced model configuration: {e}") from None


def open_receipt(
    payload: bytes,
    *,
    coordinator_verify_key: VerifyKey | Sequence[VerifyKey],
    federation: str,
    topic_site: str,
    max_bytes: int = MAX_RECEIPT_BYTES,
) -> Receipt:
    """A verified receipt for ``topic_site``'s update; ``header`` of a refusal is the Receipt."""
    doc, kid = open_signed(payload, RECEIPT, coordinator_verify_key, max_bytes)
    if doc.entries:
        raise malformed("a receipt carries no tensors")
    fields = parse_fields(doc.metadata, RECEIPT_FIELDS, "receipt")
    verdict = fields.pop("verdict")
    if (verdict == Verdict.ACCEPTED) != (fields["reason"] == ""):
        raise malformed("a receipt has a reason code exactly when it is a rejection")
    receipt = Receipt(**fields, accepted=verdict == Verdict.ACCEPTED, key_id=kid)
    if receipt.federation != federation:
        raise WireError(Reason.WRONG_FEDERATION, f"receipt is for federation {receipt.federation!r}", header=receipt)
    if receipt.site != topic_site:
        raise WireError(Reason.SITE_MISMATCH, f"receipt for site {receipt.site!r} came on the topic of "
                        f"{topic_site!r}", header=receipt)
    return receipt
