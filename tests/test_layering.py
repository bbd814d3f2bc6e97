"""The layering of docs/architecture.md, held by tests: imports point one way,
cluster -> router -> workers -> kernels, and inside workers replica level -> runner ->
engine -> models. The engine core runs without Ray; the router sees of the workers only
the messages, the block hash and the KV events, never the engine that produces them."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Code folder -> import name, as pyproject.toml's package-dir maps them; sub-folders follow.
FOLDERS = {
    "cluster": "kvserve.cluster",
    "router": "kvserve.router",
    "workers": "kvserve.workers",
    "kvserve_kernels": "kvserve.kernels",
}

# Package -> rank; a module belongs to the longest package its name starts with, and may
# import only from ranks at or below its own.
RANKS = {
    "kvserve.kernels": 0,
    "kvserve.workers.models": 1,
    "kvserve.workers.engine": 2,
    "kvserve.workers.runner": 3,
    "kvserve.workers": 4,
    "kvserve.router": 5,
    "kvserve.cluster": 6,
}

# All the router may import from workers: the messages, the block hash, the KV events and
# the hub's actor name, the LoRA registry actor.
ROUTER_MAY_IMPORT = {
    "kvserve.workers.protocol",
    "kvserve.workers.engine.block_hash",
    "kvserve.workers.engine.kv_events",
    "kvserve.workers.kv_event_hub",
    "kvserve.workers.lora_registry",
}

ENGINE_CORE = ["kvserve.workers.engine.engine", "kvserve.workers.engine.scheduler",
               "kvserve.workers.engine.kv_cache_manager"]
ROUTER_ENTRY_POINTS = ["kvserve.router.ingress", "kvserve.router.policies", "kvserve.router.kv_scoring"]
ENGINE_SIDE = ["kvserve.workers.engine.engine", "kvserve.workers.engine.scheduler",
               "kvserve.workers.runner", "kvserve.workers.models"]


def is_within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layer_of(module: str) -> str:
    """The package of `module` in `RANKS`; ValueError for a module of no layer."""
    return max((p for p in RANKS if is_within(module, p)), key=len)


def module_name(path: Path) -> str:
    """The import name of a source file under ROOT."""
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    if rest[-1] == "__init__":
        rest.pop()
    return ".".join([FOLDERS[folder], *rest])


def source_files() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


def _from_base(node: ast.ImportFrom, package: str) -> str:
    """The absolute module of a `from ... import`, resolving a relative one against `package`."""
    if node.level == 0:
        return node.module
    base = package.rsplit(".", node.level - 1)[0]
    return f"{base}.{node.module}" if node.module else base


def imports_of(source: str, package: str, known_modules: set[str]) -> list[tuple[int, str]]:
    """(line, module) of every kvserve import in `source`, those inside functions included.
    `from X import name` counts as an import of `X.name` when that is one of `known_modules`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(node, package)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((node.lineno, submodule if submodule in known_modules else base))
    return [(line, module) for line, module in found if is_within(module, "kvserve")]


def import_problem(importer: str, target: str) -> str | None:
    """Why `importer` may not import `target`, or None if it may."""
    own, other = layer_of(importer), layer_of(target)
    if RANKS[other] > RANKS[own]:
        return f"{own} (rank {RANKS[own]}) imports from a layer above it, {other} (rank {RANKS[other]})"
    if own == "kvserve.router" and is_within(target, "kvserve.workers") and target not in ROUTER_MAY_IMPORT:
        return f"the router may import from workers only {', '.join(sorted(ROUTER_MAY_IMPORT))}"
    return None


def layering_violations(
    label: str, importer: str, is_package: bool, source: str, known_modules: set[str]
) -> list[str]:
    """'label:line imports module: why' for each import of `source` that breaks the layering."""
    package = importer if is_package else importer.rpartition(".")[0]
    violations = []
    for line, target in imports_of(source, package, known_modules):
        problem = import_problem(importer, target)
        if problem is not None:
            violations.append(f"{label}:{line} imports {target}: {problem}")
    return violations


def known_modules() -> set[str]:
    return {module_name(path) for path in source_files()}


