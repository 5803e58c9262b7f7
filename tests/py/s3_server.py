#!/usr/bin/env python3
"""An S3-compatible server on loopback (moto's), with one bucket, for the remote-tier tests.

Usage: s3_server.py BUCKET

Creates BUCKET, prints `url: http://127.0.0.1:PORT` once serving, and runs until stdin
closes. Nothing leaves the machine: moto keeps every object in memory.
"""

from __future__ import annotations

import logging
import socket
import sys

import boto3

from moto.server import ThreadedMotoServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    bucket = sys.argv[1]
    # One line per request would drown the test's own output.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    s3 = boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    s3.create_bucket(Bucket=bucket)
    print(f"url: {url}", flush=True)
    sys.stdin.read()
    server.stop()


if __name__ == "__main__":
    main()
