"""``SecretsManagerStore``: one secret per credential in AWS Secrets Manager, through boto3.

A record's version is the ``VersionId`` of the secret version labelled ``AWSCURRENT``; every
read asks for that label. Writes:

- **create**: ``CreateSecret`` with a fresh ``ClientRequestToken`` (which becomes the
  ``VersionId``) and the expiry tag; an existing name is a ``ConflictError``.
- **update** (compare-and-swap from version ``E``): ``PutSecretValue`` of a new version ``N``
  under the staging label ``CREDKEEPER_PENDING`` (not ``AWSCURRENT``, so readers do not see
  it), then ``UpdateSecretVersionStage(AWSCURRENT, MoveToVersionId=N,
  RemoveFromVersionId=E)``, which AWS performs only while ``AWSCURRENT`` is on ``E``: a
  stale ``E`` fails, and the write is a ``ConflictError``. The pending label is one fixed
  label, which each ``PutSecretValue`` takes from the version that had it: at most one
  version carries it, a crash never leaves labels behind (a secret holds at most 20), and
  a losing version is unlabelled by the next write, for AWS to delete in time. (Removing it
  explicitly failed 98% of the time in measurements, the next write having taken it
  already, and cost a fifth of all calls under contention.)
- When the answer to the move is an error that may hide a success (a server error, a
  timeout, a dropped connection), the writer settles it: each version records the version
  it replaced, so following that chain back from ``AWSCURRENT`` to the successor of ``E``
  tells whether that successor is ``N``. botocore never retries by itself: a retried move
  whose first attempt went through would answer like a lost race.
- **delete**: ``DeleteSecret`` with ``ForceDeleteWithoutRecovery``, so the key can be
  created again at once; versions never come back, so a version read before the delete
  never matches the re-created record.

``scan_due`` lists the secrets under the prefix (``ListSecrets``, name prefix filter,
paginated) and reads expiries from each secret's ``credkeeper:expires-at`` tag, written after
each successful write and naming the version it describes: a tag naming the current version
is exact; one that lags behind (the write landed, its tag update did not yet, or a slower
writer's tag overwrote a newer one) makes the scan read that secret's value instead. So a
due key is never missed, and values are fetched only for the rare stale tags.

``now()`` is AWS's clock as the ``Date`` headers of its answers show it (``_server_clock``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlsplit

# No type information ships with botocore (boto3's core, which makes boto3's clients): its
# objects are Any at this boundary.
import botocore.config  # type: ignore[import-untyped]
import botocore.exceptions  # type: ignore[import-untyped]
import botocore.loaders  # type: ignore[import-untyped]
import botocore.session  # type: ignore[import-untyped]

from credkeeper import (
    Clock,
    ConfigurationError,
    ConflictError,
    Record,
    StoreCorrupted,
    StoreError,
    StoreUnavailable,
    SystemClock,
    time_remaining,
)
from credkeeper import storekit as kit

from ._document import (
    EXPIRY_TAG,
    MAX_SECRET_BYTES,
    Stored,
    decode,
    encode,
    expiry_tag,
    parse_expiry_tag,
)
from ._names import HASHED, check_prefix, decode_name, encode_key, is_hashed_name_of
from ._rate import estimate_write_rate
from ._server_clock import ServerClock, date_header

__all__ = ["SecretsManagerStore"]

logger = logging.getLogger("credkeeper.aws")

_STORE = "Secrets Manager store"
_URL_FORM = "aws-sm://REGION/PREFIX/, e.g. aws-sm://us-east-1/credkeeper/prod/"
_REGION = re.compile(r"[a-z]{2}(?:-[a-z]+)+-[0-9]+")
_CURRENT = "AWSCURRENT"
_PENDING = "CREDKEEPER_PENDING"
_DESCRIPTION = "A credential kept by credkeeper; change it only through credkeeper."

# The store does its own retrying, so botocore makes one attempt per call. A retried stage
# move whose first attempt went through answers "stale version", like a lost race: only the
# store knows which calls are safe to repeat, and it bounds the time spent on its clock.
_CLIENT_CONFIG = botocore.config.Config(
    retries={"mode": "standard", "total_max_attempts": 1},
    connect_timeout=5,
    read_timeout=15,
    max_pool_connections=64,
    user_agent_extra="credkeeper",
)
_THROTTLING = frozenset(
    {
        "ThrottlingException",
        "LimitExceededException",
        "Throttling",
        "TooManyRequestsException",
        "RequestLimitExceeded",
    }
)
_SERVER_FAULTS = frozenset({"InternalServiceError", "InternalFailure", "ServiceUnavailable"})
_DENIED = frozenset({"AccessDeniedException", "AccessDenied"})
_BAD_CREDENTIALS = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "ExpiredTokenException",
        "ExpiredToken",
    }
)
_KMS_FAULTS = frozenset({"DecryptionFailure", "EncryptionFailure"})
_CREDENTIAL_ERRORS = (
    botocore.exceptions.NoCredentialsError,
    botocore.exceptions.PartialCredentialsError,
    botocore.exceptions.CredentialRetrievalError,
    botocore.exceptions.TokenRetrievalError,
    botocore.exceptions.SSOError,
)
_UNREACHABLE = (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)

_FIRST_BACKOFF = 0.05
_MAX_BACKOFF = 2.0
# How many writes may follow an unanswered one before the store stops following the chain.
_CHAIN_LIMIT = 64
_MOVE_ATTEMPTS = 3
# Versions this store saw replaced, kept to refuse stale writes without a call.
_REPLACED_MEMORY = 4096
_MS = timedelta(milliseconds=1)
# now() measures AWS's clock again when its last answer is older than this, so that a local
# clock stepped meanwhile (NTP, a resumed VM) is noticed before it decides a lease.
_CLOCK_MAX_AGE = timedelta(seconds=60)
# The secret now() describes when it has no answer to learn AWS's clock from: under the
# prefix, so DescribeSecret on the prefix (which the store needs anyway) covers it, and a name
# no key encodes to ("=cl" is no escape), so it never exists unless someone made it by hand.
_CLOCK_PROBE = "=clock"

Settled = Literal["landed", "lost", "not applied"]


class _Window:
    """How long one retry loop may go on: its own ``limit``, and the credkeeper call's budget.

    The budget (:func:`credkeeper.time_remaining`) is real time, while the store waits on its
    clock, which may be a ``FakeClock`` whose sleeps take none. Time spent counts on both
    clocks, the larger winning, so a loop stops at the same point of its schedule whichever
    clock it waits on: one deadline for the call, not the store's nested inside the engine's.
    """

    def __init__(self, clock: Clock, limit: float | None) -> None:
        self._clock = clock
        self.limit = limit
        self.budget = time_remaining()
        self._started = time.monotonic()
        self._started_at = clock.now()

    def left(self) -> float:
        """Seconds the loop may still wait (negative when it is over)."""
        waited = (self._clock.now() - self._started_at).total_seconds()
        left = math.inf if self.limit is None else self.limit - waited
        if self.budget is not None:
            spent = max(waited, time.monotonic() - self._started)
            left = min(left, self.budget - spent)
        return left

    def describe(self) -> str:
        """How long the loop went on, for an error message."""
        if self.budget is not None and (self.limit is None or self.budget < self.limit):
            return f"until the call's deadline ({self.budget:.3g} s)"
        return f"for {self.limit:g} s" if self.limit is not None else "for a while"


class _Read:
    """One GetSecretValue call shared by the ``get()`` calls waiting for it."""

    __slots__ = ("claimed", "done", "error", "ready", "result")

    def __init__(self, *, claimed: bool) -> None:
        self.ready = threading.Event()  # the call before this one has finished
        self.done = threading.Event()
        self.claimed = claimed  # a thread makes the call
        self.result: Stored | None = None
        self.error: BaseException | None = None


def _code(exc: botocore.exceptions.ClientError) -> str:
    error = exc.response.get("Error") or {}
    return str(error.get("Code") or "Unknown")


def _status(exc: botocore.exceptions.ClientError) -> int:
    metadata = exc.response.get("ResponseMetadata") or {}
    status = metadata.get("HTTPStatusCode")
    return status if isinstance(status, int) else 0


def _is_server_fault(exc: botocore.exceptions.ClientError) -> bool:
    return _code(exc) in _SERVER_FAULTS or _status(exc) >= 500


def _translate(exc: Exception, key: str | None) -> StoreError:
    """A botocore error as credkeeper's. Messages name the call and the AWS error code only:
    AWS's own message text is left out, in case it ever quotes a request parameter."""
    about = f" for key {key!r}" if key is not None else ""
    if isinstance(exc, botocore.exceptions.ClientError):
        code, operation = _code(exc), exc.operation_name
        if code in _THROTTLING:
            return StoreUnavailable(
                f"Secrets Manager throttled {operation}{about} ({code}); retry later", key=key
            )
        if _is_server_fault(exc):
            return StoreUnavailable(
                f"Secrets Manager failed {operation}{about} ({code}); retry later", key=key
            )
        if code in _DENIED:
            return StoreError(
                f"AWS denied secretsmanager:{operation}{about} ({code}); the IAM policy the "
                "store needs is in docs/stores/aws-secrets-manager.md",
                key=key,
            )
        if code in _BAD_CREDENTIALS:
            return StoreError(
                f"AWS refused the credentials calling {operation}{about} ({code}); check the "
                "profile, environment or role the store runs with",
                key=key,
            )
        if code in _KMS_FAULTS or code.startswith("KMS"):
            return StoreError(
                f"KMS failed {operation}{about} ({code}); check kms_key_id and the KMS key "
                "policy (kms:Decrypt, kms:GenerateDataKey)",
                key=key,
            )
        return StoreError(f"Secrets Manager refused {operation}{about} ({code})", key=key)
    if isinstance(exc, _CREDENTIAL_ERRORS):
        return StoreError(
            f"no usable AWS credentials{about} ({type(exc).__name__}); the store uses boto3's "
            "standard chain: environment, profile, SSO, or the instance or task role",
            key=key,
        )
    if isinstance(exc, _UNREACHABLE):
        return StoreUnavailable(
            f"Secrets Manager could not be reached{about} ({type(exc).__name__}); retry later",
            key=key,
        )
    return StoreError(f"boto3 failed{about} ({type(exc).__name__})", key=key)


