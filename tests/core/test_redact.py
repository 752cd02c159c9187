"""redact and excerpt: what is masked before a provider body reaches a message or a log."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from credkeeper._redact import excerpt, redact

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
