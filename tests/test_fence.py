"""The fence around other libraries' non-public API holds: read from the source (ast), no model is loaded.

Outside the FENCE modules, no selfplay code
  (a) subclasses a class of trl, transformers, peft, accelerate or vllm, except the public extension points in
      PUBLIC_BASES (or a selfplay class that subclasses one of them);
  (b) reads or writes an attribute `x._name` (also through getattr/setattr/hasattr/delattr) unless selfplay itself
      defines `_name` (a function, class or method, a `self._x =` attribute or class field of a class of its own, a
      module-level name, a module);
  (c) imports an underscored name or module of those libraries, or reaches one as `lib._name`;
  (d) defines a `_method` in a class that subclasses one of theirs (that is, overrides a private method);
  (e) replaces a model's forward or a trainer's loss setting by assignment (PATCHED attributes).

Each rule is shown to fire on a small offending module written to a temporary directory."""

from __future__ import annotations

import ast
import builtins
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "selfplay"
THIRD_PARTY = {"trl", "transformers", "peft", "accelerate", "vllm"}
# Relative to the scanned folder. trl_private wraps TRL's private functions; trl_trainers holds every TRL trainer
# subclass and the training-time model patches. Each lists what it touches in its docstring.
FENCE = frozenset({"backends/trl_private.py", "backends/trl_trainers.py"})
# Documented extension points, subclassed the documented way: a transformers TrainerCallback only overrides the
# public on_* events (the train stage's FaultPoints and StopOnPreemption stay in selfplay/stages/train.py).
PUBLIC_BASES = frozenset({"transformers.TrainerCallback", "transformers.trainer_callback.TrainerCallback"})
# Public Python API that happens to start with an underscore (os._exit, namedtuple's methods).
PUBLIC_UNDERSCORED = frozenset({"_exit", "_asdict", "_replace", "_fields", "_make"})
# Attributes whose assignment is monkeypatching a library object: a model's forward, CPOTrainer's label smoothing.
PATCHED = frozenset({"forward", "label_smoothing"})
ATTRIBUTE_FUNCTIONS = {"getattr", "setattr", "hasattr", "delattr"}


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@dataclass
class Module:
    path: Path
    relative: str
    tree: ast.Module
    nodes: list[ast.AST]  # every node, walked once
    origins: dict[str, str] = field(default_factory=dict)  # local name → dotted origin (`trl.DPOTrainer`)


