"""Shared test set-up: every async test runs under asyncio and under trio."""

import pytest

from pgfixtures import pg_database, pg_dsn, pg_server, pg_supply  # noqa: F401  (fixtures)
from s3fixtures import s3_bucket, s3_server  # noqa: F401  (fixtures)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param