def _changed(key: str, expected: str) -> ConflictError:
    """The conflict of a write expecting version ``expected`` after AWSCURRENT left it."""
    return ConflictError(
        f"the record for key {key!r} changed after version {expected} was read; read it again",
        key=key,
    )


def _current_version(versions_to_stages: object) -> str | None:
    if not isinstance(versions_to_stages, Mapping):
        return None
    for version, stages in versions_to_stages.items():
        if isinstance(stages, list) and _CURRENT in stages:
            return str(version)
    return None


def _region(value: object) -> str:
    if not isinstance(value, str) or not _REGION.fullmatch(value):
        raise ValueError(value)
    return value


def _endpoint_url(value: object) -> str:
    url = kit.NAME.parse(value)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(value)
    return url


# The options a URL's query may give; the constructor also takes region, client and clock.
_URL_OPTIONS: dict[str, kit.Option[Any]] = {
    "endpoint_url": kit.Option(_endpoint_url, "an http:// or https:// URL"),
    "kms_key_id": kit.NAME,
    "profile": kit.NAME,
    "retry_timeout": kit.SECONDS,
}
_OPTIONS: dict[str, kit.Option[Any]] = {
    **_URL_OPTIONS,
    "region": kit.Option(_region, "an AWS Region name such as us-east-1 or eu-central-1"),
}


