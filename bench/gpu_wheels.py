"""make gpu-wheels: the packages `make gpu-check` needs that the GPU machine's python3 lacks, as wheels.

The machine (no network; its python3 is 3.12.3, Ubuntu 24.04's, so glibc 2.31 or later is assumed) has torch,
Triton, transformers, PEFT, pytest, numpy and the rest of KINDS.md's list, but not the server's packages. This
downloads those, at the lock's versions, for CPython 3.12 manylinux x86_64 into .whl/, drops bitsandbytes'
libraries for other CUDA, ROCm and XPU releases (43 MB of its wheel; torch 2.11+cu130 loads the CUDA 13 one,
and the CPU one is kept), and checks what a device call carries:
under 64 MiB, one wheel per package, tags that install on CPython 3.12, every Requires-Dist met by a wheel
or by the machine, and an install and import from a --target with a python3.12 found here (else tags alone).

    python bench/gpu_wheels.py [--out .whl]
"""
from __future__ import annotations

import argparse
import base64
import csv
import glob
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.tags import compatible_tags, cpython_tags, parse_tag
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "lock.txt"
LIMIT = 64 * 2**20  # what one device call carries, working tree included
# What gpu-check imports that the machine lacks, and their needs the machine lacks too (fastapi imports
# opentelemetry-api at import time). Import names; bitsandbytes needs torch, so only its files are checked here.
WHEELS = {"fastapi": "fastapi", "starlette": "starlette", "pydantic": "pydantic", "pydantic-core": "pydantic_core",
          "annotated-types": "annotated_types", "typing-inspection": "typing_inspection",
          "opentelemetry-api": "opentelemetry.trace", "uvicorn": "uvicorn", "llguidance": "llguidance",
          "gguf": "gguf", "bitsandbytes": None}
# The machine's own packages these wheels need (KINDS.md's list): never carried.
MACHINE = {"anyio", "typing-extensions", "annotated-doc", "click", "h11", "numpy", "pyyaml", "requests", "tqdm",
           "packaging", "torch"}
BNB_KEEP = {"libbitsandbytes_cuda130.so", "libbitsandbytes_cpu.so"}
BNB_LIB = re.compile(r"bitsandbytes/(libbitsandbytes_[^/]*\.so)")
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(31, 16, -1)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]
SUPPORTED = set(cpython_tags((3, 12), ["cp312"], PLATFORMS)) | set(compatible_tags((3, 12), "cp312", PLATFORMS))
ENV = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
INSTALL = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
           "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site")


class WheelError(Exception):
    """A wheel set that would not install or import on the GPU machine."""


def lock_versions(lock: Path = LOCK) -> dict[str, str]:
    """name -> version of every `name==version` line of a pip lock."""
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", lock.read_text(), re.M)
    return {canonicalize_name(name): version for name, version in pins}


def download(out: Path, pins: dict[str, str]) -> None:
    missing = sorted(set(WHEELS) - set(pins))
    if missing:
        raise WheelError(f"not pinned in {LOCK.name}: {missing}")
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(out),
                    *(f"{name}=={pins[name]}" for name in WHEELS)], check=True)


def mib(size: int) -> str:
    return f"{size / 2**20:.2f} MiB"


