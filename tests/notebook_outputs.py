"""Notebooks are committed without outputs: check that, or strip them.

    python -m tests.notebook_outputs check notebooks     # exit 1, naming the cells, if any has outputs
    python -m tests.notebook_outputs strip notebooks     # remove outputs and execution counts in place

Plain JSON, so it needs neither nbformat nor Jupyter (the test venv has neither).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def notebooks(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for p in map(Path, paths):
        found += sorted(p.rglob("*.ipynb")) if p.is_dir() else [p]
    return [p for p in found if ".ipynb_checkpoints" not in p.parts]


def problems(path: Path) -> list[str]:
    """What a committed notebook must not hold: outputs, execution counts, widget state."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    found = []
    for i, cell in enumerate(nb.get("cells", []), start=1):
        if cell.get("cell_type") != "code":
            continue
        if cell.get("outputs"):
            found.append(f"{path}: cell {i} has {len(cell['outputs'])} output(s)")
        if cell.get("execution_count") is not None:
            found.append(f"{path}: cell {i} has execution_count {cell['execution_count']}")
    if "widgets" in nb.get("metadata", {}):
        found.append(f"{path}: metadata holds widget state")
    return found


def strip(path: Path) -> bool:
    text = path.read_text(encoding="utf-8")
    nb = json.loads(text)
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    nb.get("metadata", {}).pop("widgets", None)
    stripped = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
    if stripped != text:
        path.write_text(stripped, encoding="utf-8")
        return True
    return False


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("check", "strip"):
        print(__doc__, file=sys.stderr)
        return 2
    paths = notebooks(argv[1:])
    if argv[0] == "strip":
        for path in paths:
            if strip(path):
                print(f"stripped {path}")
        return 0
    found = [p for path in paths for p in problems(path)]
    for line in found:
        print(line, file=sys.stderr)
    if found:
        print("Strip them before committing: make strip-notebooks", file=sys.stderr)
        return 1
    print(f"{len(paths)} notebooks, no outputs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
