"""A real S3-protocol server on 127.0.0.1 for the tests: moto's server (an HTTP implementation of
the S3 API, the same wire protocol boto3, s3fs and DeepSpeed-through-fsspec speak to AWS), started
in a thread of the test process on a free port and stopped with it.

`memory://` shares one process's dict and has neither S3's put/get semantics (no rename, no
directories, eventual listing) nor its wire protocol, so what a cluster run does against a
bucket is only shown against this server.

Subprocesses (torchrun ranks, Ray workers, `make` targets) reach it through `S3Server.env`:
AWS_ENDPOINT_URL (read by botocore >= 1.31, so s3fs and boto3 alike), fake credentials and a
region. Nothing here talks to AWS.
"""

from __future__ import annotations

import os
import socket
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    env: dict[str, str] = field(default_factory=dict)

    def bucket(self, name: str | None = None) -> str:
        """A new, empty bucket; returns its s3:// URL."""
        import boto3

        name = name or f"trmgpt-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                     aws_access_key_id="testing", aws_secret_access_key="testing"
                     ).create_bucket(Bucket=name)
        return f"s3://{name}"

    def fs(self):
        """An s3fs filesystem on this server (no instance cache: each test gets its own)."""
        import s3fs

        return s3fs.S3FileSystem(key="testing", secret="testing", skip_instance_cache=True,
                                 client_kwargs={"endpoint_url": self.endpoint,
                                                "region_name": "us-east-1"})


@contextmanager
def s3_server():
    """Start moto's S3 server on 127.0.0.1; set the process environment so fsspec's s3:// and
    boto3 reach it (restored afterwards); yield an S3Server."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint,
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # fsspec caches one S3FileSystem per set of options: one made for an earlier module's server
    # (same options, another port) would answer s3:// URLs here with a closed endpoint.
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield S3Server(endpoint, env)
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
