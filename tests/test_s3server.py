"""The S3 test server speaks S3 over HTTP: fsspec's s3:// (s3fs) writes and reads through it, and a
separate process reaches the same bucket through the environment the fixture hands out."""

from __future__ import annotations

import os
import subprocess
import sys


def test_s3fs_round_trip_and_another_process_sees_it(s3):
    import fsspec

    url = s3.bucket()
    with fsspec.open(f"{url}/a/b.txt", "w") as f:
        f.write("hello")
    fs = s3.fs()
    assert fs.cat(f"{url}/a/b.txt") == b"hello"
    assert fs.ls(f"{url}/a") == [f"{url[5:]}/a/b.txt"]
    code = f"import fsspec; print(fsspec.open('{url}/a/b.txt').open().read().decode())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, **s3.env}, timeout=60)
    assert out.stdout.strip() == "hello", out.stderr[-2000:]
    # a key that was never written is absent, not an empty file (memory:// differs here)
    assert not fs.exists(f"{url}/a/c.txt")
