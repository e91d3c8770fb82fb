"""The prepared data on a DVC S3 remote: `dvc push` from one clone, `dvc pull` into a fresh one,
through a real S3-protocol server (`moto_server`) on 127.0.0.1 (real DVC with dvc-s3, real git).

Credentials are dummies in the environment of the DVC commands; only the endpoint is written to
`.dvc/config`, as a user does for an S3-compatible store.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dynroute.platform.data.shards import MANIFEST, read_manifest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BUCKET = "dvc-store"
# The project's DVC setup, as a clone has it (no git command runs in the project itself).
DVC_FILES = (".gitignore", ".dvcignore", ".dvc/config", ".dvc/.gitignore", "dvc.yaml",
             "params.yaml")
# Dummy credentials, as tests/conftest.py's moto server takes them (only in the environment).
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

pytestmark = pytest.mark.slow


def sh(*args: object, cwd: Path) -> str:
    env = os.environ | CREDENTIALS | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        env.pop(key, None)  # the endpoint must come from the DVC remote's endpointurl
    res = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(map(str, args))} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


@pytest.fixture(scope="module")
def s3_endpoint(s3_server) -> str:
    """The shared `moto_server` (tests/conftest.py) with an empty bucket; its endpoint URL."""
    s3_server.client().create_bucket(Bucket=BUCKET)
    return s3_server.endpoint


def bucket_keys(endpoint: str, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def project_repo(dest: Path) -> Path:
    """A git repo with the project's DVC setup, sized to prepare in seconds."""
    for name in DVC_FILES:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["synth"] |= {"train": 6, "val": 3, "height": 64, "width": 128}
    params["data"] |= {"rows_per_shard": 4}  # several shards per split
    (dest / "params.yaml").write_text(yaml.safe_dump(params))
    sh("git", "init", "-q", cwd=dest)
    sh("git", "add", "-A", cwd=dest)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init", cwd=dest)
    return dest


def test_prepared_data_round_trips_through_an_s3_remote(s3_endpoint: str, tmp_path: Path):
    a = project_repo(tmp_path / "a")
    sh("dvc", "repro", "prepare", cwd=a)  # the real synth and prepare stages
    prepared = a / "data" / "prepared"
    first = read_manifest(str(prepared))
    assert first.count("train") == 6 and first.count("val") == 3
    assert len(first.shards("train")) == 2, "rows_per_shard 4 splits 6 images in two shards"

    # The remote as a user configures one for an S3-compatible store.
    sh("dvc", "remote", "add", "-d", "s3", f"s3://{BUCKET}/dvc", cwd=a)
    sh("dvc", "remote", "modify", "s3", "endpointurl", s3_endpoint, cwd=a)
    config = (a / ".dvc" / "config").read_text()
    assert s3_endpoint in config and "testing" not in config, "no credentials in git"
    # dvc.lock records the outs, the metrics file included (cached: /metrics/ is not in git).
    sh("git", "add", "dvc.lock", ".dvc/config", cwd=a)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "s3 remote", cwd=a)
    pushed = sh("dvc", "push", cwd=a)
    keys = bucket_keys(s3_endpoint, "dvc/")
    assert keys and all(k.startswith("dvc/files/md5/") for k in keys), keys
    # Every file of the prepared data is an object on the remote (plus the folders' listings).
    cached = {hashlib.md5(p.read_bytes()).hexdigest() for p in prepared.rglob("*") if p.is_file()}
    stored = {k.removeprefix("dvc/files/md5/").replace("/", "") for k in keys}
    assert cached <= stored, (pushed, sorted(cached - stored))
    assert not (tmp_path / ".dvc-remote").exists(), "nothing went to the default local remote"

    # A fresh clone has no data and no cache; pull fetches it from S3.
    b = tmp_path / "b"
    sh("git", "clone", "-q", str(a), str(b), cwd=tmp_path)
    assert not (b / "data").exists() and not (b / ".dvc" / "cache").exists()
    sh("dvc", "pull", "synth", "prepare", cwd=b)
    assert read_manifest(str(b / "data" / "prepared")).content_hash == first.content_hash
    assert digests(b / "data" / "prepared") == digests(prepared)
    assert (b / "data" / "prepared" / MANIFEST).read_bytes() == (prepared / MANIFEST).read_bytes()
    # DVC agrees: the pulled data is what dvc.lock records, so nothing needs to be reproduced.
    status = sh("dvc", "status", "synth", "prepare", cwd=b)
    assert "up to date" in status, status
