"""Answers that quote back the tokens sent, for the tests that check no error repeats them."""

from __future__ import annotations

import json
from urllib.parse import quote, quote_plus

from credkeeper import Credentials
from credkeeper.testing import WrapperFault


def echo(credentials: Credentials) -> str:
    """A body that quotes the tokens sent, in every encoding a server might use."""
    access = credentials.access_token.get_secret_value()
    refresh = credentials.refresh_token.get_secret_value()
    return (
        f"refresh_token={quote(refresh, safe='')}&access={quote_plus(access)} "
        f"json: {json.dumps({'token': refresh, 'at': access})} plain: {refresh} {access}"
    )


def unprocessable(credentials: Credentials) -> WrapperFault:
    """A FastAPI 422 whose msg and input echo the oauth_credentials sent."""
    detail = {
        "type": "value_error",
        "loc": ["body", "oauth_credentials"],
        "msg": f"Value error, unusable credentials: {echo(credentials)}",
        "input": credentials.to_wrapper(),
    }
    return WrapperFault.status(422, body=json.dumps({"detail": [detail]}))
