"""A minimal PEP 517 / PEP 660 build backend, standard library only.

The package is pure Python with no dependencies, so building it needs no
setuptools: this backend zips matchlock/ into a py3-none-any wheel (or an
editable wheel holding a .pth file) and tars the source tree into an sdist.
Because pyproject.toml declares ``requires = []``, pip can build with
isolation and without reaching any package index.
"""

import base64
import hashlib
import io
import os
import re
import tarfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "matchlock"


def _project():
    """name, version, description and requires-python from [project]."""
    meta = {}
    section = None
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            m = re.match(r"^\[([^\]]+)\]$", line)
            if m:
                section = m.group(1)
                continue
            m = re.match(r'^([A-Za-z-]+)\s*=\s*"([^"]*)"$', line)
            if section == "project" and m:
                meta[m.group(1)] = m.group(2)
    for key in ("name", "version"):
        if key not in meta:
            raise RuntimeError(f"pyproject.toml: [project] {key} is missing")
    return meta


def _dist_info_name(meta):
    return f"{meta['name']}-{meta['version']}.dist-info"


def _metadata(meta):
    readme = ""
    path = os.path.join(ROOT, "README.md")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            readme = f.read()
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {meta['name']}",
        f"Version: {meta['version']}",
        f"Summary: {meta.get('description', '')}",
        f"Requires-Python: {meta.get('requires-python', '>=3.9')}",
        "Description-Content-Type: text/markdown",
        "",
        readme,
    ]
    return "\n".join(lines).encode("utf-8")


def _wheel_file():
    return b"Wheel-Version: 1.0\nGenerator: matchlock-backend\nRoot-Is-Purelib: true\nTag: py3-none-any\n"


def _package_files():
    out = []
    pkg = os.path.join(ROOT, PACKAGE)
    for dirpath, dirnames, filenames in os.walk(pkg):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith((".py", ".typed")):
                full = os.path.join(dirpath, name)
                out.append((os.path.relpath(full, ROOT).replace(os.sep, "/"), full))
    return out


def _write_wheel(wheel_directory, entries):
    """entries: (archive name, bytes). Adds WHEEL, METADATA and RECORD."""
    meta = _project()
    dist_info = _dist_info_name(meta)
    entries = list(entries) + [
        (f"{dist_info}/METADATA", _metadata(meta)),
        (f"{dist_info}/WHEEL", _wheel_file()),
        (f"{dist_info}/top_level.txt", (PACKAGE + "\n").encode()),
    ]
    record = []
    for name, data in entries:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    entries.append((f"{dist_info}/RECORD", ("\n".join(record) + "\n").encode()))
    filename = f"{meta['name']}-{meta['version']}-py3-none-any.whl"
    stamp = time.gmtime(int(os.environ.get("SOURCE_DATE_EPOCH", "315532800")))[:6]
    with zipfile.ZipFile(os.path.join(wheel_directory, filename), "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=stamp)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return filename


def _read(path):
    with open(path, "rb") as f:
        return f.read()


# --- PEP 517 hooks -----------------------------------------------------------

def get_requires_for_build_wheel(config_settings=None):
    return []


def get_requires_for_build_sdist(config_settings=None):
    return []


def get_requires_for_build_editable(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    meta = _project()
    dist_info = os.path.join(metadata_directory, _dist_info_name(meta))
    os.makedirs(dist_info, exist_ok=True)
    with open(os.path.join(dist_info, "METADATA"), "wb") as f:
        f.write(_metadata(meta))
    with open(os.path.join(dist_info, "WHEEL"), "wb") as f:
        f.write(_wheel_file())
    return os.path.basename(dist_info)


prepare_metadata_for_build_editable = prepare_metadata_for_build_wheel


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return _write_wheel(wheel_directory, [(name, _read(full)) for name, full in _package_files()])


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    # A .pth file puts this source tree on sys.path (PEP 660).
    return _write_wheel(wheel_directory, [(f"_{PACKAGE}_editable.pth", (ROOT + "\n").encode())])


def build_sdist(sdist_directory, config_settings=None):
    meta = _project()
    base = f"{meta['name']}-{meta['version']}"
    filename = base + ".tar.gz"
    files = [("pyproject.toml", os.path.join(ROOT, "pyproject.toml")),
             ("_build/backend.py", os.path.join(ROOT, "_build", "backend.py"))]
    if os.path.exists(os.path.join(ROOT, "README.md")):
        files.append(("README.md", os.path.join(ROOT, "README.md")))
    files += _package_files()
    with tarfile.open(os.path.join(sdist_directory, filename), "w:gz", format=tarfile.PAX_FORMAT) as tf:
        for name, full in files:
            tf.add(full, arcname=f"{base}/{name}", recursive=False)
        pkg_info = _metadata(meta)
        info = tarfile.TarInfo(f"{base}/PKG-INFO")
        info.size = len(pkg_info)
        info.mode = 0o644
        tf.addfile(info, io.BytesIO(pkg_info))
    return filename
