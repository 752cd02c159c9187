"""How hard a deployment writes to Secrets Manager, against what AWS recommends and allows.

Every compare-and-swap write is one ``PutSecretValue`` (a new version of the secret) and one
``UpdateSecretVersionStage``. A refresh takes two writes: the lease, then the new tokens.
AWS's guidance (https://docs.aws.amazon.com/secretsmanager/latest/userguide/reference_limits.html):

- call ``PutSecretValue`` on one secret at most once every 10 minutes, sustained: Secrets
  Manager only deletes old versions once there are more than 100 and they are a day old, so a
  faster writer runs into the quota of versions per secret;
- ``PutSecretValue``, ``UpdateSecret``, ``UpdateSecretVersionStage`` and the replication
  calls share a quota of 50 requests per second per Region (not adjustable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta

__all__ = [
    "REGION_WRITE_CALLS_PER_SECOND",
    "SECRET_PUTS_PER_DAY",
    "WRITES_PER_REFRESH",
    "WriteRate",
    "estimate_write_rate",
]

#: One PutSecretValue per secret every 10 minutes: AWS's sustained-rate guidance.
SECRET_PUTS_PER_DAY = 24 * 6
#: The Region-wide quota shared by PutSecretValue and UpdateSecretVersionStage (and others).
REGION_WRITE_CALLS_PER_SECOND = 50.0
#: Store writes per refresh: the lease, then the new tokens.
WRITES_PER_REFRESH = 2
# Each store write is a PutSecretValue and an UpdateSecretVersionStage.
_CALLS_PER_WRITE = 2
_DAY = 86400.0


@dataclass(frozen=True, slots=True)
class WriteRate:
    """The steady write load of ``keys`` credentials refreshed once per ``token_lifetime``.

    A floor: conflicts between hosts and ``needs_reauth`` bookkeeping add writes.
    """

    keys: int
    token_lifetime: timedelta
    writes_per_refresh: int
    #: PutSecretValue calls each secret gets per day.
    puts_per_secret_per_day: float
    #: PutSecretValue and UpdateSecretVersionStage calls per second, all keys together.
    write_calls_per_second: float

    @property
    def exceeds_secret_guidance(self) -> bool:
        """Whether each secret gets more than one PutSecretValue per 10 minutes."""
        return self.puts_per_secret_per_day > SECRET_PUTS_PER_DAY

    @property
    def exceeds_region_quota(self) -> bool:
        """Whether the write calls exceed the Region's 50 per second."""
        return self.write_calls_per_second > REGION_WRITE_CALLS_PER_SECOND

    @property
    def within_guidance(self) -> bool:
        """Neither limit is exceeded."""
        return not (self.exceeds_secret_guidance or self.exceeds_region_quota)

    def describe(self) -> str:
        """One sentence for a log line: the load and the limits it breaks, if any."""
        lifetime = self.token_lifetime.total_seconds()
        load = (
            f"{self.keys} keys with {lifetime / 60:.0f}-minute tokens mean "
            f"{self.puts_per_secret_per_day:.0f} PutSecretValue calls per secret per day and "
            f"{self.write_calls_per_second:.2f} write calls per second"
        )
        broken = []
        if self.exceeds_secret_guidance:
            broken.append(
                f"AWS recommends at most {SECRET_PUTS_PER_DAY} per secret per day (one every "
                "10 minutes), or old versions pile up to the versions-per-secret quota"
            )
        if self.exceeds_region_quota:
            broken.append(
                f"the Region's quota is {REGION_WRITE_CALLS_PER_SECOND:.0f} per second "
                "(PutSecretValue and UpdateSecretVersionStage together); expect throttling"
            )
        if not broken:
            return f"{load}: within AWS's guidance"
        return f"{load}: " + "; ".join(broken)


def estimate_write_rate(
    keys: int,
    token_lifetime: timedelta | float,
    *,
    writes_per_refresh: int = WRITES_PER_REFRESH,
) -> WriteRate:
    """The write load of ``keys`` credentials whose access tokens live ``token_lifetime``.

    ``token_lifetime`` is a ``timedelta`` or seconds. Each credential is refreshed once per
    lifetime (``24 h / token_lifetime`` times a day), ``writes_per_refresh`` store writes each.
    """
    if isinstance(keys, bool) or not isinstance(keys, int) or keys < 0:
        raise ValueError(f"keys must be a non-negative int, got {keys!r}")
    seconds = (
        token_lifetime.total_seconds()
        if isinstance(token_lifetime, timedelta)
        else float(token_lifetime)
    )
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"token_lifetime must be a positive duration, got {token_lifetime!r}")
    if isinstance(writes_per_refresh, bool) or not isinstance(writes_per_refresh, int):
        raise ValueError(f"writes_per_refresh must be an int, got {writes_per_refresh!r}")
    if writes_per_refresh < 1:
        raise ValueError(f"writes_per_refresh must be at least 1, got {writes_per_refresh}")
    puts_per_secret_per_day = writes_per_refresh * _DAY / seconds
    return WriteRate(
        keys=keys,
        token_lifetime=timedelta(seconds=seconds),
        writes_per_refresh=writes_per_refresh,
        puts_per_secret_per_day=puts_per_secret_per_day,
        write_calls_per_second=keys * writes_per_refresh * _CALLS_PER_WRITE / seconds,
    )
