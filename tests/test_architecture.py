"""The package's shape, read from its source (ast): imports run one way through the layers documented in
docs/architecture.md, with no import circle; imports inside functions only for the optional heavy dependencies
listed here; no function longer than MAX_FUNCTION_LINES.

Deliberately adding an upward import (say `from selfplay.cli import main` in selfplay/core/selection.py) fails
`test_imports_run_down_the_layers` with the file, the line and both layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "selfplay"

# Top to bottom; a module may import from its own layer or any layer below it, never from one above. A layer is a
# folder of selfplay/ (or, for the entry points and the base, the modules named); docs/architecture.md draws it.
LAYERS: dict[str, tuple[str, ...]] = {
    "entry": ("cli", "train_worker"),
    "runner": ("runner",),
    "stages": ("stages",),
    "training": ("training",),
    "reports": ("reports",),
    "backends": ("backends", "rewards"),
    "rundir": ("rundir",),
    "core": ("core",),
    "base": ("config", "errors", "testing"),
}
ORDER = list(LAYERS)

# Imported inside functions on purpose: optional extras (vllm, ray, peft, wandb) and heavy libraries that commands
# such as `selfplay status` and `--help` never need (torch and what sits on it, matplotlib).
LAZY_OK = {"torch", "transformers", "trl", "datasets", "safetensors", "accelerate", "peft", "vllm", "ray", "matplotlib",
           "wandb"}
# The command line imports what each command runs when that command runs (`selfplay status` starts in about 0.5 s,
# not the 1.6-1.9 s of importing every stage): selfplay's own modules, inside functions of the entry point only.
LAZY_OK_IN_ENTRY = {"selfplay"}

MAX_FUNCTION_LINES = 60


def _shown(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent)) if path.is_relative_to(PACKAGE.parent) else str(path)


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def layer_of(module: str) -> str:
    relative = module.split(".")[1] if "." in module else ""
    for layer, names in LAYERS.items():
        if relative in names:
            return layer
    if module == "selfplay":
        return "base"
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py's LAYERS: add it where it belongs")


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def internal_imports(module: str) -> list[tuple[int, str, bool]]:
    """(line, imported selfplay module, at module level) for every import of a selfplay module."""
    tree = ast.parse(MODULES[module].read_text())
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in dict.fromkeys(targets):
            if target.split(".")[0] == "selfplay" and target != module:
                found.append((node.lineno, target, id(node) in top))
    return found


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_imports_run_down_the_layers():
    upward = []
    for module in MODULES:
        mine = ORDER.index(layer_of(module))
        for line, target, _ in internal_imports(module):
            theirs = ORDER.index(layer_of(target))
            if theirs < mine:
                upward.append(f"{_shown(MODULES[module])}:{line} imports {target} "
                              f"({layer_of(module)} → {layer_of(target)}, above it)")
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def _package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def test_no_import_circle():
    graph = {m: {t for _, t, _ in internal_imports(m) if t in MODULES} for m in MODULES}
    # Importing a.b.c runs a/__init__ and a/b/__init__ first: a package's __init__ depends on nothing of its own
    # submodules through that, so only explicit edges count.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import circle: " + " → ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_imports_inside_functions_are_only_the_listed_heavy_ones():
    found = []
    for path in MODULES.values():
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or "."]
                roots = {"." if isinstance(node, ast.ImportFrom) and node.level else n.split(".")[0] for n in names}
                entry = path.parent == PACKAGE and path.stem in LAYERS["entry"]
                allowed = LAZY_OK | (LAZY_OK_IN_ENTRY if entry else set())
                if not roots <= allowed:
                    found.append(f"{_shown(path)}:{node.lineno} imports {sorted(roots)} "
                                 "inside a function")
    assert not found, "\n".join(found)


def test_no_function_is_longer_than_the_limit():
    long = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{_shown(path)}:{node.lineno} {node.name}: {length} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_a_long_function_is_caught(tmp_path, monkeypatch):
    """The length check itself can fail: a copy of core/selection.py with a function of 61 lines added."""
    source = MODULES["selfplay.core.selection"].read_text() + "\n\ndef too_long():\n" + "    pass\n" * 60
    copy = tmp_path / "selection.py"
    copy.write_text(source)
    monkeypatch.setitem(MODULES, "selfplay.core.selection", copy)
    with pytest.raises(AssertionError, match="too_long: 61 lines"):
        test_no_function_is_longer_than_the_limit()


@pytest.mark.parametrize("bad", ["from selfplay.cli import main", "from ..runner.pipeline import run"])
def test_an_upward_import_is_caught(tmp_path, monkeypatch, bad):
    """The check itself can fail: the same walk over a copy of core/selection.py with an upward import added."""
    source = MODULES["selfplay.core.selection"].read_text() + f"\n{bad}\n"
    copy = tmp_path / "selection.py"
    copy.write_text(source)
    monkeypatch.setitem(MODULES, "selfplay.core.selection", copy)
    with pytest.raises(AssertionError, match="selection.py:.* imports selfplay"):
        test_imports_run_down_the_layers()


def test_private_trl_names_are_imported_in_one_place():
    """trl.data_utils' underscored names and trl.trainer.utils only through selfplay/backends/trl_private.py."""
    fence = MODULES["selfplay.backends.trl_private"]
    found = []
    for path in MODULES.values():
        if path == fence:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trl"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                if private or node.module.startswith("trl.trainer.utils"):
                    found.append(f"{_shown(path)}:{node.lineno} from {node.module} import "
                                 f"{', '.join(a.name for a in node.names)}")
    assert not found, "private TRL names outside backends/trl_private.py:\n" + "\n".join(found)


