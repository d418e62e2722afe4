"""What an operator installs: the project's wheel, into a fresh virtual environment, gives
a working ``meshscale`` (package data included), without the source tree."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_the_wheel_installs_and_runs(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    # No build isolation and no index: the build tools come from the dev extras, so the
    # test needs no network.
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "--wheel-dir", str(wheels), str(ROOT)],
        capture_output=True, text=True, timeout=240)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = wheels.glob("meshscale-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for part in ("meshscale/runtime/dashboard/index.html", "meshscale/runtime/dashboard/app.js",
                 "meshscale/py.typed", "meshscale/cli.py"):
        assert part in names, part
    # A fresh environment: the wheel in it, its dependencies seen through a .pth line to
    # this environment's site-packages (a plain path: the editable install's finder there
    # is not activated, so only the wheel's copy of meshscale can be imported).
    env = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True,
                   timeout=120)
    py = env / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path("
                           "'purelib'))"], capture_output=True, text=True, check=True
                          ).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
         "--no-index", str(wheel)], capture_output=True, text=True, timeout=240)
    assert installed.returncode == 0, installed.stderr[-2000:]
    where = subprocess.run([str(py), "-c", "import meshscale; print(meshscale.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path)
    assert where.stdout.startswith(site), where.stdout
    # fsspec finds meshscale:// by the wheel's entry point, without an import of ours.
    if importlib.util.find_spec("fsspec") is not None:
        found = subprocess.run(
            [str(py), "-c", "import fsspec; c = fsspec.get_filesystem_class('meshscale'); "
             "print(c.__module__, c.__name__)"], capture_output=True, text=True, timeout=60,
            cwd=tmp_path)
        assert found.stdout.split() == ["meshscale.client.fs", "MeshFileSystem"], found.stderr
    exe = env / "bin" / "meshscale"
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True,
                             timeout=60, cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("meshscale "), version
    example = subprocess.run([str(exe), "node", "config-example"], capture_output=True,
                             text=True, timeout=60, cwd=tmp_path)
    assert example.returncode == 0 and "data_dir" in example.stdout
    made = subprocess.run([str(exe), "init", str(tmp_path / "admin")], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
