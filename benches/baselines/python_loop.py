#!/usr/bin/env python3
"""The token loop people write by hand, in Python with the standard library only.

Logs every customer in once against Magento's customer-token endpoint with a pool of 8
threads, and writes each token atomically (a temporary file in the same directory,
renamed over the old one). Same inputs as the sidecar's `once`: a customers file of
`name<TAB>username<TAB>password_file` lines.

With --no-fsync, neither the files nor the directory are synced: write + rename only, the
loop most people write.

Usage: python_loop.py [--no-fsync] BASE_URL CUSTOMERS_TSV OUT_DIR
Exit status 0 when every token was written, 1 otherwise.
"""
import concurrent.futures
import json
import os
import sys
import tempfile
import urllib.request


def login(fsync, base_url, out_dir, name, username, password_file):
    with open(password_file, encoding="utf-8") as f:
        password = f.read()
    if password.endswith("\n"):
        password = password[:-1]
    body = json.dumps({"username": username, "password": password}).encode()
    request = urllib.request.Request(
        base_url + "/rest/V1/integration/customer/token",
        data=body,
        headers={"Content-Type": "application/json", "Accept": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        token = json.loads(response.read())
    fd, tmp = tempfile.mkstemp(prefix="." + name + ".", suffix=".tmp", dir=out_dir)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, token.encode())
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, os.path.join(out_dir, name))


def main():
    args = sys.argv[1:]
    fsync = "--no-fsync" not in args
    args = [a for a in args if a != "--no-fsync"]
    base_url, customers_tsv, out_dir = args[:3]
    with open(customers_tsv, encoding="utf-8") as f:
        customers = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    failed = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(login, fsync, base_url, out_dir, *c) for c in customers]
        for future in futures:
            try:
                future.result()
            except Exception as e:  # noqa: BLE001 - report and go on, like the daemon
                failed += 1
                print(f"login failed: {e}", file=sys.stderr)
    # One directory sync for the batch, as the sidecar's `once` does.
    if fsync:
        dir_fd = os.open(out_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
