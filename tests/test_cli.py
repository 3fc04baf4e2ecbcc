"""The command line: ``python -m roialign_cy info`` and ``demo`` (the README's first command)."""
import os
import struct
import subprocess
import sys
import zlib

import pytest

import roialign_cy

# run the children from the directory holding the roialign_cy this test imported, so that they
# use the same build ("python -m" puts the working directory first on sys.path)
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(roialign_cy.__file__)))


def _run(*args, cwd=PACKAGE_PARENT):
    env = dict(os.environ, PYTHONPATH=PACKAGE_PARENT)
    return subprocess.run([sys.executable, "-m", "roialign_cy", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_info_reports_version_and_backends():
    proc = _run("info")
    assert proc.returncode == 0, proc.stderr
    assert roialign_cy.__version__ in proc.stdout
    assert "backend cpu:  available" in proc.stdout
    assert "backend cuda" in proc.stdout


def _png_size(path):
    """Width and height of a PNG, after checking its signature and the IHDR chunk's CRC."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR"
    body = data[16:16 + length]
    assert struct.unpack(">I", data[16 + length:20 + length])[0] == zlib.crc32(kind + body)
    return struct.unpack(">II", body[:8])


@pytest.mark.parametrize("renderer", ["raster", "auto"])
def test_demo_prints_a_table_and_writes_a_picture(tmp_path, renderer):
    out = tmp_path / "demo.png"
    proc = _run("demo", "--out", str(out), "--renderer", renderer, "--backend", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "cpu us/call" in proc.stdout
    assert proc.stdout.count("rotated") >= 1 and proc.stdout.count("axis") >= 1
    width, height = _png_size(out)
    assert width > 200 and height > 200
