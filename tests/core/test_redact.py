"""redact and excerpt: what is masked before a provider body reaches a message or a log."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import given
from hypothesis import strategies as st

from credkeeper import Secret
from credkeeper._redact import Redactor, excerpt, harvest, redact, sealed, secret_key

MASK = "[REDACTED]"
OAT = "sk-ant-oat01-QZXJaccess_Token-9876"
ORT = "sk-ant-ort01-QZXJrefresh-Token_5432"


class TestRedact:
    def test_plain_text_unchanged(self) -> None:
        """Text without secrets or token shapes comes back unchanged."""
        text = "upstream connect error or disconnect/reset before headers"

        assert text == redact(text)

    def test_known_secret(self) -> None:
        """A known secret is masked wherever it appears."""
        assert f"a {MASK} b {MASK}" == redact(
            "a opaque-known-1 b opaque-known-1", ["opaque-known-1"]
        )

    def test_several_known_secrets(self) -> None:
        """Every known secret is masked."""
        assert f"{MASK} and {MASK}" == redact(
            "first-secret and second-secret", ["first-secret", "second-secret"]
        )

    def test_empty_secret_ignored(self) -> None:
        """An empty known secret masks nothing."""
        assert "text" == redact("text", [""])

    @pytest.mark.parametrize("token", [OAT, ORT, "sk-ant-api03-QZXJ-abc"])
    def test_anthropic_token_shape(self, token: str) -> None:
        """sk-ant-... tokens are masked without being known."""
        assert f"claude --token {MASK} failed" == redact(f"claude --token {token} failed")

    @pytest.mark.parametrize(
        "key",
        [
            "access_token",
            "refresh_token",
            "id_token",
            "client_secret",
            "accessToken",
            "refreshToken",
            "auth_token",
            "ACCESS_TOKEN",
        ],
    )
    def test_json_token_field(self, key: str) -> None:
        """The value of a JSON token field is masked and the key kept."""
        text = f'{{"error": "x", "{key}": "opaqueQZXJ.value/1", "other": "kept"}}'

        assert f'{{"error": "x", "{key}": "{MASK}", "other": "kept"}}' == redact(text)

    def test_json_field_with_spaces(self) -> None:
        """A JSON token field spaced around the colon is masked."""
        assert f'{{"refresh_token" :  "{MASK}"}}' == redact('{"refresh_token" :  "opaqueQZXJ"}')

    def test_form_token_field(self) -> None:
        """Form-encoded token parameters are masked."""
        text = "grant_type=refresh_token&refresh_token=opaqueQZXJ&client_id=abc"

        assert f"grant_type=refresh_token&refresh_token={MASK}&client_id=abc" == redact(text)

    def test_bearer(self) -> None:
        """A bearer credential is masked after the word Bearer."""
        assert f"Authorization: Bearer {MASK}" == redact("Authorization: Bearer xyz")

    def test_bearer_jwt_like(self) -> None:
        """A bearer credential with dots and padding is masked whole."""
        assert f"bearer {MASK} rest" == redact("bearer eyJ.QZXJ-_~+/abc== rest")

    def test_mask_is_stable(self) -> None:
        """Redacting redacted text changes nothing."""
        once = redact(f'{{"access_token": "{OAT}"}} Bearer abc', ["abc"])

        assert once == redact(once, ["abc"])

    def test_overlapping_secrets(self) -> None:
        """A known secret that contains another known secret is masked whole."""
        assert f"x {MASK} y" == redact("x opaqueQZXJtail y", ["opaqueQZXJ", "opaqueQZXJtail"])


class TestExcerpt:
    def test_short_text_unchanged(self) -> None:
        """A short single-line text is returned as it is."""
        assert "Not found" == excerpt("Not found")

    def test_single_line(self) -> None:
        """Newlines, tabs and runs of spaces collapse to single spaces."""
        assert "a b c d" == excerpt("a\nb\r\n\tc    d\n")

    def test_bounded(self) -> None:
        """A long text is cut to the limit, ending in an ellipsis."""
        result = excerpt("word " * 200, limit=50)

        assert (50, "…") == (len(result), result[-1])

    def test_default_limit(self) -> None:
        """The default limit is 200 characters."""
        assert 200 == len(excerpt("x" * 1000))

    def test_exact_limit_not_cut(self) -> None:
        """A text exactly at the limit is not cut."""
        assert "x" * 20 == excerpt("x" * 20, limit=20)

    def test_redacts(self) -> None:
        """The excerpt is redacted."""
        assert f"token {MASK} and {MASK}" == excerpt(
            f"token {OAT}\nand opaque-known", ["opaque-known"]
        )

    def test_token_cut_by_limit_not_revealed(self) -> None:
        """A token that straddles the limit shows none of its characters."""
        text = "e" * 185 + " " + OAT + " tail"

        result = excerpt(text)

        assert (False, False) == ("QZXJ" in result, "oat01" in result)

    def test_known_secret_cut_by_limit_not_revealed(self) -> None:
        """A known secret that straddles the limit shows none of its characters."""
        text = "e" * 195 + " QZXJopaqueSecretValue"

        assert "QZXJ" not in excerpt(text, ["QZXJopaqueSecretValue"])

    @given(
        before=st.integers(min_value=0, max_value=300),
        limit=st.integers(min_value=1, max_value=300),
        shape=st.sampled_from(
            [
                "sk-ant-oat01-QZXJ{body}",
                '"access_token": "QZXJ{body}"',
                "refresh_token=QZXJ{body}",
                "Bearer QZXJ{body}",
                "known-QZXJ{body}",
            ]
        ),
        body=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", max_size=40),
    )
    def test_no_token_fragment_at_any_cut(
        self, before: int, limit: int, shape: str, body: str
    ) -> None:
        """Wherever the limit falls, no fragment of a token's value reaches the excerpt."""
        token = shape.format(body=body)
        known = ["known-QZXJ" + body]

        result = excerpt("e" * before + " " + token + " after", known, limit=limit)

        assert (False, True) == ("QZXJ" in result, len(result) <= limit)


