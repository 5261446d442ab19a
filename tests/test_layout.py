"""The layout's rules, checked on the source: imports run one way (scripts → sweep → training → nfnet/storage)
with no circle (not even a type-only one, under `if TYPE_CHECKING:`), nfnet/ stays pure PyTorch, and files and
functions stay short enough to read."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("nfnet", "storage", "studies")
SCRIPTS = {"studies.agc_lambda", "studies.augmentation", "studies.batch_scaling", "studies.hpo", "studies.signal_prop",
           "studies.train", "studies.compare_maps"}
MAX_FUNCTION_LINES, MAX_MODULE_LINES = 60, 420  # "about 400": storage/loaders.py is 411


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            parts = p.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def imports(path: Path, name: str, known: set[str], typing_too: bool = False) -> set[str]:
    """Every project module `name` imports, at the top or inside a function (a hidden import is still one);
    with `typing_too`, also those under `if TYPE_CHECKING:` (never run, but still a dependency to read)."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for b in ast.walk(tree) if isinstance(b, ast.If) and "TYPE_CHECKING" in ast.unparse(b.test)
                   for n in ast.walk(b)} if not typing_too else set()  # type-only imports never run
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            # `from pkg import mod` depends on mod; `from mod import name` on mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):  # a package's __init__ runs first anyway
                found.add(t)
    return found


def graph(typing_too: bool = False) -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, m, set(mods), typing_too) for m, p in mods.items()}


def assert_no_circle(g: dict[str, set[str]], kind: str = "import circle") -> None:
    """A depth-first walk never meets a module still on its path."""
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(g[m]):
            assert state.get(d) != 1, f"{kind}: {' → '.join((path + [m])[(path + [m]).index(d):] + [d])}"
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [])


def test_imports_run_one_way_without_a_circle():
    g = graph()
    layer = {"nfnet": 0, "storage": 0, "studies.training": 1, "studies.sweep": 2}

    def level(m: str) -> int:
        if m in SCRIPTS:
            return 3
        return next((v for k, v in layer.items() if m == k or m.startswith(k + ".")), 3 if m == "studies" else -1)

    wrong = [(a, b) for a, deps in g.items() for b in deps
             if level(b) > level(a) or (level(a) == 0 and a.split(".")[0] != b.split(".")[0] and b != "nfnet")]
    assert not wrong, f"imports against the layer order: {wrong}"
    assert_no_circle(g)


def test_no_type_only_circle():
    """Type-only imports count too: a module that names another's types only under `if TYPE_CHECKING:` still
    depends on it, so a pair that imports each other that way is a circle to read (state types belong in a
    module of their own, as studies/training/state.py holds the training loop's)."""
    assert_no_circle(graph(typing_too=True), "type-only import circle")


def test_nfnet_is_pure_pytorch_and_training_never_needs_the_sweep():
    for m, p in modules().items():
        text = p.read_text()
        if m.startswith("nfnet"):
            for lib in ("ray", "mlflow", "optuna", "pyarrow"):
                assert f"import {lib}" not in text and f"from {lib}" not in text, (m, lib)
        if m.startswith("studies.training"):
            assert "studies.sweep" not in "".join(imports(p, m, set(modules()))), m


def test_short_functions_and_modules():
    long = []
    for m, p in modules().items():
        lines = p.read_text().count("\n")
        if lines > MAX_MODULE_LINES:
            long.append(f"{m}: {lines} lines")
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{m}.{node.name}: {n} lines")
    assert not long, long
