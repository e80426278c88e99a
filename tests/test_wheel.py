"""The runtime as a user installs it: a wheel built from this tree, installed (not editable) into a fresh virtual
environment, serves the web page at `/` from its own package data; the training recipe is not in it.

The venv sees the system's site-packages (torch and the other dependencies are not installed again) and the wheel
goes in with `--no-deps`; the test then checks that the package it runs is the venv's copy, not this checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import urllib.request
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What a wheel is built from: the tree less what no wheel holds (and that is large or busy on a shared machine).
NOT_BUILT = shutil.ignore_patterns(".git", "runs", "build", "*.egg-info", "__pycache__", "tests", "benchmarks", "docs")

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of this tree, built from a copy so that the build leaves nothing in the checkout."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=NOT_BUILT)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(work), str(source)],
        check=True,
    )  # fmt: skip
    (built,) = work.glob("streamgen-*.whl")
    return built


def test_the_wheel_holds_the_page_and_no_training(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "streamgen_server/web/index.html" in names
    assert any(name.startswith("streamgen/assets/default-model/") for name in names)
    assert not [name for name in names if "train" in name.split("/")[0] or "/training/" in name]


def test_an_installed_wheel_serves_the_page(wheel: Path, tmp_path: Path) -> None:
    env = tmp_path / "venv"
    venv.create(env, system_site_packages=True, with_pip=False)
    python = env / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)]
    subprocess.run(pip, check=True)
    clean = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}  # nothing of the checkout
    where = subprocess.run(
        [str(python), "-c", "import streamgen_server; print(streamgen_server.__file__)"],
        cwd=tmp_path, env=clean, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert Path(where.strip()).is_relative_to(env), where  # the installed copy, not the checkout

    server = subprocess.Popen(
        [str(env / "bin" / "streamgen"), "serve", "--port", "0", "--device", "cpu", "--no-overlap"],
        cwd=tmp_path, env=clean, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        for line in server.stdout:  # the model loads, then the URL is printed
            if url := re.search(r"on (http://\S+/)", line):
                break
        else:
            pytest.fail(f"the server stopped before listening (exit {server.wait()})")
        with urllib.request.urlopen(url[1], timeout=30) as page:
            assert page.status == 200
            assert "<html" in page.read().decode().lower()
    finally:
        server.terminate()
        server.wait(timeout=30)
