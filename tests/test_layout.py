"""The package layout shows the data flow: no module over 400 lines, and imports run one way, down the layers
that README.md's "Layout" section lists. A module added in a new place fails here until it is given a layer."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400

# lowest first; a module may import its own layer and the ones below it, never one above
LAYERS = [
    ["rptfast.errors", "rptfast.config_check", "rptfast.config", "rptfast.configs", "rptfast.assets",
     "rptfast.provenance"],
    ["rptfast.data", "rptfast.data.tokens", "rptfast.data.templates", "rptfast.data.store", "rptfast.kernels",
     "rptfast.distributed", "rptfast.metrics", "rptfast.reward", "rptfast.data.pydoc_topics", "rptfast.convert"],
    ["rptfast.model"],
    ["rptfast.rollout", "rptfast.checkpoint", "rptfast.export"],
    ["rptfast.data.corpus", "rptfast.data.filter", "rptfast.data.prepare", "rptfast.data.inspect_samples"],
    ["rptfast.eval", "rptfast.report"],
    ["rptfast.tasks"],
    ["rptfast.train"],
    ["rptfast.throughput", "rptfast.trl_peer", "rptfast.testing"],
    ["rptfast.cli", "rptfast.__main__"],
]  # fmt: skip


def modules() -> dict[str, Path]:
    """Dotted name -> file, for rptfast/ and kernels/ (installed as rptfast.kernels)."""
    out = {}
    for base, prefix in ((ROOT / "rptfast", "rptfast"), (ROOT / "kernels", "rptfast.kernels")):
        for f in base.rglob("*.py"):
            if f.is_symlink() or "kernels" in f.relative_to(base).parts[:1] and prefix == "rptfast":
                continue  # a worktree's rptfast/kernels link, not a module of its own
            parts = f.relative_to(base).with_suffix("").parts
            name = ".".join((prefix, *parts)).removesuffix(".__init__")
            if name != "rptfast":  # the package's own __init__: a docstring and the version
                out[name] = f
    return out


def layer(name: str) -> int:
    """The layer of a module: the longest layer entry that is it or a package above it."""
    best = None
    for i, entries in enumerate(LAYERS):
        for e in entries:
            if (name == e or name.startswith(e + ".")) and (best is None or len(e) > len(best[1])):
                best = (i, e)
    assert best is not None, f"{name} has no layer in tests/test_layout.py's LAYERS (and README's Layout)"
    return best[0]


def imports(path: Path, name: str) -> set[str]:
    """rptfast modules a file imports, at any depth of the file (lazy imports count too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 packages
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        out |= {t for t in targets if t.startswith("rptfast")}
    return out


def test_no_module_over_the_limit():
    long = {name: n for name, f in modules().items()
            if name.startswith("rptfast.") and not name.startswith("rptfast.kernels")
            and (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by stage (at most {MAX_LINES} lines): {long}"


def test_imports_run_down_the_layers():
    mods = modules()
    upward = set()
    for name, path in mods.items():
        for target in imports(path, name):
            # `from rptfast.model import X`: X is a name in a module, or a submodule; rank the longest known module
            known = max((m for m in mods if target == m or target.startswith(m + ".")), key=len, default=None)
            if known and layer(known) > layer(name):
                upward.add(f"{name} imports {known}")
    assert not upward, "imports that run back up the layers:\n" + "\n".join(sorted(upward))


def test_every_module_has_a_layer():
    for name in modules():
        layer(name)
