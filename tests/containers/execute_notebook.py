"""Run notebooks top to bottom with nbclient, as JupyterLab's "Run All" would, and fail on the first error.

    python tests/containers/execute_notebook.py notebooks/01_qlora_quickstart.ipynb [...] [--out DIR]

Runs inside the notebook container (nbclient and ipykernel are in the image). The notebooks
are read, never written: with --out, the executed copies (with outputs) go to DIR.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

# Tracebacks come colored for a terminal; logs read better without the escape codes.
ANSI_COLOR = re.compile(r"\x1b\[[0-9;]*m")


def execute(path: Path, out_dir: Path | None, timeout: int) -> bool:
    nb = nbformat.read(path, as_version=4)
    # The kernel starts in the notebook's folder, as in JupyterLab.
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    started = time.perf_counter()
    ok = True
    try:
        client.execute()
    except CellExecutionError as e:
        ok = False
        print(f"FAILED {path}:\n{ANSI_COLOR.sub('', str(e))}", file=sys.stderr)
    finally:
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, out_dir / path.name)
    code_cells = sum(c.cell_type == "code" for c in nb.cells)
    print(
        f"{'ok' if ok else 'FAILED'} {path}: {code_cells} code cells in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="write the executed notebooks here")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell (default 900)")
    args = parser.parse_args()
    results = [execute(p, args.out, args.timeout) for p in args.notebooks]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