def modules_loaded_by(modules: list[str]) -> list[str]:
    """Every module in sys.modules after a fresh interpreter imports `modules`."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


# -- the code as it is ---------------------------------------------------------------------


def test_no_folder_at_the_root_stands_in_for_an_installed_package():
    """`python -m` from the repository's root, and the Ray workers a driver started there,
    have the root on `sys.path` ahead of the installed packages: a folder there named like a
    package a dependency imports (transformers imports `kernels`) would be imported instead."""
    import importlib.metadata

    installed = set(importlib.metadata.packages_distributions())
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert not folders & (installed | {"kernels"})


def test_engine_core_loads_no_ray():
    ray_modules = [m for m in modules_loaded_by(ENGINE_CORE) if is_within(m, "ray")]
    assert ray_modules == [], f"importing the engine core loads Ray: {ray_modules[:5]}"


def test_router_loads_no_engine_runner_or_model():
    engine_side = [m for m in modules_loaded_by(ROUTER_ENTRY_POINTS) if any(is_within(m, p) for p in ENGINE_SIDE)]
    assert engine_side == [], f"importing the router loads {engine_side}"


def test_every_import_points_down_the_layers():
    files = source_files()
    modules = known_modules()
    assert {"kvserve.router.ingress", "kvserve.workers.engine.engine", "kvserve.kernels"} <= modules
    violations = []
    for path in files:
        violations += layering_violations(
            str(path.relative_to(ROOT)), module_name(path), path.name == "__init__.py", path.read_text(), modules
        )
    assert violations == [], "\n".join(violations)


# -- the checker itself catches what it must -------------------------------------------------


@pytest.mark.parametrize(
    "importer, source, expected",
    [
        ("kvserve.router.policies", "def pick():\n    from kvserve.workers.engine.scheduler import Scheduler\n",
         "scratch.py:2 imports kvserve.workers.engine.scheduler"),
        ("kvserve.router.kv_index", "import kvserve.workers.runner.model_runner\n",
         "scratch.py:1 imports kvserve.workers.runner.model_runner"),
        ("kvserve.router.ingress", "from kvserve.workers.engine import engine\n",
         "scratch.py:1 imports kvserve.workers.engine.engine"),
        ("kvserve.workers.engine.engine", "from kvserve.workers.runner import start_engine\n",
         "scratch.py:1 imports kvserve.workers.runner"),
        ("kvserve.workers.engine.engine", "from ..runner import model_runner\n",
         "scratch.py:1 imports kvserve.workers.runner.model_runner"),
        ("kvserve.workers.models.decoder", "from kvserve.workers.engine.config import EngineConfig\n",
         "scratch.py:1 imports kvserve.workers.engine.config"),
        ("kvserve.kernels.reference", "from kvserve.workers.models.config import ModelConfig\n",
         "scratch.py:1 imports kvserve.workers.models.config"),
        ("kvserve.workers.server", "from kvserve.router.kv_index import KVIndex\n",
         "scratch.py:1 imports kvserve.router.kv_index"),
        ("kvserve.router.options", "import kvserve.cluster.config\n", "scratch.py:1 imports kvserve.cluster.config"),
    ],
)
def test_checker_flags_a_forbidden_import(importer, source, expected):
    (violation,) = layering_violations("scratch.py", importer, False, source, known_modules())
    assert violation.startswith(expected + ":")


@pytest.mark.parametrize(
    "importer, source",
    [
        ("kvserve.router.kv_follower", "from kvserve.workers.kv_event_hub import hub_name\n"),
        ("kvserve.router.ingress", "from kvserve.workers import protocol\n"),
        ("kvserve.workers.runner.model_runner", "from kvserve.workers.engine.scheduler import ScheduledBatch\n"),
        ("kvserve.workers.engine.config", "from ..models.config import ModelConfig\n"),
        ("kvserve.cluster.app", "from kvserve.workers.server import LLMServer\n"),
        ("kvserve.kernels.triton_ops", "from kvserve.kernels.metadata import AttentionMetadata\n"),
    ],
)
def test_checker_allows_a_downward_import(importer, source):
    assert layering_violations("scratch.py", importer, False, source, known_modules()) == []
