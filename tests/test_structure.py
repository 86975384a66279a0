"""DESIGN.md's arrows: cli -> training -> evaluation -> (tokenizer, ar, generation, bpe, metrics) ->
quantizers, data. Nothing reaches back into training/, and only training/ imports accelerate."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "vqar"
ENTRY_POINTS = {"cli.py", "demo.py", "__main__.py"}  # they run the trainers, so they may import them


def imported_modules(path: Path) -> set[str]:
    """Absolute names of what a module of the package imports (relative imports resolved)."""
    package = ".".join(("vqar", *path.relative_to(PACKAGE).parent.parts))
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = f"{base}.{node.module}" if node.level and node.module else base if node.level else node.module
            names |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return names


def library_modules():
    return [p for p in PACKAGE.rglob("*.py") if "training" not in p.parts and p.name not in ENTRY_POINTS]


@pytest.mark.parametrize("path", library_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_library_module_imports_the_trainers_or_accelerate(path):
    imports = imported_modules(path)
    assert not {m for m in imports if m.startswith("vqar.training")}, "reaches back into training/"
    assert not {m for m in imports if m.split(".")[0] == "accelerate"}, "only training/ imports accelerate"


@pytest.mark.parametrize("command", ["evaluate", "push"])
def test_evaluate_and_push_help_run_without_accelerate(command):
    code = (
        "import sys\nfrom vqar.cli import main\ntry:\n    main([sys.argv[1], '--help'])\nexcept SystemExit:\n    pass\n"
        "print('accelerate loaded:', 'accelerate' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code, command], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"vqar {command}" in result.stdout  # the help was printed
    assert result.stdout.strip().endswith("accelerate loaded: False")


# A branch on the token layout's kind, anywhere but vqar/layouts.py: the kinds by name, the old
# is_1d / is_multiscale / token_grid switches, isinstance on a layout class, or a test of whether
# tokens have a grid or scales. A fourth layout is one class in layouts.py; nothing else may need it.
LAYOUT_BRANCHES = re.compile(
    r"\bis_1d\b|\bis_multiscale\b|\btoken_grid\b"
    r"|\blayout\s*(==|!=)|\.layout\s+(not\s+)?in\b|(==|!=)\s*[\"'](1d|grid|multiscale)[\"']"
    r"|isinstance\([^)]*(GridLayout|SequenceLayout|MultiscaleLayout)"
    r"|\.(grid|scales)\s+is\s+(not\s+)?None"
    r"|\bif\s+(not\s+)?[\w.\[\]\"']*\.(grid|scales)\s*(:|\belse\b|\band\b|\bor\b)"
    r"|\.(grid|scales)\s+else\b"
)


def layout_branches(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if LAYOUT_BRANCHES.search(line)]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_the_layouts_module_branches_on_the_token_layout(path):
    if path == PACKAGE / "layouts.py":
        return
    assert layout_branches(path.read_text()) == [], "ask the TokenLayout (vqar/layouts.py) instead"


def test_the_layout_branch_check_sees_the_branches_it_is_for():
    caught = [
        "if self.is_1d:",
        'return "1d" if config.layout == "1d" else config.conv_backbone',
        "grid = [r // f] * 2 if tokenizer.token_grid else None",
        "if layout.grid is None or prefix.shape[2] != layout.grid[1]:",
        "if manifest.scales is not None and bpe is not None:",
        "arrays[name] = codes.reshape(len(codes), *manifest.grid) if manifest.grid else codes",
        "if isinstance(layout, MultiscaleLayout):",
    ]
    assert layout_branches("\n".join(caught)) == caught
    assert layout_branches("if (H, W) != (self.scales[-1],) * 2:\nlayout.tokens.prior_order") == []
