"""What `pip install foak-compile` gets: the sdist built from the tracked files, a wheel built from that
sdist (not from the checkout), installed on its own; the `foak` backend resolves from the installed wheel."""

import os
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow  # builds and installs a wheel in subprocesses


def _run(args, cwd, **kw):
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def _build(hook, src, out):
    """setuptools' PEP 517 hook in a fresh interpreter (what pip and `python -m build` call)."""
    code = f"from setuptools import build_meta as b; print(b.{hook}({out!r}))"
    return os.path.join(out, _run([sys.executable, "-c", code], cwd=src).strip().splitlines()[-1])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pkg")
    checkout = tmp / "checkout"  # the tracked files only: what a clean clone holds
    files = _run(["git", "ls-files", "-z"], cwd=ROOT).split("\0")
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            dst = checkout / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(open(src, "rb").read())
    sdist = _build("build_sdist", str(checkout), str(tmp / "sdist"))
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    (unpacked,) = (tmp / "unpacked").iterdir()
    return _build("build_wheel", str(unpacked), str(tmp / "wheel")), tmp


def test_wheel_holds_the_package_and_nothing_else(wheel):
    path, _ = wheel
    names = zipfile.ZipFile(path).namelist()
    for sub in ("patterns", "ops", "kernels"):
        assert f"foak_compile/{sub}/__init__.py" in names, sub
    assert "foak_compile/py.typed" in names
    top = {n.split("/", 1)[0] for n in names}
    assert all(t == "foak_compile" or t.endswith(".dist-info") for t in top), top  # no tests, benchmarks
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "foak = foak_compile.backend:foak" in zipfile.ZipFile(path).read(entry_points).decode()


def test_installed_wheel_registers_the_backend(wheel):
    path, tmp = wheel
    site = tmp / "site"
    _run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site), path],
        cwd=str(tmp),
    )
    probe = (
        "import importlib.metadata as m, torch, foak_compile\n"
        "assert foak_compile.__file__.startswith(SITE), foak_compile.__file__\n"
        "assert m.distribution('foak-compile').locate_file('').as_posix().startswith(SITE)\n"
        "assert torch._dynamo.lookup_backend('foak').__module__ == 'foak_compile.backend'\n"
        "print(m.version('foak-compile'))"
    )
    env = dict(os.environ, PYTHONPATH=str(site))  # ahead of the checkout's editable install
    out = _run([sys.executable, "-c", f"SITE = {str(site)!r}\n" + probe], cwd=str(tmp), env=env)
    import foak_compile

    assert out.strip() == foak_compile.__version__
