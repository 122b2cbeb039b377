"""The words a federation's rounds are described with, shared by the wire codec and the round policy.

A receipt, the round log, the ``events`` topic and the saved round state all carry these codes as
plain strings; here each set of codes is one :class:`enum.StrEnum`, so a code is compared, stored
and serialised as its string value (``json.dumps(Reason.STALE_ROUND) == '"stale_round"'``) while
code that makes decisions names a member, not a literal a typo could turn into a new code.

The values are stable: they travel in receipts, logs and state files written by older versions.

* :class:`Reason`: why the wire codec refused a message (size, seal, signature, fields, tensors).
* :class:`RoundReason`: why the round policy refused an update the codec had accepted, or dropped
  one it had counted. An update refused by either carries one code of the union :data:`RejectReason`;
  the policy also uses the codec's ``UNKNOWN_SITE``, ``STALE_ROUND`` and ``WRONG_BASE_MODEL``,
  which mean the same thing whichever layer finds them.
* :class:`Verdict`: a receipt's answer; the policy gives ``ACCEPTED`` as the reason of an accepted
  update's receipt.
* :class:`RoundStatus` and :class:`CloseReason`: where a round stands, and why it closed.
"""

from __future__ import annotations

import enum
from typing import Union


class Reason(enum.StrEnum):
    """Why a message was refused. The values are stable: they travel in receipts and logs."""

    TOO_LARGE = "too_large"  # longer than the receiver's limit (checked before anything else)
    BAD_VERSION = "bad_version"  # a protocol version this receiver does not speak
    MALFORMED = "malformed"  # not a well-formed message of the expected kind
    WRONG_KEY = "wrong_key"  # made for a key the receiver does not hold or trust (rotated, unknown)
    BAD_SEAL = "bad_seal"  # the sealed box does not open with the named key
    BAD_SIGNATURE = "bad_signature"  # the signature does not verify
    UNKNOWN_SITE = "unknown_site"  # the sending site is not enrolled
    SITE_MISMATCH = "site_mismatch"  # signed by or for another site than the topic's
    WRONG_FEDERATION = "wrong_federation"
    STALE_ROUND = "stale_round"  # for another round than the open one
    WRONG_BASE_MODEL = "wrong_base_model"  # trained from another global model
    BAD_DTYPE = "bad_dtype"
    BAD_SHAPE = "bad_shape"  # tensor names or shapes differ from the model's
    NON_FINITE = "non_finite"  # a NaN or an infinity


class RoundReason(enum.StrEnum):
    """Why the round policy refused (or dropped) an update that the wire codec let through."""

    UNKNOWN_ROUND = "unknown_round"  # for a round after the current one
    ROUND_CLOSED = "round_closed"  # for the current round, which has closed
    DUPLICATE_SITE = "duplicate_site"  # the site already has another update counted in this round
    NO_SAMPLES = "no_samples"  # trained on no samples: it would weigh nothing
    SITE_REVOKED = "site_revoked"  # counted, then dropped: its site's key is no longer trusted
    # Secure aggregation (fednca.wire_secagg): a plain update where the federation aggregates
    # masked ones, or the reverse; a masked update of a site or round key the round's roster lacks.
    WRONG_UPDATE_KIND = "wrong_update_kind"
    NOT_ON_ROSTER = "not_on_roster"
    TOO_STALE = "too_stale"  # buffered rounds: trained from a model more versions back than max_staleness


RejectReason = Union[Reason, RoundReason]


def reject_reason(code: str) -> RejectReason:
    """The member of :data:`RejectReason` spelt ``code``; ValueError when there is none."""
    for kind in (Reason, RoundReason):
        try:
            return kind(code)
        except ValueError:
            pass
    raise ValueError(f"not a reason code: {code!r}")


class Verdict(enum.StrEnum):
    """A receipt's answer to an update."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"


class RoundStatus(enum.StrEnum):
    OPEN = "open"
    CLOSED = "closed"


class CloseReason(enum.StrEnum):
    """Why a round closed."""

    ALL_REPORTED = "all_reported"  # every enrolled site had an update counted
    GRACE = "grace"  # the grace period after quorum ended before the deadline
    DEADLINE = "deadline"  # the deadline came with quorum reached
    BUFFER_FULL = "buffer_full"  # buffered rounds: the buffer of updates for a new model was full
