"""The package type-checks with mypy, and its public API has the types typing_usage.py states
(fastloss ships py.typed, so these are the types users' checkers see)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("mypy", reason="mypy is a test dependency (make test installs it)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mypy_clean(tmp_path):
    targets = [os.path.join(ROOT, "python", "fastloss"), os.path.join(ROOT, "tests", "typing_usage.py")]
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--cache-dir", str(tmp_path / "cache"), *targets],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ships_type_information():
    import fastloss

    package = os.path.dirname(fastloss.__file__)
    assert os.path.isfile(os.path.join(package, "py.typed"))
    assert os.path.isfile(os.path.join(package, "_C.pyi"))


def test_extension_stub_matches_the_module(tmp_path):
    """_C.pyi states what the compiled module has (names and signatures)."""
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "fastloss._C", "--mypy-config-file", os.devnull],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
