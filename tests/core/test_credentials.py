"""Credentials and Secret: construction, hiding tokens, and the three document parsers."""

from __future__ import annotations

import json
import pickle
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from credkeeper import Credentials, CredentialsError, Secret

ACCESS = "sk-ant-oat01-ACCESSdistinctive4711"
REFRESH = "sk-ant-ort01-REFRESHdistinctive0815"
EXPIRES = datetime(2030, 5, 17, 8, 30, 15, 123000, tzinfo=UTC)
EXPIRES_MS = 1_905_237_015_123
NOW = datetime(2030, 5, 17, 0, 0, tzinfo=UTC)
SCOPE = "user:profile user:inference"


def make(**changes: Any) -> Credentials:
    fields: dict[str, Any] = {
        "access_token": ACCESS,
        "refresh_token": REFRESH,
        "expires_at": EXPIRES,
        "scopes": ("user:profile", "user:inference"),
        "subscription_type": "max",
    }
    fields.update(changes)
    return Credentials(**fields)


def wrapper_doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "access_token": ACCESS,
        "refresh_token": REFRESH,
        "expires_at": EXPIRES_MS,
        "scopes": ["user:profile", "user:inference"],
        "subscription_type": "max",
    }
    doc.update(changes)
    return doc


def claude_code_doc(**changes: Any) -> dict[str, Any]:
    inner: dict[str, Any] = {
        "accessToken": ACCESS,
        "refreshToken": REFRESH,
        "expiresAt": EXPIRES_MS,
        "scopes": ["user:profile", "user:inference"],
        "subscriptionType": "max",
    }
    inner.update(changes)
    return {"claudeAiOauth": inner}


def percent_r(value: object) -> str:
    return "%r" % (value,)  # noqa: UP031 - %-formatting is what is under test


def percent_s(value: object) -> str:
    return "%s" % (value,)  # noqa: UP031 - %-formatting is what is under test


def token_response(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "access_token": "sk-ant-oat01-NEWaccess",
        "refresh_token": "sk-ant-ort01-NEWrefresh",
        "expires_in": 28800,
        "scope": SCOPE,
        "token_type": "Bearer",
    }
    doc.update(changes)
    return doc


def without(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != name}


