"""Shared test set-up: every async test runs under asyncio and under trio."""

import pytest
from backends import ASYNCIO, TRIO
from pgfixtures import pg_database, pg_dsn, pg_server, pg_supply  # noqa: F401  (fixtures)
from s3fixtures import s3_bucket, s3_server  # noqa: F401  (fixtures)


@pytest.fixture(params=[ASYNCIO, TRIO])
def anyio_backend(request: pytest.FixtureRequest) -> object:
    return request.param
