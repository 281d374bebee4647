"""The package's imports go one way: commands -> run -> methods -> trainer ->
ops -> extension, with data, models and the other pieces beside the
trainer. Nothing imports a module of a higher layer (read from the source)."""
import ast
import collections
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "freeadv_fast"
# a module may import only modules of its own layer or below
LAYERS = [
    {"_ext", "common", "messages", "kernels"},  # the extension, shared facts, logging
    {"ops"},  # the fused perturbation ops and their backends
    {"graphs", "distributed", "scheduler", "phases", "models", "data", "checkpoint", "stem"},  # beside the trainer
    {"trainer", "attacks", "evaluate"},
    {"methods"},
    {"config", "report", "freeadv_fast"},  # settings; the package's public names
    {"cli", "run"},
    {"train", "eval"},  # the commands
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports():
    """{room: {rooms it imports}} over every module of the package."""
    found = collections.defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        package = parts[:-1] if path.name != "__init__.py" else parts[:-1]
        if path.name == "__init__.py":
            parts = parts[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                module = base + (node.module.split(".") if node.module else [])
                targets = [".".join(module + ([] if node.module else [a.name])) for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                if target.startswith("freeadv_fast") and path.name != "__main__.py":  # a command inside data/
                    found[room(".".join(parts))].add(room(target))
    return found


def test_every_room_has_a_layer():
    rooms = {room(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)) for p in PACKAGE.rglob("*.py")}
    assert rooms <= set(RANK) | {"__init__", "__main__"}, rooms - set(RANK)


def test_nothing_imports_upward():
    upward = [f"{a} -> {b}" for a, targets in imports().items() for b in targets
              if a in RANK and b in RANK and RANK[b] > RANK[a]]
    assert not upward, upward