class TestConstructor:
    def test_plain_strings_become_secrets(self) -> None:
        """Tokens passed as plain strings are held as Secrets with the same value."""
        creds = make()

        assert (Secret(ACCESS), Secret(REFRESH)) == (creds.access_token, creds.refresh_token)

    def test_secrets_accepted(self) -> None:
        """Tokens passed as Secrets are kept with their values."""
        creds = make(access_token=Secret(ACCESS), refresh_token=Secret(REFRESH))

        assert (ACCESS, REFRESH) == (
            creds.access_token.get_secret_value(),
            creds.refresh_token.get_secret_value(),
        )

    def test_naive_expiry_refused(self) -> None:
        """A naive expires_at raises CredentialsError for that field, asking for an aware one."""
        with pytest.raises(CredentialsError) as info:
            make(expires_at=datetime(2030, 1, 1))

        assert "expires_at" == info.value.field
        assert "aware" in str(info.value)

    def test_non_datetime_expiry_refused(self) -> None:
        """An expires_at that is not a datetime raises CredentialsError for that field."""
        with pytest.raises(CredentialsError) as info:
            make(expires_at=EXPIRES_MS)

        assert "expires_at" == info.value.field

    def test_other_zone_normalised_to_utc(self) -> None:
        """An aware expires_at in another zone is kept as the same instant in UTC."""
        local = datetime(2030, 5, 17, 10, 30, tzinfo=timezone(timedelta(hours=2)))

        creds = make(expires_at=local)

        assert (datetime(2030, 5, 17, 8, 30, tzinfo=UTC), UTC) == (
            creds.expires_at,
            creds.expires_at.tzinfo,
        )

    @pytest.mark.parametrize("field", ["access_token", "refresh_token"])
    @pytest.mark.parametrize("value", ["", "   ", Secret("")])
    def test_empty_token_refused(self, field: str, value: object) -> None:
        """An empty or blank token raises CredentialsError naming the field."""
        with pytest.raises(CredentialsError) as info:
            make(**{field: value})

        assert field == info.value.field
        assert field in str(info.value)

    def test_non_string_token_refused(self) -> None:
        """A token that is not a string raises CredentialsError naming the field."""
        with pytest.raises(CredentialsError) as info:
            make(refresh_token=12345)

        assert "refresh_token" == info.value.field

    @pytest.mark.parametrize("field", ["access_token", "refresh_token"])
    def test_lone_surrogate_token_refused(self, field: str) -> None:
        """A token holding a lone surrogate, which no store could seal, raises naming the field."""
        with pytest.raises(CredentialsError) as info:
            make(**{field: "sk-ant-oat01-half\ud800pair"})

        assert (field, True) == (info.value.field, "surrogate" in str(info.value))

    def test_scopes_from_string(self) -> None:
        """Scopes given as a space-separated string are split into a tuple."""
        assert ("a", "b") == make(scopes="a  b").scopes

    def test_scopes_of_non_strings_refused(self) -> None:
        """Scopes that are not all strings raise CredentialsError for scopes."""
        with pytest.raises(CredentialsError) as info:
            make(scopes=["a", 1])

        assert "scopes" == info.value.field

    def test_subscription_type_must_be_string(self) -> None:
        """A subscription_type that is not a string or None raises CredentialsError."""
        with pytest.raises(CredentialsError) as info:
            make(subscription_type=3)

        assert "subscription_type" == info.value.field

    def test_frozen(self) -> None:
        """Credentials cannot be changed after construction."""
        creds = make()

        with pytest.raises(AttributeError):
            creds.access_token = Secret("other")  # type: ignore[misc]

    def test_expires_within(self) -> None:
        """expires_within is true when the expiry falls before now plus the margin."""
        creds = make()

        assert (True, False) == (
            creds.expires_within(timedelta(hours=9), now=NOW),
            creds.expires_within(timedelta(hours=8), now=NOW),
        )


class TestHiding:
    @pytest.mark.parametrize(
        "render",
        [
            repr,
            str,
            lambda c: f"{c}",
            lambda c: f"{c!r}",
            percent_r,
            percent_s,
        ],
        ids=["repr", "str", "fstring", "fstring-r", "percent-r", "percent-s"],
    )
    def test_credentials_render_without_tokens(self, render: Any) -> None:
        """No rendering of Credentials contains either token."""
        text = render(make())

        assert (False, False) == (ACCESS in text, REFRESH in text)
        assert ("ACCESSdistinctive" in text, "REFRESHdistinctive" in text) == (False, False)

    @pytest.mark.parametrize(
        "render",
        [
            repr,
            str,
            lambda s: f"{s}",
            lambda s: f"{s!r}",
            lambda s: f"{s:>40}",
            percent_r,
            percent_s,
        ],
        ids=["repr", "str", "fstring", "fstring-r", "fstring-spec", "percent-r", "percent-s"],
    )
    def test_secret_renders_masked(self, render: Any) -> None:
        """No rendering of a Secret contains its value."""
        text = render(Secret(ACCESS))

        assert "ACCESSdistinctive" not in text

    def test_credentials_repr_shows_non_secret_fields(self) -> None:
        """The repr still shows the expiry, scopes and subscription type."""
        text = repr(make())

        assert (True, True, True) == (
            EXPIRES.isoformat() in text,
            "user:inference" in text,
            "'max'" in text,
        )

    def test_tokens_absent_from_container_repr(self) -> None:
        """A list or dict holding Credentials renders without tokens."""
        text = repr({"user": [make()]})

        assert "distinctive" not in text

    def test_error_message_has_no_token(self) -> None:
        """A construction error does not quote the tokens it was given."""
        with pytest.raises(CredentialsError) as info:
            make(expires_at=datetime(2030, 1, 1))

        assert "distinctive" not in str(info.value)