def test_every_configured_backend_has_a_registry_entry():
    """The config's choices and the registries that build components agree, both ways."""
    from selfplay.backends.samplers import SAMPLERS
    from selfplay.config import REWARD_BACKENDS, SAMPLER_BACKENDS, STAGES
    from selfplay.rewards.scoring import SCORERS
    from selfplay.stages.base import stage_module

    assert set(SAMPLERS) == set(SAMPLER_BACKENDS)
    assert set(SCORERS) == set(REWARD_BACKENDS)
    for name in STAGES:
        module = stage_module(name)
        runs = callable(getattr(module, "run", None)) or (callable(getattr(module, "compute", None))
                                                         and callable(getattr(module, "merge", None)))
        assert runs and hasattr(module, "OUTPUTS") and hasattr(module, "CONFIG") and callable(module.requires), name


def test_the_command_line_starts_without_the_model_libraries():
    """`selfplay status`, `report` and `--help` never need torch, transformers, TRL or datasets: importing the entry
    point loads none of them (they cost over a second of start-up)."""
    import subprocess
    import sys

    probe = ("import sys, selfplay.cli; print(sorted(m for m in ('torch', 'transformers', 'trl', 'datasets', 'vllm', "
             "'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def stage_to_stage_imports(modules: dict[str, Path]) -> list[str]:
    """`file:line imports selfplay.stages.X` for every stage module that imports another stage (stages.base, the
    shared plumbing, is not a stage): what stages share lives in core/ (algorithms) or backends/ (models)."""
    found = []
    for module, path in modules.items():
        if not module.startswith("selfplay.stages.") or module == "selfplay.stages.base":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(module, node)  # `from selfplay.stages import pair` and `from . import pair` name it
                targets = [f"{base}.{a.name}" for a in node.names] if base == "selfplay.stages" else [base]
            else:
                targets = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for target in targets:
                if target.startswith("selfplay.stages") and target not in ("selfplay.stages", "selfplay.stages.base"):
                    found.append(f"{_shown(path)}:{node.lineno} imports {target}")
    return found


def test_no_stage_imports_another_stage():
    found = stage_to_stage_imports(MODULES)
    assert not found, "a stage imports another stage:\n" + "\n".join(found)


def test_a_stage_importing_a_stage_is_caught(tmp_path):
    bad = tmp_path / "selfplay" / "stages"
    bad.mkdir(parents=True)
    (bad / "eval.py").write_text("from selfplay.stages.margin import LogpScorer\nfrom selfplay.stages.base import x\n")
    (bad / "score.py").write_text("from . import pair\nfrom selfplay.stages import base\nimport selfplay.stages.train\n")
    found = stage_to_stage_imports({"selfplay.stages.eval": bad / "eval.py", "selfplay.stages.score": bad / "score.py"})
    assert [f.split(" ", 1)[1] for f in found] == ["imports selfplay.stages.margin", "imports selfplay.stages.pair",
                                                   "imports selfplay.stages.train"]


def test_every_backend_has_the_one_backend_shape():
    """Samplers, reward scorers and the log-prob scorer are all selfplay.backends.base.Backend: built from the
    config (`from_config`), a context manager over `close`, called on a batch of work."""
    from selfplay.backends.base import Backend
    from selfplay.backends.logprob_scorer import LogpScorer
    from selfplay.backends.samplers import SAMPLERS
    from selfplay.rewards.scoring import SCORERS

    for cls in [*SAMPLERS.values(), *SCORERS.values()]:
        assert issubclass(cls, Backend) and callable(getattr(cls, "from_config", None)), cls
        assert cls.__call__ is not Backend.__call__, f"{cls.__name__} does no work when called"
    assert issubclass(LogpScorer, Backend) and LogpScorer.__call__ is not Backend.__call__

