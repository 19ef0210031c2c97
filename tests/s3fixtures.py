"""S3 for the test suite: moto's S3-compatible server on 127.0.0.1 (real HTTP; the
real aioboto3 client talks to it), one per session, a fresh bucket per test."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator

import attrs
import pytest

_numbers = itertools.count()
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}


@attrs.frozen
class S3Server:
    endpoint: str
    server: object

    def session(self):
        import aioboto3

        return aioboto3.Session(**CREDENTIALS)

    def admin(self):
        """A plain (synchronous) boto3 client, for setting up and looking behind the IO manager."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **CREDENTIALS)


def start_moto(port: int = 0):
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = start_moto()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(f"http://{host}:{port}", server)
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    name = f"flowstone-test-{next(_numbers)}"
    s3_server.admin().create_bucket(Bucket=name)
    return name
