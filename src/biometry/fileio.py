"""Atomic file output: nothing is ever half-written.

Every writer in biometry goes through these helpers: the content goes to a temporary file in the
same folder, is flushed, and is then renamed over the target (``os.replace`` is atomic on POSIX).
A killed process leaves at worst a ``.tmp-*`` file that readers ignore.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success rename it onto ``target``.

    ``suffix`` keeps the extension for writers that infer the format from it (e.g. ``.nii.gz``).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix or "".join(target.suffixes),
                               dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are shared like any file
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_text(target: str | os.PathLike, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text)
    return Path(target)


def write_json(target: str | os.PathLike, obj: Any) -> Path:
    return write_text(target, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_csv(target: str | os.PathLike, frame, **kwargs) -> Path:
    """Write a pandas DataFrame atomically (``index=False`` unless given)."""
    kwargs.setdefault("index", False)
    with atomic_path(target) as tmp:
        frame.to_csv(tmp, **kwargs)
    return Path(target)


def write_npy(target: str | os.PathLike, array: np.ndarray) -> Path:
    with atomic_path(target, suffix=".npy") as tmp:
        np.save(tmp, array)
    return Path(target)


def write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ---------------------------------------------------------------------------------------------
# tables: CSV (full precision) beside Markdown, byte-reproducible


def _fmt(value) -> str:
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return ""
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table; floats to 4 significant digits, NaN as empty."""
    header = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(_fmt(v) for v in row) + " |"
            for row in df.itertuples(index=False, name=None)]
    return "\n".join([header, rule, *body]) + "\n"


def write_table(df: pd.DataFrame, path_without_ext: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``df`` as ``<path>.csv`` (full precision) and ``<path>.md``, atomically.

    The output depends only on the frame's content (fixed float format, ``\\n`` line ends), so
    the same table gives the same bytes.
    """
    base = Path(path_without_ext)
    csv = write_csv(base.with_name(base.name + ".csv"), df, index=False,
                       float_format="%.10g", lineterminator="\n")
    md = write_text(base.with_name(base.name + ".md"), to_markdown(df))
    return csv, md