ODD = 'tok/QZXJ+4711=é"quoted" \\back'


class TestEncodings:
    @pytest.mark.parametrize(
        "form",
        [
            ODD,
            json.dumps(ODD)[1:-1],
            json.dumps(ODD, ensure_ascii=False)[1:-1],
            json.dumps(ODD)[1:-1].replace("/", "\\/"),
            json.dumps(json.dumps(ODD))[3:-3],
            quote(ODD, safe=""),
            quote_plus(ODD, safe=""),
        ],
        ids=["plain", "json", "json-unicode", "json-slash", "json-twice", "url", "url-plus"],
    )
    def test_known_secret_masked_in_every_encoding(self, form: str) -> None:
        """A known secret is masked however the body encodes it."""
        assert f"before {MASK} after" == redact(f"before {form} after", [ODD])

    def test_secret_given_as_secret(self) -> None:
        """A secret passed as a Secret is masked like a plain one."""
        assert f"a {MASK} b" == redact("a opaque-known-1 b", [Secret("opaque-known-1")])

    def test_lone_surrogate_secret(self) -> None:
        """A secret holding a lone surrogate is masked in its JSON escape, without an error."""
        secret = "opaque-half\ud800pair"

        assert f"x {MASK} y" == redact(f"x {json.dumps(secret)[1:-1]} y", [secret])


class TestSecretKey:
    @pytest.mark.parametrize(
        "name", ["access_token", "refreshToken", "ID-TOKEN", "client_secret", "x_token_y"]
    )
    def test_token_and_secret_names(self, name: str) -> None:
        """A field whose normalized name mentions a token or a secret holds secrets."""
        assert secret_key(name)

    @pytest.mark.parametrize("name", ["token_type", "expires_in", "scope", 7])
    def test_other_names(self, name: object) -> None:
        """token_type, other names and non-strings hold no secrets."""
        assert not secret_key(name)


def values(secrets: list[Secret]) -> set[str]:
    return {secret.get_secret_value() for secret in secrets}