def _origins(nodes: list[ast.AST]) -> dict[str, str]:
    """Where each imported name comes from, imports inside functions included (flow-insensitive on purpose)."""
    origins = {}
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:  # `import a.b` binds a; `import a.b as c` binds c to a.b
                top = alias.name.split(".")[0]
                origins[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            for alias in node.names:
                origins[alias.asname or alias.name] = f"{base}.{alias.name}"
    return origins


def dotted(node: ast.AST, origins: dict[str, str]) -> str | None:
    """`a.b.c` with `a` replaced by where it was imported from; None for anything but a name or attribute chain."""
    if isinstance(node, ast.Name):
        return origins.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        inner = dotted(node.value, origins)
        return f"{inner}.{node.attr}" if inner else None
    return None


def is_third_party(name: str | None) -> bool:
    return bool(name) and name.split(".")[0] in THIRD_PARTY


def load(root: Path) -> list[Module]:
    modules = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        nodes = list(ast.walk(tree))
        modules.append(Module(path, path.relative_to(root).as_posix(), tree, nodes, _origins(nodes)))
    return modules


def _base_kind(base: ast.expr, module: Module, classes: set[str]) -> str:
    """public (a PUBLIC_BASES class), library (another class of THIRD_PARTY, or a base that no import or selfplay
    class names: it may be one), selfplay (a class selfplay defines) or other (builtins, the standard library)."""
    if isinstance(base, ast.Subscript):  # Generic[T], a library class's alias with parameters
        base = base.value
    name = dotted(base, module.origins)
    if name in PUBLIC_BASES:
        return "public"
    if is_third_party(name):
        return "library"
    if isinstance(base, ast.Name) and base.id in classes:
        return "selfplay"
    if isinstance(base, ast.Name) and base.id not in module.origins:  # a variable: a class made at run time
        return "other" if hasattr(builtins, base.id) else "library"
    return "other" if name else "library"


def derived_classes(modules: list[Module]) -> tuple[set[str], set[str]]:
    """(classes subclassing a library class, directly or through selfplay classes; those of them that subclass one
    that is not in PUBLIC_BASES), by class name."""
    classes = {n.name for m in modules for n in m.nodes if isinstance(n, ast.ClassDef)}
    bases = [(node, {_base_kind(b, m, classes) for b in node.bases},  # (class, kinds of its bases, named bases)
              {b.id for b in node.bases if isinstance(b, ast.Name)})
             for m in modules for node in m.nodes if isinstance(node, ast.ClassDef)]
    derived: set[str] = set()
    private: set[str] = set()
    changed = True
    while changed:
        changed = False
        for node, kinds, parents in bases:
            for group, member in ((derived, kinds & {"public", "library"} or parents & derived),
                                  (private, "library" in kinds or parents & private)):
                if member and node.name not in group:
                    group.add(node.name)
                    changed = True
    return derived, private


def selfplay_names(modules: list[Module], derived: set[str]) -> set[str]:
    """Underscored names selfplay defines itself; methods and attributes of library subclasses do not count (those
    may be the library's own)."""
    names = {part for m in modules for part in Path(m.relative).with_suffix("").parts}
    for module in modules:
        names |= {t.id for node in module.tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                  for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}
        skipped = {id(n) for c in module.nodes if isinstance(c, ast.ClassDef) and c.name in derived
                   for n in ast.walk(c) if n is not c}
        for node in module.nodes:
            if id(node) in skipped:
                continue
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            if isinstance(node, ast.ClassDef):  # class attributes and dataclass fields
                names |= {t.id for s in node.body if isinstance(s, (ast.Assign, ast.AnnAssign))
                          for t in (s.targets if isinstance(s, ast.Assign) else [s.target]) if isinstance(t, ast.Name)}
            if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                    and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                names.add(node.attr)
    return {n for n in names if is_private(n)}


def _attribute_uses(nodes: list[ast.AST]):
    """(node, attribute name, stored) for every `x.name` and getattr-family call with a literal name."""
    for node in nodes:
        if isinstance(node, ast.Attribute):
            yield node, node.attr, isinstance(node.ctx, ast.Store)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ATTRIBUTE_FUNCTIONS
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str)):
            yield node, node.args[1].value, node.func.id == "setattr"


def _import_violations(module: Module) -> list[tuple[int, str, str]]:
    """Rule (c) in imports: an underscored name or module of a THIRD_PARTY library."""
    found = []
    for node in module.nodes:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and is_third_party(node.module):
            names = node.module.split(".") + [a.name for a in node.names]
            if any(is_private(n) for n in names):
                found.append((node.lineno, "c", f"from {node.module} import {', '.join(a.name for a in node.names)}"))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, "c", f"import {a.name}") for a in node.names
                      if is_third_party(a.name) and any(is_private(n) for n in a.name.split("."))]
    return found


def module_violations(module: Module, derived: set[str], private: set[str],
                      defined: set[str]) -> list[tuple[int, str, str]]:
    """(line, rule, what) for one module outside the fence."""
    found = _import_violations(module)
    for node in module.nodes:
        if isinstance(node, ast.ClassDef) and node.name in private:
            found.append((node.lineno, "a", f"class {node.name} subclasses a library class"))
        if isinstance(node, ast.ClassDef) and node.name in derived:
            found += [(f.lineno, "d", f"{node.name}.{f.name} overrides or adds a private method") for f in node.body
                      if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and is_private(f.name)]
    for node, name, stored in _attribute_uses(module.nodes):
        reached = dotted(node, module.origins) if isinstance(node, ast.Attribute) else None
        if is_private(name) and is_third_party(reached):
            found.append((node.lineno, "c", f"{reached}"))
        elif is_private(name) and name not in defined and name not in PUBLIC_UNDERSCORED:
            found.append((node.lineno, "b", f"attribute {name}"))
        if stored and name in PATCHED:
            found.append((node.lineno, "e", f"assigns .{name}"))
    return found


