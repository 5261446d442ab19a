import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_platform_dir_is_not_a_package():
    # `platform/` holds deployment files; as a package it would shadow the stdlib module of the same name.
    assert not (ROOT / "platform" / "__init__.py").exists(), "remove platform/__init__.py: it shadows stdlib"


def test_stdlib_platform_imports_from_repo_root():
    code = "import platform, sys; print(platform.python_version()); print(platform.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    version, path = out.stdout.split()
    assert version == ".".join(map(str, sys.version_info[:3]))
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert Path(path).resolve().parent == stdlib
