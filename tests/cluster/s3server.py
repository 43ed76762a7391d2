"""A real S3 endpoint on the loopback for the tests: moto's ``ThreadedMotoServer`` (the S3 HTTP API, with
IAM authentication on, so a wrong key is refused as a real store refuses it).

``start(port)`` returns the running server and the credentials of an IAM user allowed everything; the
clients under test are configured the way users configure them, through the standard AWS variables
(:func:`aws_env`). Run as a script (``python tests/cluster/s3server.py PORT BUCKET``) it serves until killed
and prints one JSON line with the endpoint and credentials (the SSH-cluster test runs it inside its own
network namespace).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

REGION = "us-east-1"


def free_port(host: str = "127.0.0.1") -> int:
    s = socket.socket()
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return port


@dataclass
class S3:
    server: Any
    endpoint: str
    key: str
    secret: str

    def env(self, **overrides: str) -> dict[str, str]:
        return aws_env(self.endpoint, self.key, self.secret, **overrides)

    def stop(self) -> None:
        self.server.stop()


def aws_env(endpoint: str, key: str, secret: str, **overrides: str) -> dict[str, str]:
    """The standard AWS variables every S3 client here reads (pyarrow, Ray, boto3)."""
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance-profile probe on a machine that is not on EC2
    }
    env.update(overrides)
    return env


def start(port: int | None = None, host: str = "127.0.0.1", buckets: tuple[str, ...] = ()) -> S3:
    """Start moto's S3 server with IAM auth on; create a user with an all-allowing policy and ``buckets``."""
    # moto checks credentials after this many unauthenticated requests: the 3 that create the user below.
    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
    import boto3
    import moto.settings
    from moto.server import ThreadedMotoServer

    moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = 3
    port = port or free_port(host)
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    endpoint = f"http://{host}:{port}"
    iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION,
                       aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")  # fmt: skip
    iam.create_user(UserName="revq")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    iam.put_user_policy(UserName="revq", PolicyName="all", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="revq")["AccessKey"]
    s3 = S3(server, endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION,
                          aws_access_key_id=s3.key, aws_secret_access_key=s3.secret)  # fmt: skip
    for b in buckets:
        client.create_bucket(Bucket=b)
    return s3


if __name__ == "__main__":
    import logging
    import time

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    srv = start(int(sys.argv[1]), buckets=tuple(sys.argv[2:]))
    print(json.dumps({"endpoint": srv.endpoint, "key": srv.key, "secret": srv.secret}), flush=True)
    while True:
        time.sleep(3600)