class TestHarvest:
    def test_token_fields_at_any_depth(self) -> None:
        """Strings under token-named fields are found, nested and inside lists."""
        document = {
            "data": {"access_token": "opaque-access-1"},
            "accessToken": ["opaque-access-2"],
            "list": [{"refresh-token": {"value": "opaque-refresh-3"}}],
            "token_type": "Bearer-type",
            "note": "opaque-but-not-a-token-field",
        }

        assert {"opaque-access-1", "opaque-access-2", "opaque-refresh-3"} == values(
            harvest(document)
        )

    def test_short_values_skipped(self) -> None:
        """A value too short to be a token is not harvested."""
        assert set() == values(harvest({"access_token": "x"}))

    def test_everything_adds_long_strings(self) -> None:
        """With everything, long strings without spaces are found under any name."""
        document = {"a": ["q" * 20], "b": "a sentence with spaces in it", "c": "short"}

        assert {"q" * 20} == values(harvest(document, everything=True))

    def test_sealed_values_found(self) -> None:
        """Secrets already sealed in a document are harvested."""
        assert {"opaque-sealed-1"} == values(harvest({"x": Secret("opaque-sealed-1")}))

    def test_deep_nesting(self) -> None:
        """A document nested deeper than the recursion limit is walked."""
        document: object = "opaque-deep-token"
        for _ in range(5000):
            document = {"access_token": [document]}

        assert {"opaque-deep-token"} == values(harvest(document))


class TestSealed:
    def test_token_fields_become_secrets(self) -> None:
        """Token-named fields hold Secrets, at any depth; other fields are kept."""
        document = {
            "access_token": "a1",
            "data": {"refreshToken": ["r1"]},
            "scope": "user:inference",
            "expires_in": 60,
        }

        assert {
            "access_token": Secret("a1"),
            "data": {"refreshToken": [Secret("r1")]},
            "scope": "user:inference",
            "expires_in": 60,
        } == sealed(document)

    def test_deep_nesting(self) -> None:
        """A document nested deeper than the recursion limit is copied."""
        document: dict[str, Any] = {"access_token": "a1"}
        for _ in range(5000):
            document = {"data": [document]}

        copy = sealed(document)
        for _ in range(5000):
            copy = copy["data"][0]

        assert {"access_token": Secret("a1")} == copy

    def test_repr_shows_no_token(self) -> None:
        """The sealed copy's repr, which tracebacks capture, shows no token."""
        assert "QZXJ" not in repr(sealed({"data": {"access_token": ["opaque-QZXJ"]}}))


class TestRedactor:
    def test_repr_counts_secrets(self) -> None:
        """The repr shows how many secrets it holds, never their values."""
        redactor = Redactor(["opaque-QZXJ-1", Secret("opaque-QZXJ-2"), None, ""])

        assert "Redactor(2 secrets)" == repr(redactor)

    def test_harvesting_masks_the_body_tokens(self) -> None:
        """Tokens a JSON body carries are masked wherever they appear."""
        body = json.dumps({"data": {"access_token": "opaque-new-QZXJ"}})

        redactor = Redactor(["opaque-sent-1"]).harvesting(body)

        assert f"{MASK} and {MASK}" == redactor.redact("opaque-new-QZXJ and opaque-sent-1")

    def test_harvesting_bytes(self) -> None:
        """A body given as bytes is harvested too."""
        body = json.dumps({"refresh_token": ["opaque-new-QZXJ"]}).encode()

        assert f"x {MASK}" == Redactor().harvesting(body).redact("x opaque-new-QZXJ")

    def test_harvesting_everything(self) -> None:
        """With everything, long strings under unknown names are masked too."""
        body = json.dumps({"result": ["QZXJ" * 6]})

        assert f"x {MASK}" == Redactor().harvesting(body, everything=True).redact("x " + "QZXJ" * 6)

    def test_harvesting_text_adds_nothing(self) -> None:
        """A body that is not JSON adds no secret."""
        assert "Redactor(1 secrets)" == repr(Redactor(["opaque-1"]).harvesting("<html>"))

    def test_excerpt_limit_checked(self) -> None:
        """A limit below one is refused."""
        with pytest.raises(ValueError, match="limit"):
            Redactor().excerpt("text", limit=0)