class TestSecret:
    def test_value(self) -> None:
        """get_secret_value returns the token."""
        assert ACCESS == Secret(ACCESS).get_secret_value()

    def test_from_secret(self) -> None:
        """A Secret built from a Secret holds the same value."""
        assert Secret(ACCESS) == Secret(Secret(ACCESS))

    def test_non_string_refused(self) -> None:
        """A Secret must wrap a str."""
        with pytest.raises(TypeError):
            Secret(b"bytes")  # type: ignore[arg-type]

    def test_pickling_refused(self) -> None:
        """Pickling a Secret raises TypeError."""
        with pytest.raises(TypeError):
            pickle.dumps(Secret(ACCESS))

    def test_credentials_pickling_refused(self) -> None:
        """Pickling Credentials raises TypeError, because the tokens refuse."""
        with pytest.raises(TypeError):
            pickle.dumps(make())

    def test_equal_values_equal(self) -> None:
        """Secrets with the same value are equal and hash alike."""
        first, second = Secret(ACCESS), Secret(ACCESS)

        assert (True, hash(first)) == (first == second, hash(second))

    def test_different_values_unequal(self) -> None:
        """Secrets with different values are unequal."""
        assert Secret(ACCESS) != Secret(REFRESH)

    def test_not_equal_to_plain_string(self) -> None:
        """A Secret is not equal to the plain string it wraps."""
        assert Secret(ACCESS) != ACCESS

    def test_truthiness(self) -> None:
        """A Secret is false exactly when its value is empty."""
        assert (True, False) == (bool(Secret("x")), bool(Secret("")))

    def test_lone_surrogate_compares(self) -> None:
        """Secrets holding a lone surrogate compare by value instead of raising."""
        assert Secret("half\ud800pair") == Secret("half\ud800pair")


class TestEquality:
    def test_equal_fields_equal(self) -> None:
        """Credentials with equal fields are equal and hash alike."""
        first, second = make(), make(access_token=Secret(ACCESS))

        assert (True, hash(first)) == (first == second, hash(second))

    @pytest.mark.parametrize(
        "changes",
        [
            {"access_token": "other"},
            {"refresh_token": "other"},
            {"expires_at": EXPIRES + timedelta(milliseconds=1)},
            {"scopes": ()},
            {"subscription_type": None},
        ],
        ids=["access", "refresh", "expiry", "scopes", "subscription"],
    )
    def test_any_field_differs(self, changes: dict[str, Any]) -> None:
        """Credentials differing in any one field are unequal."""
        assert make() != make(**changes)

    def test_same_instant_other_zone_equal(self) -> None:
        """The same expiry given in two zones yields equal Credentials."""
        local = EXPIRES.astimezone(timezone(timedelta(hours=-5)))

        assert make() == make(expires_at=local)

    def test_usable_in_set(self) -> None:
        """Equal Credentials collapse to one set member."""
        assert 1 == len({make(), make()})


