"""The ``credkeeper`` command's exit codes, and the one line it prints for each error.

Scripts branch on the exit code, people read the line: both are decided here, in one table,
so ``--help``, ``docs/cli.md`` and the behaviour cannot drift apart.
"""

from __future__ import annotations

import enum
import shlex

import credkeeper as ck

__all__ = ["ExitCode", "describe", "epilog", "exit_code_for"]

#: What every error line starts with, so it stands out in logs that mix many programs.
PREFIX = "credkeeper: error: "


class ExitCode(enum.IntEnum):
    """The exit status of ``credkeeper``; each value is one kind of outcome a script can act on."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    REAUTH_REQUIRED = 3
    STORE = 4
    PROVIDER = 5
    NOT_FOUND = 6
    DECRYPTION = 7
    WRAPPER = 8
    INTERRUPTED = 130


#: One line per code, for ``--help`` and ``docs/cli.md``; ``tests/cli`` checks they agree.
MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "success",
    ExitCode.FAILURE: "the command ran and failed (demo FAILED, a file error, an internal error)",
    ExitCode.USAGE: "bad command line or configuration: option, store URL, key ring, input",
    ExitCode.REAUTH_REQUIRED: "the provider refused the refresh token: the user must log in again",
    ExitCode.STORE: "the store is unavailable, corrupted, or kept changing (retry later)",
    ExitCode.PROVIDER: "the token endpoint failed, throttled or timed out (retry later)",
    ExitCode.NOT_FOUND: "no credential is stored under the key",
    ExitCode.DECRYPTION: "the key ring cannot open the stored tokens (wrong or missing key)",
    ExitCode.WRAPPER: "the wrapper refused or failed the call (auth, usage limit, down)",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C)",
}

# Most specific first: CredentialNotFound is also a KeyError, InvalidGrant also a ProviderError.
_CODES: tuple[tuple[type[BaseException], ExitCode], ...] = (
    (ck.ReauthRequired, ExitCode.REAUTH_REQUIRED),
    (ck.InvalidGrant, ExitCode.REAUTH_REQUIRED),
    (ck.CredentialNotFound, ExitCode.NOT_FOUND),
    (ck.DecryptionError, ExitCode.DECRYPTION),
    (ck.StoreError, ExitCode.STORE),
    (ck.ProviderError, ExitCode.PROVIDER),
    (ck.RefreshTimeout, ExitCode.PROVIDER),
    (ck.ConfigurationError, ExitCode.USAGE),
    (ck.CredentialsError, ExitCode.USAGE),
    (ck.InvalidRequest, ExitCode.USAGE),
    (ck.WrapperError, ExitCode.WRAPPER),
)


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit code for an exception a command let escape."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return ExitCode.FAILURE


def describe(exc: BaseException) -> str:
    """A one-line message for ``exc`` that names the fix where there is one, and no secret.

    credkeeper's own messages never hold tokens, so they are shown as they are. Anything else
    is an internal error: only its type is shown, because its text could hold anything.
    """
    if isinstance(exc, ck.ReauthRequired):
        message = (
            f"the provider refused the credential under key {exc.key!r} (invalid_grant); "
            f"log in again, then run `credkeeper import --key {shlex.quote(exc.key)}`"
        )
    elif isinstance(exc, ck.CredentialNotFound):
        message = (
            f"no credential is stored under key {exc.key!r}; "
            f"store one with `credkeeper import --key {shlex.quote(exc.key)}`"
        )
    elif isinstance(exc, ck.CredkeeperError):
        message = str(exc)
    elif isinstance(exc, OSError):
        reason = exc.strerror or type(exc).__name__
        message = f"{reason}: {exc.filename}" if exc.filename else reason
    else:
        message = f"internal error ({type(exc).__name__}); rerun with --debug for the traceback"
    return one_line(message)


def one_line(message: str) -> str:
    """``message`` with its line breaks folded, so that every error is exactly one line."""
    return " ".join(message.split())


def epilog() -> str:
    """The exit-code table for ``--help``; ``\\b`` keeps click from re-wrapping it."""
    rows = "\n".join(f"  {code.value:<4} {MEANINGS[code]}" for code in ExitCode)
    return f"\b\nExit codes:\n{rows}"
