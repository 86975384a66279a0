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
        "import vqar; from vqar.tokenizer.presets import preset_dir; "
        "m = vqar.VQTokenizer.from_preset('fsq-cpu'); print(vqar.__file__, preset_dir(), m.codebook_size)"
    )
    module_path, presets_path, size = _run_python(code, tmp_path, PYTHONPATH=str(target)).split()
    assert module_path.startswith(str(target)) and presets_path.startswith(str(target))
    assert size == "1000"