class TestFromTokenResponse:
    def test_expires_in_relative_to_now(self) -> None:
        """expires_in seconds are added to now."""
        creds = Credentials.from_token_response(token_response(), now=NOW)

        assert NOW + timedelta(seconds=28800) == creds.expires_at

    def test_fields(self) -> None:
        """Tokens and scopes come from the response."""
        creds = Credentials.from_token_response(token_response(), now=NOW)

        assert (
            "sk-ant-oat01-NEWaccess",
            "sk-ant-ort01-NEWrefresh",
            ("user:profile", "user:inference"),
        ) == (
            creds.access_token.get_secret_value(),
            creds.refresh_token.get_secret_value(),
            creds.scopes,
        )

    def test_expires_at_ms_and_seconds_agree(self) -> None:
        """expires_at in milliseconds and in seconds give the same expiry."""
        base = without(token_response(), "expires_in")

        in_ms = Credentials.from_token_response({**base, "expires_at": 1_905_237_015_000}, now=NOW)
        in_s = Credentials.from_token_response({**base, "expires_at": 1_905_237_015}, now=NOW)

        assert (datetime(2030, 5, 17, 8, 30, 15, tzinfo=UTC), in_ms.expires_at) == (
            in_s.expires_at,
            in_s.expires_at,
        )

    def test_expires_at_wins_over_expires_in(self) -> None:
        """When both are present, expires_at decides."""
        creds = Credentials.from_token_response(token_response(expires_at=EXPIRES_MS), now=NOW)

        assert EXPIRES == creds.expires_at

    def test_scope_as_list(self) -> None:
        """scope given as a list of strings is accepted."""
        creds = Credentials.from_token_response(
            token_response(scope=["user:profile", "user:inference"]), now=NOW
        )

        assert ("user:profile", "user:inference") == creds.scopes

    def test_missing_refresh_keeps_previous(self) -> None:
        """A response without refresh_token keeps the previous refresh token."""
        creds = Credentials.from_token_response(
            without(token_response(), "refresh_token"), now=NOW, previous=make()
        )

        assert REFRESH == creds.refresh_token.get_secret_value()

    def test_null_refresh_keeps_previous(self) -> None:
        """A response with refresh_token null keeps the previous refresh token."""
        creds = Credentials.from_token_response(
            token_response(refresh_token=None), now=NOW, previous=make()
        )

        assert REFRESH == creds.refresh_token.get_secret_value()

    def test_new_refresh_replaces_previous(self) -> None:
        """A rotated refresh token in the response replaces the previous one."""
        creds = Credentials.from_token_response(token_response(), now=NOW, previous=make())

        assert "sk-ant-ort01-NEWrefresh" == creds.refresh_token.get_secret_value()

    def test_missing_refresh_without_previous(self) -> None:
        """No refresh_token and no previous credentials raises for refresh_token."""
        with pytest.raises(CredentialsError) as info:
            Credentials.from_token_response(without(token_response(), "refresh_token"), now=NOW)

        assert "refresh_token" == info.value.field

    def test_missing_subscription_keeps_previous(self) -> None:
        """A response without subscription_type keeps the previous one."""
        creds = Credentials.from_token_response(token_response(), now=NOW, previous=make())

        assert "max" == creds.subscription_type

    def test_subscription_in_response_wins(self) -> None:
        """A subscription_type in the response replaces the previous one."""
        creds = Credentials.from_token_response(
            token_response(subscription_type="pro"), now=NOW, previous=make()
        )

        assert "pro" == creds.subscription_type

    def test_missing_scope_keeps_previous(self) -> None:
        """A response without scope keeps the previous scopes."""
        creds = Credentials.from_token_response(
            without(token_response(), "scope"), now=NOW, previous=make(scopes="a b")
        )

        assert ("a", "b") == creds.scopes

    def test_missing_expiry(self) -> None:
        """A response with neither expires_in nor expires_at raises for expires_in."""
        with pytest.raises(CredentialsError) as info:
            Credentials.from_token_response(without(token_response(), "expires_in"), now=NOW)

        assert "expires_in" == info.value.field

    @pytest.mark.parametrize("field", ["access_token", "refresh_token"])
    def test_lone_surrogate_in_json_text(self, field: str) -> None:
        """A token escaped as a lone surrogate in the JSON text raises for its field."""
        text = json.dumps({**token_response(), field: "sk-ant-oat01-half\ud800pair"})

        with pytest.raises(CredentialsError) as info:
            Credentials.from_token_response(text, now=NOW)

        assert field == info.value.field

    def test_missing_access_token(self) -> None:
        """A response without access_token raises for access_token."""
        with pytest.raises(CredentialsError) as info:
            Credentials.from_token_response(
                without(token_response(), "access_token"), now=NOW, previous=make()
            )

        assert "access_token" == info.value.field

    @pytest.mark.parametrize("field", ["expires_in", "expires_at"])
    @pytest.mark.parametrize(
        "value",
        [True, False, "soon", float("nan"), float("inf"), -1, [], {}],
        ids=["true", "false", "string", "nan", "inf", "negative", "list", "object"],
    )
    def test_bad_number(self, field: str, value: object) -> None:
        """A boolean, string, non-finite, negative or structured number raises for its field."""
        doc = {**without(token_response(), "expires_in"), field: value}

        with pytest.raises(CredentialsError) as info:
            Credentials.from_token_response(doc, now=NOW)

        assert field == info.value.field

    def test_expires_in_as_digits(self) -> None:
        """expires_in sent as a string of digits, as some providers do, is read as seconds."""
        doc = {**token_response(), "expires_in": "3600"}

        credentials = Credentials.from_token_response(doc, now=NOW)

        assert NOW + timedelta(seconds=3600) == credentials.expires_at

    def test_nan_in_json_text(self) -> None:
        """NaN written in JSON text (which Python's json accepts) raises for its field."""
        text = '{"access_token": "a", "refresh_token": "r", "expires_in": NaN}'

        with pytest.raises(CredentialsError) as info:
            Credentials.from_token_response(text, now=NOW)

        assert "expires_in" == info.value.field

    def test_expires_in_beyond_ten_years(self) -> None:
        """An expires_in beyond ten years raises for expires_in."""
        with pytest.raises(CredentialsError) as info:
            Credentials.from_token_response(token_response(expires_in=11 * 365 * 86400), now=NOW)

        assert "expires_in" == info.value.field

    def test_expires_at_out_of_range(self) -> None:
        """An expires_at beyond what a datetime holds raises for expires_at."""
        with pytest.raises(CredentialsError) as info:
            Credentials.from_token_response(token_response(expires_at=1e30), now=NOW)

        assert "expires_at" == info.value.field

    @pytest.mark.parametrize("field", ["expires_in", "expires_at"])
    def test_integer_beyond_float_range(self, field: str) -> None:
        """A JSON integer too large for a float raises CredentialsError for its field."""
        text = f'{{"access_token": "a", "refresh_token": "r", "{field}": 1{"0" * 400}}}'

        with pytest.raises(CredentialsError) as info:
            Credentials.from_token_response(text, now=NOW)

        assert field == info.value.field

    def test_naive_now_refused(self) -> None:
        """A naive now raises CredentialsError for now."""
        with pytest.raises(CredentialsError) as info:
            Credentials.from_token_response(token_response(), now=datetime(2030, 1, 1))

        assert "now" == info.value.field

    def test_json_text(self) -> None:
        """The response may be given as JSON text."""
        creds = Credentials.from_token_response(json.dumps(token_response()), now=NOW)

        assert NOW + timedelta(hours=8) == creds.expires_at

    def test_json_bytes(self) -> None:
        """The response may be given as JSON bytes."""
        creds = Credentials.from_token_response(json.dumps(token_response()).encode(), now=NOW)

        assert NOW + timedelta(hours=8) == creds.expires_at

    @pytest.mark.parametrize(
        "data",
        ["", "{", "<html>oops</html>", b"\xff\xfe\x00{", b'{"access_token": '],
        ids=["empty", "open-brace", "html", "bad-bytes", "truncated-bytes"],
    )
    def test_malformed_json(self, data: str | bytes) -> None:
        """Malformed JSON text or bytes raises CredentialsError, not a JSON error."""
        with pytest.raises(CredentialsError) as info:
            Credentials.from_token_response(data, now=NOW)

        assert "JSON" in str(info.value)

    @pytest.mark.parametrize("data", ["[1, 2]", "null", "3", '"text"'])
    def test_non_object_json(self, data: str) -> None:
        """JSON that is not an object raises CredentialsError."""
        with pytest.raises(CredentialsError, match="JSON object"):
            Credentials.from_token_response(data, now=NOW)

    def test_deeply_nested_json(self) -> None:
        """Deeply nested JSON raises CredentialsError rather than RecursionError."""
        with pytest.raises(CredentialsError):
            Credentials.from_token_response("[" * 100_000, now=NOW)

    def test_error_names_no_token(self) -> None:
        """A parse error does not quote the tokens in the document."""
        doc = {**token_response(access_token=ACCESS, refresh_token=REFRESH), "expires_in": "x"}

        with pytest.raises(CredentialsError) as info:
            Credentials.from_token_response(doc, now=NOW)

        assert "distinctive" not in str(info.value)