def _read(zf: zipfile.ZipFile, suffix: str) -> str:
    return next(zf.read(n).decode() for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/" + suffix))


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def prune_bitsandbytes(wheel: Path, keep: set[str] = BNB_KEEP) -> list[str]:
    """Rewrite the wheel without the native libraries not in `keep`, and without their RECORD rows; the other
    files and their hashes are left as they were. Returns the names dropped."""
    with zipfile.ZipFile(wheel) as src:
        drop = [n for n in src.namelist() if (lib := BNB_LIB.fullmatch(n)) and lib[1] not in keep]
        if not drop:
            return []
        record = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        rows = [row for row in csv.reader(io.StringIO(src.read(record).decode())) if row and row[0] not in drop]
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        tmp = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                if info.filename not in drop:
                    dst.writestr(info, text.getvalue() if info.filename == record else src.read(info))
    tmp.replace(wheel)
    return drop


def check_record(wheel: Path) -> None:
    """Every file of the wheel listed in its RECORD with its hash and size, and nothing else listed."""
    with zipfile.ZipFile(wheel) as zf:
        record = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
        rows = {row[0]: row[1:] for row in csv.reader(io.StringIO(zf.read(record).decode())) if row}
        files = {n for n in zf.namelist() if not n.endswith("/")}
        if set(rows) != files:
            raise WheelError(f"{wheel.name}: RECORD and files differ: {sorted(set(rows) ^ files)}")
        for name in files - {record}:
            data = zf.read(name)
            if rows[name] != [_digest(data), str(len(data))]:
                raise WheelError(f"{wheel.name}: RECORD's hash or size of {name} is wrong")


def verify(folder: Path, limit: int = LIMIT, expected=WHEELS, machine=MACHINE) -> tuple[list[Path], list[str]]:
    """The checks that need no python3.12: size, one wheel per expected package, tags, RECORD, Requires-Dist.
    Returns the wheels and what they need of the machine's own packages."""
    wheels = sorted(folder.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    if total >= limit:
        big = max(wheels, key=lambda w: w.stat().st_size)
        raise WheelError(f"{folder} holds {mib(total)} of wheels, over the {mib(limit)} a device call carries "
                         f"(the largest: {big.name}, {mib(big.stat().st_size)})")
    names = [canonicalize_name(parse_wheel_filename(w.name)[0]) for w in wheels]
    if sorted(names) != sorted(expected):
        raise WheelError(f"{folder} should hold one wheel of each of {sorted(expected)}, holds {sorted(names)}")
    versions = {n: str(parse_wheel_filename(w.name)[1]) for n, w in zip(names, wheels)}
    from_machine: dict[str, SpecifierSet] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            tags = {t for line in _read(zf, "WHEEL").splitlines() if line.startswith("Tag:")
                    for t in parse_tag(line.split(":", 1)[1].strip())}
            needs = [Requirement(line.split(":", 1)[1]) for line in _read(zf, "METADATA").splitlines()
                     if line.startswith("Requires-Dist:")]
            libs = {lib[1] for n in zf.namelist() if (lib := BNB_LIB.fullmatch(n))}
        if not tags & SUPPORTED:
            raise WheelError(f"{wheel.name}: tags {sorted(map(str, tags))} do not install on CPython 3.12 "
                             "manylinux x86_64")
        check_record(wheel)
        if libs and libs != BNB_KEEP:
            raise WheelError(f"{wheel.name}: native libraries {sorted(libs)}, should be {sorted(BNB_KEEP)} alone")
        for req in needs:
            name = canonicalize_name(req.name)
            if req.marker and not req.marker.evaluate(ENV):
                continue
            if name in versions and not req.specifier.contains(versions[name], prereleases=True):
                raise WheelError(f"{wheel.name} needs {req}, .whl has {name} {versions[name]}")
            if name not in versions and name not in machine:
                raise WheelError(f"{wheel.name} needs {req}: neither a wheel here nor on the GPU machine")
            if name not in versions:
                from_machine[name] = from_machine.get(name, SpecifierSet()) & req.specifier
    return wheels, [f"{name}{spec}" for name, spec in sorted(from_machine.items())]


def python312() -> str | None:
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    for exe in [shutil.which("python3.12"), *sorted(glob.glob(f"{root}/versions/3.12*/bin/python3.12"), reverse=True)]:
        if exe and subprocess.run([exe, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"],
                                  capture_output=True).returncode == 0:
            return exe
    return None


def import_check(py: str, wheels: list[Path], pins: dict[str, str]) -> dict[str, str]:
    """Install the wheels as the machine would (--no-index --no-deps --target), the machine's packages they need
    (at the lock's versions, torch aside) into a second folder, and import each package with only the stdlib
    and those two folders on the path (-S): module -> where it came from, or the error."""
    with tempfile.TemporaryDirectory() as tmp:
        site, machine = f"{tmp}/site", f"{tmp}/machine"
        pip = [py, "-m", "pip", "install", "-q", "--no-compile", "--no-cache-dir", "--disable-pip-version-check",
               "--root-user-action=ignore"]
        subprocess.run([*pip, "--no-index", "--no-deps", "--upgrade", "--target", site, *map(str, wheels)], check=True)
        subprocess.run([*pip, "--only-binary=:all:", "--target", machine,
                        *(f"{n}=={pins[n]}" for n in sorted(MACHINE - {"torch"}))], check=True)
        results = {}
        for module in filter(None, WHEELS.values()):
            code = f"import sys; sys.path[:0] = [{site!r}, {machine!r}]; import {module} as m; print(m.__file__)"
            done = subprocess.run([py, "-S", "-c", code], capture_output=True, text=True)
            where = done.stdout.strip()
            results[module] = (f"ok ({os.path.relpath(where, site)})" if done.returncode == 0 and where.startswith(site)
                               else f"FAILED: {(done.stderr.strip().splitlines() or [where])[-1]}")
        libs = sorted(p.name for p in Path(site, "bitsandbytes").glob("*.so"))
        results["bitsandbytes"] = (f"files only (needs torch): {libs}" if set(libs) == BNB_KEEP
                                   else f"FAILED: native libraries {libs}")
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="bench/gpu_wheels.py", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / ".whl"))
    out = Path(ap.parse_args(argv).out)
    shutil.rmtree(out, ignore_errors=True)  # one version of each: two stop the whole install
    out.mkdir(parents=True)
    pins = lock_versions()
    try:
        download(out, pins)
        dropped = prune_bitsandbytes(next(out.glob("bitsandbytes-*.whl")))
        print(f"bitsandbytes: dropped {len(dropped)} native libraries, kept {sorted(BNB_KEEP)}")
        wheels, from_machine = verify(out)
    except WheelError as exc:
        sys.exit(f"gpu-wheels: {exc}")
    for w in wheels:
        print(f"  {mib(w.stat().st_size):>10s}  {w.name}")
    print(f"  {mib(sum(w.stat().st_size for w in wheels)):>10s}  in all (a call carries {mib(LIMIT)}, tree included)")
    py = python312()
    if py is None:
        print("no python3.12 here: checked by the wheels' tags alone")
    else:
        results = import_check(py, wheels, pins)
        print(f"installed with --no-index --no-deps --target and imported with {py}:")
        for module, result in results.items():
            print(f"  {module:20s} {result}")
        if any(r.startswith("FAILED") for r in results.values()):
            sys.exit("gpu-wheels: an import failed")
    print("of the GPU machine's own packages these need:", ", ".join(from_machine))
    print(f"carry .whl and begin the command with:\n{INSTALL}")


if __name__ == "__main__":
    main()
