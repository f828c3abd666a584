"""Shared test fixtures: tiny notebooks, isolated run roots."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


def write_notebook(path: Path, parameters: str, body: list[str]) -> Path:
    """A notebook with one ``parameters`` cell and plain code cells, no outputs."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(parameters)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params] + [nbformat.v4.new_code_cell(src) for src in body]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


@pytest.fixture
def tiny_notebook(tmp_path: Path) -> Path:
    """A notebook that writes its parameters to ``run_dir/out.txt`` and fails when ``fail``."""
    return write_notebook(
        tmp_path / "nb" / "tiny.ipynb",
        'run_dir = "."\nvalue = "x"\nfail = False',
        ["from pathlib import Path\nPath(run_dir, 'out.txt').write_text(f'{value}:{type(value).__name__}')",
         "if fail:\n    raise ValueError(f'asked to fail with {value}')"],
    )