_LOADER: list[Any] = []
_LOADER_LOCK = threading.Lock()


def _make_client(region: str | None, endpoint_url: str | None, profile: str | None) -> Any:
    """A Secrets Manager client through boto3's standard credential and Region chain.

    Each store gets its own botocore session, so credentials are looked up afresh; the
    loader of AWS's service descriptions is shared, which makes a client in 0.02 s instead
    of 0.2 s.
    """
    try:
        with _LOADER_LOCK:
            if not _LOADER:
                _LOADER.append(botocore.loaders.create_loader())
            session = botocore.session.Session(profile=profile)
            session.register_component("data_loader", _LOADER[0])
            return session.create_client(
                "secretsmanager",
                region_name=region,
                endpoint_url=endpoint_url,
                config=_CLIENT_CONFIG,
            )
    except botocore.exceptions.ProfileNotFound:
        raise ConfigurationError(
            f"AWS profile {profile!r} is not in the AWS config or credentials file"
        ) from None
    except botocore.exceptions.NoRegionError:
        raise ConfigurationError(
            f"no AWS Region for the Secrets Manager store: name it in the URL ({_URL_FORM}), "
            "or set AWS_REGION or the profile's region"
        ) from None
    except (ValueError, botocore.exceptions.BotoCoreError) as exc:
        raise ConfigurationError(
            f"cannot make a Secrets Manager client ({type(exc).__name__}); check endpoint_url "
            "and the Region"
        ) from exc


