"""Fixtures shared by all test packages: a real S3-compatible endpoint (moto's standalone server).

The server starts once per session, on 127.0.0.1 and a free port, only when a test asks for it.
Each test gets its own bucket and fake credentials in its environment, so tests never see each
other's objects and never reach AWS or the user's ~/.aws.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.servers import Server, running_server

S3_REGION = "us-east-1"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": S3_REGION,
    "AWS_REQUEST_CHECKSUM_CALCULATION": "WHEN_REQUIRED",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "WHEN_REQUIRED",
}


@dataclass(frozen=True)
class S3Bucket:
    endpoint_url: str
    name: str
    region: str = S3_REGION

    def client(self) -> Any:
        """A boto3 S3 client for this endpoint (credentials come from the test's environment)."""
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    command = [sys.executable, "-m", "moto.server", "-H", "{host}", "-p", "{port}"]
    with running_server(command, "/moto-api/", log_file=log, timeout=60) as server:
        yield server


@pytest.fixture
def s3_bucket(
    moto_server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> S3Bucket:
    """A fresh empty bucket, with fake credentials (and no ~/.aws) in this test's environment."""
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    bucket = S3Bucket(moto_server.url, f"test-{uuid.uuid4().hex[:12]}")
    bucket.client().create_bucket(Bucket=bucket.name)
    return bucket
