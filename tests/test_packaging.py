"""The repository's tokenizers/ folder is data: it must never shadow Hugging Face's library."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run_python(code: str, cwd: Path, **env) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env={**_base_env(), **env}
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _base_env():
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_import_tokenizers_from_repo_root_gives_hugging_face_library():
    assert not (REPO / "tokenizers" / "__init__.py").exists()
    origin = _run_python("import tokenizers; print(tokenizers.Tokenizer.__module__, tokenizers.__file__)", REPO)
    module, path = origin.split()
    assert module.startswith("tokenizers") and "site-packages" in path


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
        cwd=out,
    )
    return next(out.glob("vqar-*.whl"))


def test_wheel_ships_presets_inside_vqar_and_every_subpackage(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = {p.name for p in (REPO / "tokenizers").glob("*.json")}
    assert {f"vqar/presets/{name}" for name in presets} <= names
    assert not any(name.startswith("tokenizers/") for name in names)
    packages = {str(p.parent.relative_to(REPO)) for p in (REPO / "vqar").rglob("__init__.py")}
    assert {f"{package}/__init__.py" for package in packages} <= names


def test_presets_work_after_a_plain_install(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = (
        "import vqar; from vqar.tokenizer.catalogue import preset_dir; "
        "m = vqar.VQTokenizer.from_preset('fsq-cpu'); print(vqar.__file__, preset_dir(), m.codebook_size)"
    )
    module_path, presets_path, size = _run_python(code, tmp_path, PYTHONPATH=str(target)).split()
    assert module_path.startswith(str(target)) and presets_path.startswith(str(target))
    assert size == "1000"


def _third_party_imports() -> dict[str, bool]:
    """Top-level third-party modules vqar imports -> whether some module imports it at import time."""
    import ast

    found = {}

    class Imports(ast.NodeVisitor):
        depth = 0  # inside how many function bodies

        def visit_FunctionDef(self, node):
            self.depth += 1
            self.generic_visit(node)
            self.depth -= 1

        def visit_Import(self, node):
            self.add([alias.name for alias in node.names])

        def visit_ImportFrom(self, node):
            if not node.level:
                self.add([node.module])

        def add(self, names):
            for name in {n.split(".")[0] for n in names} - {"vqar"} - set(sys.stdlib_module_names):
                found[name] = found.get(name, False) or self.depth == 0

    for path in (REPO / "vqar").rglob("*.py"):
        Imports().visit(ast.parse(path.read_text()))
    return found


def test_every_third_party_import_is_a_declared_dependency():
    from importlib.metadata import packages_distributions, requires

    from packaging.requirements import Requirement

    def normal(name):
        return name.lower().replace("_", "-")

    requirements = [Requirement(r) for r in requires("vqar")]
    core = {normal(r.name) for r in requirements if r.marker is None}
    optional = {normal(r.name) for r in requirements if r.marker is not None}
    distributions = packages_distributions()
    for module, at_import_time in _third_party_imports().items():
        names = {normal(d) for d in distributions.get(module, [module])}
        if at_import_time:
            assert names & core, f"vqar imports {module} at import time but does not depend on it"
        else:
            assert names & (core | optional), f"vqar imports {module} but declares it nowhere"
    assert {"scikit-learn", "scikit-image"} <= optional and not {"scikit-learn", "scikit-image"} & core


def test_make_installs_the_cpu_build_of_torch_where_there_is_no_gpu():
    def planned(*variables: str) -> str:
        done = subprocess.run(
            ["make", "-n", "-B", ".venv/.torch-installed", *variables], cwd=REPO, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "download.pytorch.org/whl/cpu" in planned("TORCH_BUILD=cpu")
    assert "|| .venv/bin/pip install torch" in planned("TORCH_BUILD=cpu")  # the local wheels when that index is away
    assert "download.pytorch.org" not in planned("TORCH_BUILD=cuda")
    no_gpu = subprocess.run(["sh", "-c", "nvidia-smi -L"], capture_output=True).returncode != 0
    assert ("download.pytorch.org/whl/cpu" in planned()) == no_gpu
    assert "editable_mode=compat" in (REPO / "Makefile").read_text()
