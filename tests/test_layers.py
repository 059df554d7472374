"""Imports point down the layers of docs/architecture.md, no module imports itself back through
another, and imports inside functions only keep heavy libraries out of light commands."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# layer -> the layers it may import (besides itself)
LAYERS = {
    "core": set(),
    "kernels": {"core"},
    "actors": {"core", "kernels"},
    "platform.results": {"core"},
    "platform.engine": {"core", "kernels", "actors", "platform.results"},
    "platform.commands": {"core", "kernels", "actors", "platform.results", "platform.engine"},
}
# what a function-level import may keep out of a light command's process
HEAVY = {
    "torch", "ray", "vllm", "transformers", "tokenizers", "deepspeed", "peft", "safetensors",
    "datasets", "mlflow", "matplotlib", "scipy", "numpy", "triton", "cloudpickle", "pandas",
    "playwright",
}  # fmt: skip
# registries a core module may look up: the others are filled by actors and the engine
CORE_REGISTRIES = {"TASKS", "CHECKS"}
UPPER_REGISTRIES = {"OBJECTIVES", "REWARDS", "METRICS", "STAGE_KINDS"}


def modules() -> dict[str, Path]:
    found = {}
    for top in ("core", "kernels", "actors", "platform"):
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found["stageflow." + ".".join(parts)] = path
    return found


def layer(module: str) -> str:
    name = module.removeprefix("stageflow.")
    return next(key for key in sorted(LAYERS, key=len, reverse=True) if name.startswith(key))


def imports(path: Path, module: str, known: dict[str, Path]):
    """(line, imported stageflow module or third-party top name, where, comment); where:
    "function", "typing" (under TYPE_CHECKING: never runs) or "module"."""
    source = path.read_text()
    lines = source.splitlines()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(source)
    in_function, typing_only = set(), set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function |= {id(n) for n in ast.walk(fn)}
        if isinstance(fn, ast.If) and ast.unparse(fn.test) == "TYPE_CHECKING":
            typing_only |= {id(n) for n in ast.walk(fn)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                )
            names = [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", None) == "lazy_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names = [node.args[0].value]
        else:
            continue
        for name in names:
            target = name
            while target and target not in known:
                target = target.rpartition(".")[0]
            what = target or name.split(".")[0]
            above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
            spanned = lines[node.lineno - 1 : node.end_lineno]
            comment = " ".join(line.partition("#")[2].strip() for line in spanned).strip() or (
                above[1:].strip() if above.startswith("#") else ""
            )
            where = (
                "function"
                if id(node) in in_function
                else "typing"
                if id(node) in typing_only
                else "module"
            )
            yield node.lineno, what, where, comment


def graph():
    known = modules()
    edges: dict[str, set[str]] = defaultdict(set)
    on_load: dict[str, set[str]] = defaultdict(set)  # stageflow modules imported at the top
    loaded: dict[str, set[str]] = defaultdict(set)  # heavy libraries imported at the top
    lazy: list[tuple[str, str, str, str]] = []  # (module, where, library, reason)
    problems = []
    for module, path in known.items():
        module_reason = any(line.startswith("# lazy: ") for line in path.read_text().splitlines())
        for line, target, where, comment in imports(path, module, known):
            at = f"{path.relative_to(ROOT)}:{line}"
            if target in known:
                if target != module:
                    edges[module].add(target)
                    if where == "module":
                        on_load[module].add(target)
                    src, dst = layer(module), layer(target)
                    if dst != src and dst not in LAYERS[src]:
                        problems.append(f"{at}: {src} imports {target} ({dst})")
                if where == "function" and not comment:
                    problems.append(f"{at}: function-level import of {target} without a reason")
            elif target.split(".")[0] not in HEAVY:
                if where == "function":
                    problems.append(f"{at}: {target} is not heavy; import it at the top")
            elif where == "module":
                loaded[module].add(target.split(".")[0])
            elif where == "function":
                lazy.append((module, at, target.split(".")[0], comment or module_reason))
    for module, at, library, reason in lazy:
        if library in heavy_on_load(module, on_load, loaded):
            problems.append(
                f"{at}: {library} is loaded with the module already; import it at the top"
            )
        elif not reason:
            problems.append(f"{at}: lazy import of {library} without a reason (# lazy: ...)")
    return known, edges, problems


def heavy_on_load(module: str, on_load: dict[str, set[str]], loaded: dict[str, set[str]]) -> set:
    """The heavy libraries importing `module` loads (its own top-level imports and those of the
    stageflow modules it imports at the top, transitively; function-level edges excluded)."""
    seen, todo, out = set(), [module], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        out |= loaded[current]
        todo += on_load[current]
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def test_imports_point_down_and_lazy_imports_say_why():
    known, edges, problems = graph()
    assert len(known) > 60 and edges
    assert not problems, "\n".join(problems)


def test_no_import_cycle():
    _, edges, _ = graph()
    assert cycles(edges) == []


def test_the_checker_sees_a_cycle_and_an_upward_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    on_load, loaded = defaultdict(set, {"a": {"b"}}), defaultdict(set, {"b": {"torch"}})
    assert heavy_on_load("a", on_load, loaded) == {"torch"}  # a lazy torch in `a` is pointless
    assert layer("stageflow.platform.engine.runner") == "platform.engine"
    assert "platform.engine" not in LAYERS["actors"]


def test_core_looks_up_only_core_registries():
    for module, path in modules().items():
        if not module.startswith("stageflow.core.") or module.endswith(".registry"):
            continue
        names = {n.id for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Name)}
        assert not names & UPPER_REGISTRIES, (
            f"{path.relative_to(ROOT)} uses {names & UPPER_REGISTRIES}"
        )
    assert CORE_REGISTRIES


def loaded_after(*commands: list[str], watched: tuple[str, ...]) -> list[str]:
    """Which of `watched` a fresh process has imported after running the stageflow commands."""
    code = (
        "import sys\n"
        "from stageflow.platform.commands.cli import main\n"
        f"for argv in {list(commands)!r}:\n"
        "    assert main(argv) == 0, argv\n"
        f"print(sorted(m for m in {watched!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return ast.literal_eval(done.stdout.splitlines()[-1])


def test_status_and_report_load_neither_torch_nor_ray(tmp_path):
    """The light commands on a study directory (the report of a study with no finished trial)."""
    study = tmp_path / "study"
    study.mkdir()
    source = (ROOT / "studies" / "quickstart.yaml").read_text()
    (study / "study.yaml").write_text(source + f"storage_dir: {study}\n")
    heavy = ("torch", "ray", "vllm", "deepspeed", "transformers")
    assert loaded_after(["status", str(study)], ["report", str(study)], watched=heavy) == []


def test_no_method_names_as_strings_across_processes():
    """Group, actor and vLLM RPC calls go through actors/dispatch.py, never a method name."""
    import re

    patterns = [
        r"\.call(_split|_async)?\(\s*[\"']",
        r"collective_rpc\(\s*[\"']",
        r"\.rpc(\.remote)?\(\s*[\"']",
        r"getattr\([^)]*\)\.remote\(",
    ]
    # the mechanism itself: getattr(actor, method.__name__)
    allowed = {ROOT / "actors" / "group.py", ROOT / "actors" / "dispatch.py"}
    found = []
    for path in modules().values():
        if path in allowed:
            continue
        text = path.read_text()
        found += [f"{path.relative_to(ROOT)}: {p}" for p in patterns if re.search(p, text)]
    assert not found, found


def test_validate_loads_what_checking_needs_and_no_more():
    """Validating the quickstart reads the tokenizer (prompt lengths), not torch or Ray."""
    heavy = ("torch", "ray", "vllm", "deepspeed", "mlflow", "peft")
    assert (
        loaded_after(["validate", str(ROOT / "studies" / "quickstart.yaml")], watched=heavy) == []
    )