def fence_violations(root: Path, fence: frozenset[str] = FENCE) -> list[str]:
    """Every breach of rules (a)–(e) in the .py files under root, as `path:line (rule) what`."""
    modules = load(root)
    derived, private = derived_classes(modules)
    defined = selfplay_names(modules, derived)
    return [f"{m.relative}:{line} ({rule}) {what}" for m in modules if m.relative not in fence
            for line, rule, what in sorted(set(module_violations(m, derived, private, defined)))]


def test_the_fence_holds():
    found = fence_violations(PACKAGE)
    assert not found, ("non-public API of other libraries outside " + ", ".join(sorted(FENCE)) + ":\n"
                       + "\n".join(found))


def test_the_fence_modules_exist_and_list_what_they_touch():
    for relative in FENCE:
        doc = ast.get_docstring(ast.parse((PACKAGE / relative).read_text())) or ""
        assert "name" in doc and "used for" in doc, f"{relative} has no table of the private names it touches"


OFFENDING = {
    "a": "from trl import DPOTrainer\n\nclass Mine(DPOTrainer):\n    pass\n",
    "a_attribute": "import transformers\n\nclass Mine(transformers.Trainer):\n    pass\n",
    "a_through_selfplay": {"fence.py": "from transformers import Trainer\n\nclass Base(Trainer):\n    pass\n",
                           "offender.py": "from fence import Base\n\nclass Mine(Base):\n    pass\n"},
    "a_unknown_base": "def make(base):\n    class Mine(base):\n        pass\n    return Mine\n",
    "b": "def f(trainer):\n    return trainer._signature_columns\n",
    "b_getattr": "def f(model):\n    return getattr(model, '_hf_hook', None)\n",
    "b_store": "def f(model):\n    model._marker = True\n",
    "c": "from trl.data_utils import _tokenize\n",
    "c_module": "import vllm._custom_ops\n",
    "c_attribute": "import peft\n\nx = peft._private_thing\n",
    "d": "from transformers import TrainerCallback\n\nclass Mine(TrainerCallback):\n    def _helper(self):\n"
         "        pass\n",
    "e": "def f(model, g):\n    model.forward = g\n",
}


@pytest.mark.parametrize("rule", sorted(OFFENDING))
def test_each_rule_fires(tmp_path, rule):
    files = OFFENDING[rule] if isinstance(OFFENDING[rule], dict) else {"offender.py": OFFENDING[rule]}
    for name, source in files.items():
        (tmp_path / name).write_text(source)
    found = fence_violations(tmp_path, fence=frozenset(files) - {"offender.py"})
    assert found and all(line.startswith("offender.py:") and f"({rule[0]})" in line for line in found), found
    # the same files inside the fence are allowed
    assert fence_violations(tmp_path, fence=frozenset(files)) == []


def test_what_selfplay_defines_and_public_extension_points_pass(tmp_path):
    (tmp_path / "fine.py").write_text(
        "import os\nfrom dataclasses import dataclass\nfrom transformers import TrainerCallback\n\n"
        "_CACHE = {}\n\n@dataclass\nclass Row:\n    _weight: float = 1.0\n\n"
        "class Holder:\n    def __init__(self):\n        self._items = []\n\n    def _grow(self):\n"
        "        return self._items\n\n"
        "class Marks(TrainerCallback):\n    def on_step_end(self, args, state, control, **kwargs):\n"
        "        control.should_save = True\n\n"
        "def use(h, row):\n    h._grow()\n    os._exit(0)\n    return row._weight, h._items\n")
    assert fence_violations(tmp_path) == []


def test_a_library_subclass_does_not_define_names_for_the_rest(tmp_path):
    """A `self._x =` inside a library subclass may be the library's own attribute: it allows nothing elsewhere."""
    (tmp_path / "fence.py").write_text("from trl import DPOTrainer\n\nclass T(DPOTrainer):\n"
                                       "    def f(self):\n        self._signature_columns = []\n")
    (tmp_path / "user.py").write_text("def g(trainer):\n    return trainer._signature_columns\n")
    assert fence_violations(tmp_path, fence=frozenset({"fence.py"})) == ["user.py:2 (b) attribute _signature_columns"]
