"""Paths anchored at the repository root (no ``"../data"`` strings anywhere).

The repository root is found from this file when biometry is installed in editable mode, and
from ``$BIOMETRY_ROOT`` or the current directory otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent  # biometry/config: the package data lives here
DATA_DIR = PACKAGE_DIR / "data"
STUDIES_DIR = PACKAGE_DIR / "studies"


def repo_root() -> Path:
    """The project root: ``$BIOMETRY_ROOT``, else the checkout this package lives in, else cwd."""
    env = os.environ.get("BIOMETRY_ROOT")
    if env:
        return Path(env).resolve()
    candidate = PACKAGE_DIR.parents[2]  # src/biometry/config -> the checkout
    if (candidate / "pyproject.toml").is_file() and (candidate / "notebooks").is_dir():
        return candidate
    return Path.cwd().resolve()


def notebooks_dir() -> Path:
    return repo_root() / "notebooks"


def runs_dir() -> Path:
    return repo_root() / "papermill_runs"


def figures_dir() -> Path:
    return repo_root() / "figures"