class TestFromWrapper:
    def test_round_trip_from_document(self) -> None:
        """The wrapper shape parses and emits back unchanged."""
        assert wrapper_doc() == Credentials.from_wrapper(wrapper_doc()).to_wrapper()

    def test_round_trip_from_credentials(self) -> None:
        """Credentials emitted in the wrapper shape parse back equal."""
        assert make() == Credentials.from_wrapper(make().to_wrapper())

    def test_fields(self) -> None:
        """Each wrapper field lands in its attribute."""
        creds = Credentials.from_wrapper(wrapper_doc())

        assert (ACCESS, REFRESH, EXPIRES, ("user:profile", "user:inference"), "max") == (
            creds.access_token.get_secret_value(),
            creds.refresh_token.get_secret_value(),
            creds.expires_at,
            creds.scopes,
            creds.subscription_type,
        )

    def test_nested(self) -> None:
        """A document nesting the object under oauth_credentials is accepted."""
        nested = {"model": "sonnet", "oauth_credentials": wrapper_doc()}

        assert make() == Credentials.from_wrapper(nested)

    def test_json_text(self) -> None:
        """The wrapper shape may be given as JSON text."""
        assert make() == Credentials.from_wrapper(json.dumps(wrapper_doc()))

    def test_optional_fields_absent(self) -> None:
        """Without scopes and subscription_type the defaults apply."""
        doc = without(without(wrapper_doc(), "scopes"), "subscription_type")

        assert make(scopes=(), subscription_type=None) == Credentials.from_wrapper(doc)

    def test_expires_at_in_seconds(self) -> None:
        """expires_at in seconds raises for expires_at, saying milliseconds are needed."""
        with pytest.raises(CredentialsError) as info:
            Credentials.from_wrapper(wrapper_doc(expires_at=EXPIRES_MS // 1000))

        assert "expires_at" == info.value.field
        assert "milliseconds" in str(info.value)

    @pytest.mark.parametrize("field", ["access_token", "refresh_token", "expires_at"])
    def test_missing_field(self, field: str) -> None:
        """Each missing required field is named."""
        with pytest.raises(CredentialsError) as info:
            Credentials.from_wrapper(without(wrapper_doc(), field))

        assert field == info.value.field
        assert field in str(info.value)

    @pytest.mark.parametrize("field", ["access_token", "refresh_token", "expires_at"])
    def test_null_field(self, field: str) -> None:
        """A required field set to null is named like a missing one."""
        with pytest.raises(CredentialsError) as info:
            Credentials.from_wrapper(wrapper_doc(**{field: None}))

        assert field == info.value.field

    def test_scopes_as_object_refused(self) -> None:
        """scopes given as a JSON object raises for scopes."""
        with pytest.raises(CredentialsError) as info:
            Credentials.from_wrapper(wrapper_doc(scopes={"user:profile": True}))

        assert "scopes" == info.value.field

    def test_malformed_json(self) -> None:
        """Malformed JSON text raises CredentialsError."""
        with pytest.raises(CredentialsError):
            Credentials.from_wrapper('{"access_token":')

    def test_round_trip_keeps_every_millisecond(self) -> None:
        """An expires_at in milliseconds survives parse and emit exactly (no float rounding)."""
        doc = wrapper_doc(expires_at=2_147_491_349_838)

        assert 2_147_491_349_838 == Credentials.from_wrapper(doc).to_wrapper()["expires_at"]

    def test_to_wrapper_leaves_out_an_unknown_subscription_type(self) -> None:
        """No subscription type means no field, not null, which the wrapper refuses."""
        credentials = Credentials.from_wrapper(without(wrapper_doc(), "subscription_type"))

        assert "subscription_type" not in credentials.to_wrapper()


class TestFromClaudeCode:
    def test_round_trip_from_document(self) -> None:
        """Claude Code's shape parses and emits back unchanged."""
        assert claude_code_doc() == Credentials.from_claude_code(claude_code_doc()).to_claude_code()

    def test_round_trip_from_credentials(self) -> None:
        """Credentials emitted in Claude Code's shape parse back equal."""
        assert make() == Credentials.from_claude_code(make().to_claude_code())

    def test_extra_fields_ignored(self) -> None:
        """Fields newer builds add (rateLimitTier, refreshTokenExpiresAt) are ignored."""
        doc = claude_code_doc(rateLimitTier="default", refreshTokenExpiresAt=EXPIRES_MS)

        assert make() == Credentials.from_claude_code(doc)

    def test_null_subscription(self) -> None:
        """subscriptionType null is accepted as None."""
        assert (
            None
            is Credentials.from_claude_code(
                claude_code_doc(subscriptionType=None)
            ).subscription_type
        )

    @pytest.mark.parametrize(
        "doc", [{}, {"claudeAiOauth": None}, {"claudeAiOauth": "x"}], ids=["absent", "null", "str"]
    )
    def test_missing_claude_ai_oauth(self, doc: dict[str, Any]) -> None:
        """A document without a claudeAiOauth object names it."""
        with pytest.raises(CredentialsError) as info:
            Credentials.from_claude_code(doc)

        assert "claudeAiOauth" == info.value.field
        assert "claudeAiOauth" in str(info.value)

    def test_expires_at_in_seconds(self) -> None:
        """expiresAt in seconds raises for expiresAt."""
        with pytest.raises(CredentialsError) as info:
            Credentials.from_claude_code(claude_code_doc(expiresAt=EXPIRES_MS // 1000))

        assert "expiresAt" == info.value.field
        assert "milliseconds" in str(info.value)

    @pytest.mark.parametrize("field", ["accessToken", "refreshToken", "expiresAt"])
    def test_missing_field(self, field: str) -> None:
        """Each missing required field is named in Claude Code's spelling."""
        doc = claude_code_doc()
        del doc["claudeAiOauth"][field]

        with pytest.raises(CredentialsError) as info:
            Credentials.from_claude_code(doc)

        assert field == info.value.field

    def test_file(self, tmp_path: Path) -> None:
        """A credentials file on disk parses like the document."""
        path = tmp_path / ".credentials.json"
        path.write_text(json.dumps(claude_code_doc()))

        assert make() == Credentials.from_claude_code_file(path)

    def test_file_as_string_path(self, tmp_path: Path) -> None:
        """The path may be given as a string."""
        path = tmp_path / ".credentials.json"
        path.write_text(json.dumps(claude_code_doc()))

        assert make() == Credentials.from_claude_code_file(str(path))

    def test_file_round_trip(self, tmp_path: Path) -> None:
        """Credentials written with to_claude_code read back equal from the file."""
        path = tmp_path / ".credentials.json"
        path.write_text(json.dumps(make().to_claude_code()))

        assert make() == Credentials.from_claude_code_file(path)

    def test_missing_file(self, tmp_path: Path) -> None:
        """A path that cannot be read raises CredentialsError naming the path."""
        path = tmp_path / "nowhere" / ".credentials.json"

        with pytest.raises(CredentialsError) as info:
            Credentials.from_claude_code_file(path)

        assert str(path) in str(info.value)

    def test_directory(self, tmp_path: Path) -> None:
        """A directory given as the path raises CredentialsError naming it."""
        with pytest.raises(CredentialsError) as info:
            Credentials.from_claude_code_file(tmp_path)

        assert str(tmp_path) in str(info.value)

    def test_file_with_bad_json(self, tmp_path: Path) -> None:
        """A file that is not JSON raises CredentialsError."""
        path = tmp_path / ".credentials.json"
        path.write_bytes(b"\x00\x01 not json")

        with pytest.raises(CredentialsError):
            Credentials.from_claude_code_file(path)

    def test_path_with_nul(self, tmp_path: Path) -> None:
        """A path with a NUL byte raises CredentialsError."""
        with pytest.raises(CredentialsError):
            Credentials.from_claude_code_file(f"{tmp_path}/a\x00b")


# -- properties ------------------------------------------------------------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300, max_value=10**320)
    | st.floats()
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
FIELD_NAMES = st.sampled_from(
    [
        "access_token",
        "refresh_token",
        "expires_at",
        "expires_in",
        "scope",
        "scopes",
        "subscription_type",
        "oauth_credentials",
        "claudeAiOauth",
        "accessToken",
        "refreshToken",
        "expiresAt",
        "subscriptionType",
    ]
)
# Objects whose keys are the ones the parsers look at, so the fields get exercised.
LIKELY_OBJECTS = st.recursive(
    st.dictionaries(FIELD_NAMES, JSON_VALUES, max_size=6),
    lambda children: st.dictionaries(FIELD_NAMES, children | JSON_VALUES, max_size=6),
    max_leaves=4,
)
ANY_INPUT = JSON_VALUES | LIKELY_OBJECTS | st.text() | st.binary()
PARSERS = [
    lambda data: Credentials.from_token_response(data, now=NOW),
    lambda data: Credentials.from_token_response(data, now=NOW, previous=make()),
    Credentials.from_wrapper,
    Credentials.from_claude_code,
]


def parses_or_refuses(parse: Any, data: object) -> None:
    try:
        result = parse(data)
    except CredentialsError:
        return
    assert isinstance(result, Credentials)


class TestParserProperties:
    @given(data=ANY_INPUT, which=st.integers(min_value=0, max_value=len(PARSERS) - 1))
    def test_any_input(self, data: object, which: int) -> None:
        """Every parser returns Credentials or raises CredentialsError, for any input."""
        parses_or_refuses(PARSERS[which], data)

    @given(data=ANY_INPUT, which=st.integers(min_value=0, max_value=len(PARSERS) - 1))
    def test_any_input_as_json_text(self, data: object, which: int) -> None:
        """Every parser returns Credentials or raises CredentialsError for any JSON text."""
        try:
            text = json.dumps(data)
        except (TypeError, ValueError):
            text = repr(data)
        parses_or_refuses(PARSERS[which], text)

    @given(
        field=st.sampled_from(
            [
                "access_token",
                "refresh_token",
                "expires_in",
                "expires_at",
                "scope",
                "scopes",
                "subscription_type",
                "token_type",
            ]
        ),
        value=JSON_VALUES,
        with_previous=st.booleans(),
    )
    def test_perturbed_token_response(self, field: str, value: object, with_previous: bool) -> None:
        """A token response with one field replaced parses or raises CredentialsError."""
        doc = token_response(**{field: value})
        previous = make() if with_previous else None

        parses_or_refuses(
            lambda d: Credentials.from_token_response(d, now=NOW, previous=previous), doc
        )

    @given(field=st.sampled_from(sorted(wrapper_doc())), value=JSON_VALUES)
    def test_perturbed_wrapper(self, field: str, value: object) -> None:
        """A wrapper object with one field replaced parses or raises CredentialsError."""
        parses_or_refuses(Credentials.from_wrapper, wrapper_doc(**{field: value}))

    @given(field=st.sampled_from(sorted(claude_code_doc()["claudeAiOauth"])), value=JSON_VALUES)
    def test_perturbed_claude_code(self, field: str, value: object) -> None:
        """A valid Claude Code document with one field replaced still parses or raises."""
        parses_or_refuses(Credentials.from_claude_code, claude_code_doc(**{field: value}))

    @given(
        expires_ms=st.integers(min_value=100_000_000_000, max_value=253_402_300_799_999),
        scopes=st.lists(st.text(alphabet="abc:_", min_size=1, max_size=8), max_size=3),
    )
    def test_wrapper_round_trip(self, expires_ms: int, scopes: list[str]) -> None:
        """For every millisecond expiry from 1973 to 9999, the wrapper shape round-trips."""
        doc = wrapper_doc(expires_at=expires_ms, scopes=scopes)

        assert doc == Credentials.from_wrapper(doc).to_wrapper()
