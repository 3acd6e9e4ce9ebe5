"""`pip install .` gives a working tool: every module the package imports is a declared dependency.

Each import in soarbench/ (plain, from-imports, and importlib.import_module / find_spec of a literal name) is mapped
to the distribution that provides it (importlib.metadata.packages_distributions(); a module that is not installed
here, like mmdet, by its own name). A module imported at module level must be in `dependencies`; one imported
lazily or behind a guard (an optional engine) must be in `dependencies` or in an extra.
"""
from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "soarbench"

# what an import needs beyond its own distribution: torch's TensorBoard writer is a shim over the tensorboard
# package, and pandas' Styler.to_latex (the report's .tex tables) imports jinja2 only when called
NEEDS = {"torch.utils.tensorboard": "tensorboard", "pandas": "jinja2"}


def _dist_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = {_dist_name(r) for r in project["dependencies"]}
    extras = {name: {_dist_name(r) for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    return required, extras


def _imports(tree: ast.AST):
    """(dotted module, at module level unguarded) for every import in a parsed file."""
    guarded_nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Try, ast.If)):
            for inner in ast.walk(node):
                if inner is not node:
                    guarded_nodes.add(id(inner))
    for node in ast.walk(tree):
        top_level = id(node) not in guarded_nodes
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, top_level
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, top_level
            for alias in node.names:  # `from torch.utils import tensorboard`
                yield f"{node.module}.{alias.name}", top_level
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("import_module", "find_spec") and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield node.args[0].value, False


def _third_party_imports() -> dict[str, tuple[bool, str]]:
    """module -> (imported unguarded at module level somewhere, one file that imports it)."""
    found: dict[str, tuple[bool, str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for module, top_level in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top == "soarbench" or top.startswith("_soarbench"):
                continue
            was, where = found.get(module, (False, str(path.relative_to(ROOT))))
            found[module] = (was or top_level, where)
    return found


def _distributions(module: str) -> set[str]:
    """The distributions that provide a module (its own name where it is not installed here)."""
    top = module.split(".")[0]
    return {n.lower().replace("_", "-") for n in md.packages_distributions().get(top, [top])}


def test_every_import_of_the_package_is_a_declared_dependency():
    required, extras = _declared()
    optional = set().union(*extras.values())
    imports = _third_party_imports()
    assert {"torch", "diffusers", "pandas", "matplotlib", "rapidocr", "mmdet"} <= {m.split(".")[0] for m in imports}
    problems = []
    for module, (top_level, where) in sorted(imports.items()):
        dists = _distributions(module)
        needs = {need for m, need in NEEDS.items() if module == m or module.startswith(m + ".")}
        allowed = required if top_level else required | optional  # a lazy or guarded import may be an extra
        if not dists & allowed or needs - allowed:
            problems.append(f"{module} ({where}): {sorted(dists | needs)} not declared")
    assert not problems, "\n".join(problems)


def test_the_check_sees_an_undeclared_import():
    """The control: the same check on a file importing a module no declaration covers reports it."""
    required, extras = _declared()
    tree = ast.parse("import pandas\n\ndef f():\n    import wandb\n    import not_a_declared_module\n")
    found = dict(_imports(tree))
    assert found == {"pandas": True, "wandb": False, "not_a_declared_module": False}
    assert "pandas" in required and "wandb" in extras["wandb"] and "wandb" not in required
    assert not _distributions("not_a_declared_module") & (required | set().union(*extras.values()))


def test_extras_name_the_optional_engines():
    _, extras = _declared()
    assert {"deepspeed", "wandb", "geneval"} <= set(extras)
    assert "deepspeed" in extras["deepspeed"] and "wandb" in extras["wandb"] and "mmdet" in extras["geneval"]


def test_declared_versions_admit_the_pinned_environment():
    """requirements.txt pins the set the tests ran with; pyproject's ranges must admit every pin."""
    from packaging.requirements import Requirement

    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[_dist_name(name)] = version.strip()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    checked = 0
    for text in project["dependencies"]:
        req = Requirement(text)
        name = _dist_name(req.name)
        if name in pins:
            assert req.specifier.contains(pins[name], prereleases=True), f"{text} excludes the pinned {pins[name]}"
            checked += 1
    assert checked >= 10
