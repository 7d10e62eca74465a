"""Shared fixtures of the Python test suite (chart, monitoring, packaging).

The Rust build comes first in scripts/test, so the binary is there when these run.
"""
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def binary_path() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("MTS_BIN", ROOT / "target" / "debug" / "magento-token-sidecar"))
    if not path.exists():
        pytest.fail(f"{path} is missing: run `cargo build` first (scripts/test does)")
    return path


@pytest.fixture(scope="session")
def root() -> pathlib.Path:
    return ROOT


@pytest.fixture(scope="session")
def binary() -> pathlib.Path:
    return binary_path()


@pytest.fixture
def devserver(binary):
    """Start the built-in Magento-compatible server on loopback.

    Returns a function taking `email:password` strings (and optional extra flags) that starts
    the server and gives back its base URL; every server started is stopped at teardown.
    """
    procs = []

    def start(*customers: str, extra=()):
        args = [str(binary), "devserver", "--listen", "127.0.0.1:0"]
        for c in customers:
            args += ["--customer", c]
        args += list(extra)
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        line = proc.stdout.readline().strip()
        prefix = "listening on "
        if not line.startswith(prefix):
            raise RuntimeError(f"devserver did not start: {line!r}")
        return line[len(prefix):]

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
