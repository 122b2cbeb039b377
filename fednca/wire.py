"""The federation's messages: round announcements, updates and receipts (docs/wire.md).

Every message starts with a 16-byte prefix::

    magic "FNCA" | version u8 | kind u8 ("A", "U" or "R") | flags u16 = 0 | key id (8 bytes)

    announcement, receipt:  prefix | Ed25519 signature (64) | document
    update:                 prefix | SealedBox(Ed25519 signature (64) | document)

The signature covers ``prefix || document``, so the kind, the version and the key id are signed
too. The key id names the key the receiver needs: the coordinator's signing key for announcements
and receipts, the coordinator's box key an update is sealed to. The document is a safetensors
document (:mod:`fednca.tensorcodec`) whose string metadata holds the header fields.

Opening a message checks, in order: size (before anything else), prefix, key id, seal, signature,
then the document and its fields, then what the receiver expects. Every refusal is one
:class:`WireError` with a stable :class:`Reason`; refusals after the signature carry the
authenticated header. An update opens in two steps so the coordinator can answer a stale update
with a receipt: :func:`verify_update` (authenticated header) then :func:`check_update` (round,
base model, tensors); :func:`open_update` does both.

The code follows the same lines: :mod:`fednca.wire_envelope` (prefix, size, keys, signature,
tensor checks), :mod:`fednca.wire_update` (the site's sealed update) and
:mod:`fednca.wire_round` (the coordinator's announcement and receipt). An update, and an
announced model (as a delta from the previous one), may also travel as 8-bit values with a scale
per tensor: :mod:`fednca.quantise` and the ``q8`` layout of :mod:`fednca.wire_q8`. This module is
the one place the rest of the project imports them from.
"""

from __future__ import annotations

from .tensorcodec import Reason, WireError, model_sha256
from .wire_envelope import MAX_MESSAGE_BYTES, MAX_RECEIPT_BYTES, VERSION
from .wire_round import (
    ANNOUNCEMENT_FIELDS, RECEIPT_FIELDS, Announcement, AnnouncementHeader, Receipt, make_announcement, make_receipt,
    open_announcement, open_receipt,
)
from .wire_update import (
    UPDATE_DTYPES, UPDATE_ENCODINGS, UPDATE_FIELDS, Update, UpdateHeader, VerifiedUpdate, check_update, make_update, max_update_bytes,
    open_update, verify_update,
)

__all__ = [
    "ANNOUNCEMENT_FIELDS", "Announcement", "AnnouncementHeader", "MAX_MESSAGE_BYTES", "MAX_RECEIPT_BYTES",
    "RECEIPT_FIELDS", "Receipt", "Reason", "UPDATE_DTYPES", "UPDATE_ENCODINGS", "UPDATE_FIELDS", "Update", "UpdateHeader", "VERSION",
    "VerifiedUpdate", "WireError", "check_update", "make_announcement", "make_receipt", "make_update",
    "max_update_bytes", "model_sha256", "open_announcement", "open_receipt", "open_update", "verify_update",
]
