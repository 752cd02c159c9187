"""The backend servers of the adapters' tests, for integration tests that cross stores.

The MongoDB and Secrets Manager fixtures live with their adapters' tests; importing them here
makes them reachable from this directory too, found or started by the same rules
(``tests/adapters/mongo/conftest.py``, ``tests/adapters/aws/conftest.py``). PostgreSQL and
MariaDB come from ``tests/backends.py`` for every test already.
"""

from __future__ import annotations

from tests.adapters.aws.conftest import aws_credentials, aws_endpoint, prefix, sm_client
from tests.adapters.mongo.conftest import mongodb_database, mongodb_store_url, mongodb_url

__all__ = [
    "aws_credentials",
    "aws_endpoint",
    "mongodb_database",
    "mongodb_store_url",
    "mongodb_url",
    "prefix",
    "sm_client",
]
