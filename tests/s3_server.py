"""A real S3 API (moto server mode) on loopback for storage tests; import the fixture into a test module."""

import pytest


@pytest.fixture(scope="module")
def s3_bucket():
    """Starts moto's S3 server on 127.0.0.1, points AWS_* env at it, yields 's3://<bucket>'."""
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    mp = pytest.MonkeyPatch()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1"}
    for k, v in env.items():
        mp.setenv(k, v)
    mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    mp.delenv("AWS_PROFILE", raising=False)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    mp.setenv("AWS_ENDPOINT_URL", endpoint)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="nfnet-test")
    try:
        yield "s3://nfnet-test"
    finally:
        server.stop()
        mp.undo()