class SecretsManagerStore(kit.ClosingStore):
    """A :class:`~credkeeper.CredentialStore` keeping one secret per key in AWS Secrets Manager.

    ``prefix`` starts every secret name (letters, digits and ``/_+=.@-``, ending in ``/``);
    the rest of the name is the key, escaped where Secrets Manager's alphabet requires
    (see ``credkeeper_aws._names``). ``region``, ``profile`` and ``endpoint_url`` go to boto3,
    whose standard chain finds the credentials. ``kms_key_id`` encrypts new secrets with that
    KMS key instead of ``aws/secretsmanager``. Throttled calls, and server errors of calls
    that are safe to repeat, are retried with jittered backoff for up to ``retry_timeout``
    seconds, and never past the deadline of the credkeeper call in progress
    (:func:`credkeeper.time_remaining`), then raise ``StoreUnavailable``; a refused
    connection raises it at once.

    ``client`` is a boto3 Secrets Manager client you already have (it stays open on
    :meth:`close`); ``clock`` is where the backoff waits (a ``FakeClock`` in tests), and what
    :meth:`now` adds AWS's offset to.
    Safe to share between threads; async code uses it through
    :func:`credkeeper.as_async_store`.
    """

    def __init__(
        self,
        prefix: str,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        profile: str | None = None,
        kms_key_id: str | None = None,
        retry_timeout: float = 10.0,
        client: Any = None,
        clock: Clock | None = None,
    ) -> None:
        self.prefix = check_prefix(prefix)
        optional = {
            "region": region,
            "endpoint_url": endpoint_url,
            "profile": profile,
            "kms_key_id": kms_key_id,
        }
        given = {name: value for name, value in optional.items() if value is not None}
        options, _ = kit.read_options(
            {**given, "retry_timeout": retry_timeout}, _OPTIONS, store=_STORE
        )
        self.kms_key_id: str | None = options.get("kms_key_id")
        self.retry_timeout: float = options["retry_timeout"]
        if client is None:
            self._client = _make_client(
                options.get("region"), options.get("endpoint_url"), options.get("profile")
            )
            self._own_client = True
        else:
            for_client = [name for name in ("region", "endpoint_url", "profile") if name in given]
            if for_client:
                raise ConfigurationError(
                    f"pass {', '.join(for_client)} to the client you give, not to the store"
                )
            self._client = client
            self._own_client = False
        self.region: str | None = self._client.meta.region_name
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._rng = random.Random()  # noqa: S311 - backoff jitter, not secrets
        self._replaced: OrderedDict[str, None] = OrderedDict()
        self._replaced_lock = threading.Lock()
        # A name is here while a read of it is under way; its value is the next read, which
        # callers arriving meanwhile join.
        self._reads: dict[str, _Read | None] = {}
        self._reads_lock = threading.Lock()
        self._rate_checked = False
        self._server_clock = ServerClock(self._clock)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SecretsManagerStore:
        """Open ``aws-sm://REGION/PREFIX/``; options as keywords or in the query string.

        The options are ``endpoint_url``, ``profile``, ``kms_key_id`` and
        ``retry_timeout``; ``client`` and ``clock`` are keywords only. An empty Region
        (``aws-sm:///PREFIX/``) leaves it to boto3 (``AWS_REGION``, the profile).
        """
        if not isinstance(url, str):
            raise ConfigurationError(f"Secrets Manager store URL must be a string, got {url!r}")
        parts = urlsplit(url)
        if parts.scheme.lower() != "aws-sm" or not url.lower().startswith("aws-sm://"):
            raise ConfigurationError(f"Secrets Manager store URL must look like {_URL_FORM}")
        if "@" in parts.netloc or ":" in parts.netloc or parts.fragment:
            raise ConfigurationError(
                f"a Secrets Manager store URL has no user, port or fragment: {_URL_FORM}; "
                "credentials come from boto3's chain, the endpoint from endpoint_url"
            )
        given = kit.merge_options(
            kit.query_options(parts.query, store=_STORE), options, store=_STORE
        )
        # The objects only a keyword can give; from the query they are unknown options.
        objects = {name: value for name, value in options.items() if name in ("client", "clock")}
        values, _ = kit.read_options(
            {name: value for name, value in given.items() if name not in objects},
            _URL_OPTIONS,
            store=_STORE,
        )
        return cls(parts.path[1:], region=parts.netloc or None, **values, **objects)

    def __repr__(self) -> str:
        return f"SecretsManagerStore(region={self.region!r}, prefix={self.prefix!r})"

    # -- calls ------------------------------------------------------------------------------

    def _boundary(self, key: str | None) -> contextlib.AbstractContextManager[None]:
        """Translate whatever boto3 raises inside the block (:func:`_translate`); credkeeper's
        own errors pass."""
        return kit.error_boundary(
            lambda exc: _translate(exc, key),
            botocore.exceptions.ClientError,
            botocore.exceptions.BotoCoreError,
        )

    def _call(
        self,
        operation: str,
        key: str | None,
        *,
        repeatable: bool = True,
        passing: frozenset[str] = frozenset(),
        **params: Any,
    ) -> dict[str, Any]:
        """One API call, retried with jittered backoff while AWS throttles it, and, when the
        call is ``repeatable`` (idempotent), while AWS answers with a server error or with
        one of the ``passing`` error codes.

        Other ``ClientError``s propagate for the caller to handle the codes it expects;
        :meth:`_boundary` translates the rest.
        """
        method = getattr(self._client, operation)
        window: _Window | None = None
        attempt = 0
        while True:
            sent = self._clock.now()
            try:
                response: dict[str, Any] = method(**params)
            except botocore.exceptions.ClientError as exc:
                self._observe(exc.response, sent)
                throttled = _code(exc) in _THROTTLING
                passes = _is_server_fault(exc) or _code(exc) in passing
                if not (throttled or (repeatable and passes)):
                    raise
                if window is None:
                    window = _Window(self._clock, self.retry_timeout)
                delay = self._backoff(attempt)
                if delay <= window.left():
                    logger.debug("%s failed (%s); retrying in %.3f s", operation, _code(exc), delay)
                    self._clock.sleep(delay)
                    attempt += 1
                    continue
                if not throttled:
                    raise
                about = f" for key {key!r}" if key is not None else ""
                raise StoreUnavailable(
                    f"Secrets Manager kept throttling {exc.operation_name}{about} "
                    f"({_code(exc)}) {window.describe()}; retry later. "
                    "LimitExceededException can also mean a quota is full, such as "
                    "versions per secret: see docs/stores/aws-secrets-manager.md",
                    key=key,
                ) from exc
            self._observe(response, sent)
            return response

    def _observe(self, response: object, sent: datetime) -> None:
        """Learn AWS's clock from the ``Date`` header of an answer to a call sent at ``sent``."""
        self._server_clock.observe(date_header(response), sent=sent, received=self._clock.now())

    def now(self) -> datetime:
        """AWS's clock (aware, UTC): the store's clock plus the offset AWS's answers show.

        Every answer's ``Date`` header (whole seconds) bounds the offset, and the bounds of
        successive answers narrow it: the estimate is within half a second plus half a round
        trip of AWS's clock after one answer, and closer after more. When the store has not
        heard from AWS for a minute it asks (``DescribeSecret`` of a name under the prefix that
        no key uses, which the store's IAM policy already allows). Never goes backwards.
        """
        age = self._server_clock.age()
        if age is None or abs(age) > _CLOCK_MAX_AGE:
            with self._boundary(None), contextlib.suppress(botocore.exceptions.ClientError):
                # Any answer carries AWS's time, "no such secret" as well as a description.
                self._call("describe_secret", None, SecretId=self.prefix + _CLOCK_PROBE)
        moment = self._server_clock.now()
        if moment is None:
            raise StoreError(
                "Secrets Manager answered without a Date header, so its clock cannot be read; "
                "is a proxy between the store and AWS removing it?"
            )
        return moment

    def _backoff(self, attempt: int) -> float:
        """Seconds to wait before retry ``attempt + 1``: 50 ms doubling to 2 s, jittered."""
        delay = min(_MAX_BACKOFF, _FIRST_BACKOFF * 2.0**attempt)
        return delay * self._rng.uniform(0.5, 1.0)

    def _name(self, key: str) -> str:
        return self.prefix + encode_key(key, prefix=self.prefix)

    def _read(self, name: str, key: str | None, *, version: str | None = None) -> Stored | None:
        """Version ``version`` of secret ``name``, else its AWSCURRENT version, decoded.

        ``None`` when there is no such secret or version, the secret holds no value, or it is
        scheduled for deletion. A secret credkeeper did not write raises ``StoreCorrupted``.
        """
        params: dict[str, Any] = {"SecretId": name}
        if version is None:
            params["VersionStage"] = _CURRENT
        else:
            params["VersionId"] = version
        try:
            response = self._call("get_secret_value", key, **params)
        except botocore.exceptions.ClientError as exc:
            # InvalidRequestException: the secret is scheduled for deletion.
            if _code(exc) in ("ResourceNotFoundException", "InvalidRequestException"):
                return None
            raise
        current = str(response["VersionId"])
        if version is None:
            self._replaced_mark(current, replaced=False)
        return decode(response.get("SecretString"), key=key, name=name, version=current)

    def _check_has_value(self, name: str, key: str) -> None:
        """Raise ``StoreCorrupted`` if secret ``name`` exists without any value.

        Reads cannot tell such a secret from a missing one (both answer
        ``ResourceNotFoundException``), but a create over it fails, and without this check it
        would fail as a conflict with a record nobody can read. credkeeper never makes one: it
        creates every secret with its value.
        """
        try:
            described = self._call("describe_secret", key, SecretId=name)
        except botocore.exceptions.ClientError as exc:
            if _code(exc) == "ResourceNotFoundException":
                return  # deleted since the create found it
            raise
        if described.get("DeletedDate") is None and not described.get("VersionIdsToStages"):
            raise StoreCorrupted(
                f"secret {name!r} exists but holds no value; credkeeper did not create it. "
                "It was left untouched: delete it or use another prefix",
                key=key,
            )

    # -- get, put, delete -------------------------------------------------------------------

    def get(self, key: str) -> Record | None:
        """See :meth:`credkeeper.CredentialStore.get`: the AWSCURRENT version of the secret.

        Threads reading one key at the same time share calls (see :meth:`_shared_read`).
        """
        kit.check_key(key)
        with self._boundary(key):
            stored = self._shared_read(self._name(key), key)
        return None if stored is None else stored.record

    def _shared_read(self, name: str, key: str) -> Stored | None:
        """:meth:`_read` of the current version, one call serving every concurrent caller.

        A caller never joins a call already under way, which may have left before a write
        the caller saw finish; it joins the next call, which starts once the one under way
        returns, and which every caller arriving meanwhile joins too. Each answer is thus as
        fresh as a call of the caller's own, while a burst of reads of one key costs about
        one call per round trip instead of one per caller.
        """
        with self._reads_lock:
            leading = name not in self._reads
            if leading:
                read = _Read(claimed=True)
                self._reads[name] = None
            else:
                following = self._reads[name]
                if following is None:
                    following = self._reads[name] = _Read(claimed=False)
                read = following
        if not leading:
            read.ready.wait()
            with self._reads_lock:
                leading = not read.claimed
                read.claimed = True
            if not leading:
                read.done.wait()
                if read.error is not None:
                    raise read.error
                return read.result
        try:
            read.result = self._read(name, key)
        except BaseException as exc:
            read.error = exc
            raise
        finally:
            with self._reads_lock:
                following = self._reads.pop(name)
                if following is not None:
                    self._reads[name] = None  # under way now; later callers queue anew
                    following.ready.set()
            read.done.set()
        return read.result

    def put(self, record: Record) -> Record:
        """See :meth:`credkeeper.CredentialStore.put`: create the secret, or compare-and-swap
        ``AWSCURRENT`` from ``record.version`` to a new version of it."""
        name = self._name(kit.check_record(record).key)
        with self._boundary(record.key):
            if record.version is None:
                return self._create(name, record)
            return self._update(name, record, record.version)

    def _secret_string(self, record: Record, *, replaces: str | None) -> str:
        secret = encode(record, replaces=replaces)
        size = len(secret.encode("utf-8"))
        if size > MAX_SECRET_BYTES:
            raise StoreError(
                f"the record for key {record.key!r} takes {size} bytes; a secret holds at "
                f"most {MAX_SECRET_BYTES}",
                key=record.key,
            )
        return secret

    def _create(self, name: str, record: Record) -> Record:
        key = record.key
        token = kit.new_version()
        params: dict[str, Any] = {
            "Name": name,
            "SecretString": self._secret_string(record, replaces=None),
            "ClientRequestToken": token,
            "Description": _DESCRIPTION,
            "Tags": [expiry_tag(record, token)],
        }
        if self.kms_key_id is not None:
            params["KmsKeyId"] = self.kms_key_id
        # AWS creates a name once, however many callers race: the losers get
        # ResourceExistsException, so creating needs no lock of the store's own.
        try:
            # InvalidRequestException: AWS is still deleting the secret of that name, which
            # a forced deletion finishes within seconds.
            self._call(
                "create_secret", key, passing=frozenset({"InvalidRequestException"}), **params
            )
        except botocore.exceptions.ClientError as exc:
            code = _code(exc)
            if code == "ResourceExistsException":
                existing = self._read(name, key)  # StoreCorrupted when it is not ours
                if existing is None:
                    self._check_has_value(name, key)
                elif existing.record.version == token:
                    # An earlier attempt of this very call created it; its answer was lost.
                    return record.replace(version=token)
                raise ConflictError(
                    f"a record for key {key!r} already exists (secret {name!r})", key=key
                ) from exc
            if code == "InvalidRequestException":
                raise StoreUnavailable(
                    f"secret {name!r} for key {key!r} is being deleted: a forced deletion "
                    "finishes within seconds, a scheduled one at its date (restore the "
                    "secret to keep it); retry later",
                    key=key,
                ) from exc
            raise
        return record.replace(version=token)

    def _replaced_mark(self, version: str, *, replaced: bool) -> None:
        """Remember that AWSCURRENT left ``version``, or forget it again once read as current.

        credkeeper only ever moves AWSCURRENT to a new version, so a version it left never
        matches again: a write expecting it fails without a call. Only someone rolling a
        secret back by hand makes an old version current again, and the next read of it
        clears the mark.
        """
        with self._replaced_lock:
            if not replaced:
                self._replaced.pop(version, None)
                return
            self._replaced[version] = None
            self._replaced.move_to_end(version)
            if len(self._replaced) > _REPLACED_MEMORY:
                self._replaced.popitem(last=False)

    def _is_replaced(self, version: str) -> bool:
        with self._replaced_lock:
            return version in self._replaced

    def _update(self, name: str, record: Record, expected: str) -> Record:
        key = record.key
        if self._is_replaced(expected):
            raise _changed(key, expected)
        new = kit.new_version()
        try:
            self._call(
                "put_secret_value",
                key,
                SecretId=name,
                SecretString=self._secret_string(record, replaces=expected),
                ClientRequestToken=new,
                VersionStages=[_PENDING],
            )
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in ("ResourceNotFoundException", "InvalidRequestException"):
                raise ConflictError(
                    f"the record for key {key!r} was deleted after version {expected} was read",
                    key=key,
                ) from exc
            raise
        window = _Window(self._clock, None)
        for attempt in range(_MOVE_ATTEMPTS):
            try:
                self._call(
                    "update_secret_version_stage",
                    key,
                    repeatable=False,
                    SecretId=name,
                    VersionStage=_CURRENT,
                    MoveToVersionId=new,
                    RemoveFromVersionId=expected,
                )
                break
            except botocore.exceptions.ClientError as exc:
                if _code(exc) in ("InvalidParameterException", "ResourceNotFoundException"):
                    # AWSCURRENT is not on the expected version, or the secret is gone.
                    self._replaced_mark(expected, replaced=True)
                    raise _changed(key, expected) from exc
                if not _is_server_fault(exc):
                    raise
                failure: Exception = exc
            except botocore.exceptions.EndpointConnectionError:
                raise  # never sent
            except _UNREACHABLE as exc:
                failure = exc
            # The move failed in a way that hides whether it happened.
            settled = self._settle(name, key, expected=expected, new=new)
            if settled == "landed":
                logger.debug("key %r: the stage move went through despite its error", key)
                break
            if settled == "lost":
                self._replaced_mark(expected, replaced=True)
                raise _changed(key, expected) from failure
            delay = self._backoff(attempt)
            if attempt + 1 == _MOVE_ATTEMPTS or delay > window.left():
                raise failure
            self._clock.sleep(delay)
        self._replaced_mark(expected, replaced=True)
        self._tag(name, key, record, new)
        return record.replace(version=new)

    def _settle(self, name: str, key: str, *, expected: str, new: str) -> Settled:
        """Whether the move of AWSCURRENT from ``expected`` to ``new`` happened.

        AWSCURRENT only ever moves from one version to the next, and each version names the
        one it replaced, so the versions from ``expected`` to the current one form a chain:
        ``new`` landed exactly when the successor of ``expected`` in it is ``new``.
        """
        try:
            stored = self._read(name, key)
            for _ in range(_CHAIN_LIMIT):
                if stored is None:
                    return "lost"  # deleted, or the chain reached versions AWS removed
                version = stored.record.version
                if new in (version, stored.replaces):
                    return "landed"
                if version == expected:
                    return "not applied"
                if stored.replaces == expected or stored.replaces is None:
                    return "lost"
                stored = self._read(name, key, version=stored.replaces)
        except StoreUnavailable as exc:
            raise StoreUnavailable(
                f"could not tell whether the write for key {key!r} landed ({exc}); read the "
                "record again",
                key=key,
            ) from exc
        raise StoreUnavailable(
            f"could not tell whether the write for key {key!r} landed: more than "
            f"{_CHAIN_LIMIT} writes followed it; read the record again",
            key=key,
        )

    def _tag(self, name: str, key: str, record: Record, version: str) -> None:
        """Point the expiry tag at ``version``; best effort, a stale tag only costs scans a read."""
        try:
            self._client.tag_resource(SecretId=name, Tags=[expiry_tag(record, version)])
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            code = _code(exc) if isinstance(exc, botocore.exceptions.ClientError) else None
            logger.debug(
                "key %r: expiry tag not updated (%s); scans read the record instead",
                key,
                code or type(exc).__name__,
            )

    def delete(self, key: str) -> bool:
        """See :meth:`credkeeper.CredentialStore.delete`: deletes the secret without a
        recovery window, so the key can be created again at once. A secret credkeeper did not
        write raises ``StoreCorrupted`` and stays."""
        kit.check_key(key)
        name = self._name(key)
        with self._boundary(key):
            if self._read(name, key) is None:
                return False
            try:
                self._call("delete_secret", key, SecretId=name, ForceDeleteWithoutRecovery=True)
            except botocore.exceptions.ClientError as exc:
                if _code(exc) == "ResourceNotFoundException":
                    return False
                raise
        return True

    # -- scan_due ---------------------------------------------------------------------------

    def scan_due(self, before: datetime) -> Iterator[str]:
        """See :meth:`credkeeper.CredentialStore.scan_due`: pages of ``ListSecrets`` under the
        prefix, expiries from tags, a value read only where a tag lags behind its secret."""
        return self._scan(kit.to_epoch_ms(kit.check_moment("before", before)))

    def _scan(self, before_ms: int) -> Iterator[str]:
        filters = [
            {"Key": "name", "Values": [self.prefix]},
            {"Key": "tag-key", "Values": [EXPIRY_TAG]},
        ]
        params: dict[str, Any] = {"Filters": filters, "MaxResults": 100}
        keys = 0
        longest = 0
        with self._boundary(None):
            while True:
                page = self._call("list_secrets", None, **params)
                for entry in page.get("SecretList") or []:
                    found = self._due(entry, before_ms)
                    if found is None:
                        continue
                    keys += 1
                    key, lifetime_ms = found
                    longest = max(longest, lifetime_ms)
                    if key is not None:
                        yield key
                token = page.get("NextToken")
                if not token:
                    break
                params["NextToken"] = token
        self._check_rate(keys, longest)

    def _due(self, entry: Mapping[str, Any], before_ms: int) -> tuple[str | None, int] | None:
        """For one ``ListSecrets`` entry: ``None`` if it is not one of the store's secrets,
        else its key when due (``None`` when not) and the token lifetime its tag suggests."""
        name = entry.get("Name")
        if not isinstance(name, str) or not name.startswith(self.prefix):
            return None
        encoded = name[len(self.prefix) :]
        decoded = decode_name(encoded, prefix=self.prefix)
        if decoded is None:
            return None
        tag = parse_expiry_tag(entry.get("Tags"))
        if tag is not None and tag[1] == _current_version(entry.get("SecretVersionsToStages")):
            expires_ms = tag[0]
            changed = entry.get("LastChangedDate")
            lifetime_ms = (
                expires_ms - kit.to_epoch_ms(changed) if isinstance(changed, datetime) else 0
            )
            if expires_ms > before_ms:
                return None, lifetime_ms
            if isinstance(decoded, str):
                return decoded, lifetime_ms
        else:
            lifetime_ms = 0
        # The tag lags behind the value (or a hashed name hides the key): read the record.
        key = decoded if isinstance(decoded, str) else None
        try:
            stored = self._read(name, key)
        except StoreCorrupted as exc:
            logger.warning("scan_due skipped secret %r: %s", name, exc)
            return None
        if stored is None:
            return None
        if decoded is HASHED and not is_hashed_name_of(encoded, stored.record.key):
            logger.warning("scan_due skipped secret %r: its record is another key's", name)
            return None
        due = kit.to_epoch_ms(stored.record.expires_at) <= before_ms
        return (stored.record.key if due else None), lifetime_ms

    def _check_rate(self, keys: int, lifetime_ms: int) -> None:
        """Warn once when the keys seen and their token lifetime outrun AWS's write guidance.

        The lifetime is the longest gap between a secret's last change and its expiry: after
        a refresh that is the provider's token lifetime.
        """
        if self._rate_checked or keys == 0 or lifetime_ms <= 0:
            return
        self._rate_checked = True
        rate = estimate_write_rate(keys, lifetime_ms * _MS)
        if not rate.within_guidance:
            logger.warning("Secrets Manager store %s: %s", self.prefix, rate.describe())

    def close(self) -> None:
        """Close the client's connections, if the store made the client."""
        if self._own_client:
            self._client.close()
