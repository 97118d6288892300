"""The architecture, checked: layers as folders, imports that only go down, small files, and one
`quiver` namespace, so that AdapterHub's `adapters` and Hugging Face's `kernels` can share an
environment with Quiver."""
from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP = ("server", "kernels", "adapters", "bench")
LAYERS = ("rayserve", "http", "engine", "model", "families")
# what each part of the runtime may import from Quiver besides itself (a package, or one module): the layers,
# top to bottom. Above the engine only its public surface (engine.public); the kernels through their one op
# surface (kernels.ops), never a named backend; `quiver` (cli) and `quiver ray` (rayserve) both start from the
# server's assembly, neither from the other.
MAY_IMPORT = {
    "quiver.server.cli": {"quiver.server.assemble", "quiver.server.merge", "quiver.server.engine.public",
                          "quiver.server.model", "quiver.adapters"},
    "quiver.server.rayserve": {"quiver.server.assemble", "quiver.server.http", "quiver.server.engine.public"},
    "quiver.server.assemble": {"quiver.server.http", "quiver.server.engine.public"},
    "quiver.server.http": {"quiver.server.engine.public"},
    "quiver.server.engine": {"quiver.server.families", "quiver.server.model", "quiver.kernels.ops", "quiver.adapters"},
    "quiver.server.families": {"quiver.server.model", "quiver.kernels.ops", "quiver.adapters"},
    "quiver.server.model": {"quiver.kernels.ops"},
    "quiver.kernels": set(),
    "quiver.adapters": set(),
}


def modules() -> dict[str, Path]:
    """quiver module name -> file, for every .py file of the four folders."""
    out = {}
    for top in TOP:
        for path in (ROOT / top).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(("quiver",) + parts)] = path
    return out


def quiver_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.split(".")[0] in ("quiver",) + TOP}


def part_of(module: str) -> str:
    for part in sorted(MAY_IMPORT, key=len, reverse=True):
        if within(module, part):
            return part
    return module


def within(module: str, allowed: str) -> bool:
    return module == allowed or module.startswith(allowed + ".")


def test_server_has_its_layers_as_folders_and_files_stay_small():
    assert sorted(p.name for p in (ROOT / "server").iterdir() if p.is_dir() and p.name != "__pycache__") == \
        sorted(LAYERS)
    assert sorted(p.name for p in (ROOT / "server").glob("*.py")) == ["assemble.py", "cli.py", "merge.py"]
    big = {str(p.relative_to(ROOT)): n for p in modules().values() if (n := len(p.read_text().splitlines())) > 350}
    assert not big, f"files past 350 lines: {big}"


def test_imports_only_go_down_the_layers():
    wrong = []
    for name, path in modules().items():
        part = part_of(name)
        for target in quiver_imports(path):
            assert target.startswith("quiver."), f"{name} imports {target}: use the quiver namespace"
            if target.startswith("quiver.bench") and not name.startswith("quiver.bench"):
                wrong.append(f"{name} imports {target}: nothing outside bench/ depends on the benchmarks")
            elif part in MAY_IMPORT and part_of(target) != part and not any(within(target, a)
                                                                              for a in MAY_IMPORT[part]):
                wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_every_folder_is_a_package_of_the_quiver_namespace():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {f"quiver.{top}": top for top in TOP}
    folders = {".".join(("quiver",) + p.parent.relative_to(ROOT).parts) for p in modules().values()}
    assert folders == set(setuptools["packages"])
    for top in TOP:  # no top-level package of these names: a bare `import adapters` never reaches Quiver
        assert not (ROOT / top / "__init__.py").exists(), top


def test_a_bare_import_of_adapters_or_kernels_is_never_quivers(tmp_path):
    """With stand-ins for AdapterHub's `adapters` and Hugging Face's `kernels` on the path, a bare import
    gets them, from the repository root too, while quiver.adapters and quiver.kernels stay Quiver's;
    with no stand-ins, Quiver itself provides no such top-level module."""
    for name in ("adapters", "kernels"):
        (tmp_path / "site" / name).mkdir(parents=True)
        (tmp_path / "site" / name / "__init__.py").write_text(f"WHO = 'the other {name}'\n")
    code = ("import adapters, kernels, quiver.adapters.lora, quiver.kernels.ops; "
            "print(adapters.WHO, '|', kernels.WHO, '|', quiver.adapters.lora.__file__, '|', quiver.kernels.ops.__file__)")
    for cwd in (ROOT, tmp_path):
        out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True,
                             env={"PYTHONPATH": str(tmp_path / "site")}).stdout.strip().split(" | ")
        assert out[:2] == ["the other adapters", "the other kernels"], out
        assert out[2] == str(ROOT / "adapters" / "lora.py") and out[3] == str(ROOT / "kernels" / "ops.py")
    code = "import importlib.util as u; print([n for n in ('adapters', 'kernels', 'server', 'bench') if u.find_spec(n)])"
    alone = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert alone.stdout.strip() == "[]"
