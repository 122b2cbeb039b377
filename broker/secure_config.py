"""``secure_aggregation`` in coordinator.yaml: off by default; ``on``, or a mapping of its settings.

    secure_aggregation: on            # every setting at its default
    secure_aggregation:               # or each named
      enabled: on
      bound: 0.5                      # B: each delta value is clipped to [-B, B] by the site
      max_weight: 200                 # a site's weight is min(samples, max_weight)
      threshold: null                 # t of the Shamir sharing (at least 2); null: half the roster plus one
      unmask_timeout_s: 600           # after the close, how long answers are waited for
      resend_s: 60                    # how often an unanswered unmask request is published again

The fixed point's fractional bits are the finest the roster, the bound and the weight cap allow
(:func:`fednca.fixedpoint.largest_frac_bits`), in the ring Z_{2^32}, and are announced each round.

:func:`secure_problems` is the configuration check of the rules that cannot run on a masked sum
(docs/secure-aggregation.md, "What is refused"): median and trimmed mean need every single update,
and so do the coordinator's per-update bounds (a fixed or median-relative norm clip, the cap of
weights relative to the round's median); the bound ``B`` clipped at the site is what limits a
site's influence instead. Buffered asynchronous rounds are refused too: their staleness weights
are per update, and a masked sum has no per-update weight to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fednca.aggregate import AggregationConfig
from fednca.errors import ConfigError
from fednca.fixedpoint import largest_frac_bits

_KEYS = ("enabled", "bound", "max_weight", "threshold", "unmask_timeout_s", "resend_s")


@dataclass(frozen=True)
class SecureAggregationConfig:
    enabled: bool = False
    bound: float = 0.5
    max_weight: int = 200
    threshold: int | None = None
    unmask_timeout_s: float = 600.0
    resend_s: float = 60.0
    ring_bits: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError("secure_aggregation.enabled", f"must be on or off, got {self.enabled!r}")
        if isinstance(self.bound, bool) or not isinstance(self.bound, (int, float)) or not (
                math.isfinite(self.bound) and 0 < self.bound <= 1e3):
            raise ConfigError("secure_aggregation.bound", f"must be a number in (0, 1000], got {self.bound!r}")
        if isinstance(self.max_weight, bool) or not isinstance(self.max_weight, int) or not 1 <= self.max_weight <= 10**6:
            raise ConfigError("secure_aggregation.max_weight", f"must be a whole number 1..1000000, got {self.max_weight!r}")
        t = self.threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 2):
            # One answer would unmask a lone survivor's update: the sum of one is that update.
            raise ConfigError("secure_aggregation.threshold", f"must be a whole number >= 2 or null, got {t!r}")
        for name in ("unmask_timeout_s", "resend_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ConfigError(f"secure_aggregation.{name}", f"must be a number > 0, got {v!r}")

    def threshold_for(self, roster: int) -> int:
        """t for a roster of ``roster`` sites: the configured one (at most the roster), else n // 2 + 1."""
        return min(self.threshold, roster) if self.threshold is not None else roster // 2 + 1

    def frac_bits_for(self, roster: int) -> int:
        return largest_frac_bits(bound=float(self.bound), n_sites=roster, max_weight=self.max_weight,
                                 ring_bits=self.ring_bits)

    def to_yaml(self) -> Any:
        if self == SecureAggregationConfig(enabled=self.enabled):
            return self.enabled
        return {k: getattr(self, k) for k in _KEYS}


def parse_secure(value: Any) -> SecureAggregationConfig:
    """The setting from YAML: a bool (``on``/``off``) or a mapping of :data:`_KEYS`."""
    if value is None:
        return SecureAggregationConfig()
    if isinstance(value, bool):
        return SecureAggregationConfig(enabled=value)
    if not isinstance(value, dict):
        raise ConfigError("secure_aggregation", f"must be on, off or a mapping, got {type(value).__name__}")
    unknown = sorted(set(map(str, value)) - set(_KEYS))
    if unknown:
        raise ConfigError(f"secure_aggregation.{unknown[0]}", f"unknown key (known here: {', '.join(_KEYS)})")
    return SecureAggregationConfig(**{"enabled": True, **value})


def secure_problems(secure: SecureAggregationConfig, aggregation: AggregationConfig,
                    rounds_mode: str) -> list[tuple[str, str]]:
    """(key, why) for each setting that cannot run with secure aggregation on."""
    if not secure.enabled:
        return []
    why = "needs single updates, which secure aggregation hides from the coordinator (docs/secure-aggregation.md)"
    problems = []
    if aggregation.method != "fedavg":
        problems.append(("aggregation.method", f"{aggregation.method} {why}; use fedavg"))
    for name in ("clip_norm", "median_norm_factor", "max_weight_ratio"):
        if getattr(aggregation, name) is not None:
            problems.append((f"aggregation.{name}", f"a per-update bound {why}; set it to null (the sites clip "
                             "to secure_aggregation.bound)"))
    if rounds_mode == "async":
        problems.append(("round.mode", "buffered asynchronous rounds weigh each update by its staleness, which a "
                         "masked sum cannot; secure aggregation runs with synchronous rounds only"))
    return problems
