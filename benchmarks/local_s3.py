"""A throwaway S3 endpoint for benchmarks: a `moto_server` subprocess on 127.0.0.1 with one bucket.

with local_s3("bucket") as env:   # env: the AWS_* variables (also set in os.environ) for child processes
    shard_dataset(data, "s3://bucket/prefix")
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_env(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


@contextlib.contextmanager
def local_s3(bucket: str) -> Iterator[dict[str, str]]:
    """Start the server, create `bucket`, point this process's AWS_* variables at it; yield the full child
    environment. The server (and everything in it: it keeps data in memory) is gone after the block."""
    import boto3

    endpoint = f"http://127.0.0.1:{_free_port()}"
    port = endpoint.rsplit(":", 1)[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", port],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        os.environ.update(s3_env(endpoint))
        for _ in range(100):
            try:
                boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
                break
            except Exception:  # noqa: BLE001 - the server is still starting
                time.sleep(0.2)
        else:
            raise RuntimeError(f"moto_server on {endpoint} did not come up")
        yield {**os.environ, **s3_env(endpoint)}
    finally:
        server.terminate()
        server.wait(timeout=30)
