"""make gpu-wheels' checks on small fake wheels (no network): what it refuses before a device call would carry
a wheel set that cannot install there, and the bitsandbytes rewrite."""
from __future__ import annotations

import base64
import hashlib
import random
import zipfile

import pytest

from quiver.bench import gpu_wheels as gw

PURE = "py3-none-any"


def fake_wheel(folder, name, version="1.0", tag=PURE, files=None, requires=()):
    """A wheel as pip writes one: its files, dist-info WHEEL/METADATA and a RECORD of every file's hash."""
    dist = f"{name.replace('-', '_')}-{version}.dist-info"
    files = dict(files or {f"{name.replace('-', '_')}/__init__.py": b"X = 1\n"})
    files[f"{dist}/WHEEL"] = f"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: {tag}\n".encode()
    files[f"{dist}/METADATA"] = "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                                         *(f"Requires-Dist: {r}\n" for r in requires)]).encode()
    record = "".join(f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for path, data in files.items()) + f"{dist}/RECORD,,\n"
    path = folder / f"{name.replace('-', '_')}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name_, data in files.items():
            zf.writestr(name_, data)
        zf.writestr(f"{dist}/RECORD", record)
    return path


def check(folder, **kw):
    return gw.verify(folder, **{"expected": ["alpha", "beta"], "machine": {"numpy"}, **kw})


def test_a_good_set_passes_and_reports_what_it_needs_of_the_machine(tmp_path):
    fake_wheel(tmp_path, "alpha", requires=["beta==2.0", "numpy>=1.17", "numpy<3", "colorama; sys_platform == 'win32'",
                                            "rich; extra == 'cli'"])
    fake_wheel(tmp_path, "beta", "2.0", tag="cp312-cp312-manylinux_2_17_x86_64")
    wheels, needs = check(tmp_path)
    assert [w.name.split("-")[0] for w in wheels] == ["alpha", "beta"]
    assert needs == ["numpy<3,>=1.17"]


def test_over_the_size_limit_fails_with_the_sizes(tmp_path):
    fake_wheel(tmp_path, "alpha", files={"alpha/blob.bin": random.Random(0).randbytes(16_000)})
    fake_wheel(tmp_path, "beta")
    with pytest.raises(gw.WheelError, match=r"over the 0\.01 MiB a device call carries \(the largest: alpha"):
        check(tmp_path, limit=10_000)
    check(tmp_path, limit=100_000)


@pytest.mark.parametrize("tag", ["cp311-cp311-manylinux_2_17_x86_64", "py3-none-win_amd64",
                                 "cp312-cp312-macosx_11_0_arm64", "cp312-cp312-manylinux_2_17_aarch64",
                                 "cp313-abi3-manylinux_2_17_x86_64", "cp39-abi3-manylinux_2_35_x86_64"])
def test_a_wheel_that_would_not_install_on_cpython_312_manylinux_x86_64_is_refused(tmp_path, tag):
    fake_wheel(tmp_path, "alpha", tag=tag)
    fake_wheel(tmp_path, "beta")
    with pytest.raises(gw.WheelError, match="do not install on CPython 3.12"):
        check(tmp_path)


def test_missing_duplicate_unmet_or_mismatched_packages_are_refused(tmp_path):
    fake_wheel(tmp_path, "alpha")
    with pytest.raises(gw.WheelError, match="one wheel of each"):
        check(tmp_path)
    fake_wheel(tmp_path, "beta")
    fake_wheel(tmp_path, "beta", "2.0")
    with pytest.raises(gw.WheelError, match="one wheel of each"):
        check(tmp_path)
    (tmp_path / "beta-2.0-py3-none-any.whl").unlink()
    (tmp_path / "alpha-1.0-py3-none-any.whl").unlink()
    fake_wheel(tmp_path, "alpha", requires=["beta==2.0"])  # as pydantic pins pydantic-core
    with pytest.raises(gw.WheelError, match="needs beta==2.0, .whl has beta 1.0"):
        check(tmp_path)
    fake_wheel(tmp_path, "alpha", requires=["opentelemetry-api>=1.44"])
    with pytest.raises(gw.WheelError, match="neither a wheel here nor on the GPU machine"):
        check(tmp_path)


def test_bitsandbytes_keeps_cuda13_and_cpu_libraries_with_a_consistent_record(tmp_path):
    libs = ["cpu", "cuda118", "cuda128", "cuda130", "cuda132", "rocm64", "xpu2025"]
    files = {f"bitsandbytes/libbitsandbytes_{lib}.so": lib.encode() * 100 for lib in libs}
    files["bitsandbytes/__init__.py"] = b"import torch\n"
    wheel = fake_wheel(tmp_path, "bitsandbytes", "0.50.2", tag="py3-none-manylinux_2_24_x86_64", files=files)
    with pytest.raises(gw.WheelError, match="native libraries"):
        gw.verify(tmp_path, expected=["bitsandbytes"])
    dropped = gw.prune_bitsandbytes(wheel)
    assert sorted(dropped) == sorted(f"bitsandbytes/libbitsandbytes_{lib}.so" for lib in libs
                                     if lib not in ("cpu", "cuda130"))
    with zipfile.ZipFile(wheel) as zf:
        kept = {n for n in zf.namelist() if n.endswith(".so")}
        assert zf.read("bitsandbytes/libbitsandbytes_cuda130.so") == b"cuda130" * 100
    assert kept == {"bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda130.so"}
    gw.check_record(wheel)
    gw.verify(tmp_path, expected=["bitsandbytes"])
    assert gw.prune_bitsandbytes(wheel) == []


def test_a_record_that_disagrees_with_the_files_is_refused(tmp_path):
    wheel = fake_wheel(tmp_path, "alpha")
    with zipfile.ZipFile(wheel, "a") as zf:
        zf.writestr("alpha/extra.py", b"")
    with pytest.raises(gw.WheelError, match="RECORD and files differ"):
        gw.check_record(wheel)


def test_every_wheel_and_the_machine_packages_are_pinned_in_the_lock():
    pins = gw.lock_versions()
    assert set(gw.WHEELS) | gw.MACHINE <= set(pins)
