"""A real S3 API (moto server mode) on loopback for storage tests; import the fixture into a test module."""

import pytest

from tests.services import s3_server


@pytest.fixture(scope="module")
def s3_bucket():
    """moto's S3 server on 127.0.0.1 (tests/services.py), AWS_* env pointed at it; yields 's3://<bucket>'."""
    mp = pytest.MonkeyPatch()
    with s3_server("nfnet-test") as s3:
        for k, v in s3["env"].items():
            mp.setenv(k, v)
        mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        try:
            yield "s3://nfnet-test"
        finally:
            mp.undo()
