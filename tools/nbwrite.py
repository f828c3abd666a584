"""Write a source notebook from cells (developer tool): one ``parameters`` cell, no outputs.

    from nbwrite import write
    write("notebooks/02_train.ipynb", [("md", "# Title"), ("params", "x = 1"), ("code", "x")])
"""

from __future__ import annotations

from pathlib import Path

import nbformat


def write(path: str | Path, cells: list[tuple[str, str]]) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, src in cells:
        if kind == "md":
            nb.cells.append(nbformat.v4.new_markdown_cell(src.strip()))
        else:
            cell = nbformat.v4.new_code_cell(src.strip())
            if kind == "params":
                cell.metadata["tags"] = ["parameters"]
            nb.cells.append(cell)
    for cell in nb.cells:  # stable ids keep diffs quiet
        cell.pop("id", None)
    nb.nbformat_minor = 4
    path = Path(path)
    nbformat.write(nb, path)
    return path
