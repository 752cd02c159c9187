"""credkeeper's AWS Secrets Manager store: one secret per credential, through boto3.

Registered as the ``aws-sm`` scheme of the ``credkeeper.stores`` entry points, so
``credkeeper.open_store("aws-sm://us-east-1/credkeeper/prod/")`` opens a
:class:`SecretsManagerStore`. Sync only: async code gets it through
:func:`credkeeper.as_async_store`. :func:`estimate_write_rate` checks a deployment's write
load against AWS's guidance before it runs into throttling or the versions quota.
"""

from __future__ import annotations

from ._rate import WriteRate, estimate_write_rate
from ._store import SecretsManagerStore

__all__ = ["SecretsManagerStore", "WriteRate", "estimate_write_rate"]
