"""The one wrapper around papermill: every notebook execution in biometry goes through here.

Kernels talk over IPC sockets with a per-kernel connection file, which avoids the TCP port race of
parallel papermill runs (nteract/papermill#511), and start with a retry.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

from jupyter_client.manager import KernelManager


class IPCKernelManager(KernelManager):
    """A kernel manager that uses IPC transport and a unique connection file."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("transport", "ipc")
        run_dir = Path(tempfile.gettempdir()) / "biometry-kernels"
        run_dir.mkdir(exist_ok=True)
        kwargs.setdefault("connection_file", str(run_dir / f"kernel-{uuid.uuid4().hex}.json"))
        super().__init__(*args, **kwargs)
        # IPC socket paths are derived from `ip`; keep them short and unique
        self.ip = str(run_dir / f"k{uuid.uuid4().hex[:12]}")


class NotebookFailed(RuntimeError):
    """A notebook raised; ``notebook`` is the executed copy that shows the error."""

    def __init__(self, notebook: Path, message: str):
        super().__init__(f"{notebook}: {message}")
        self.notebook = notebook


def execute_notebook(source: str | os.PathLike, output: str | os.PathLike,
                     parameters: dict[str, Any] | None = None, cwd: str | os.PathLike | None = None,
                     kernel_name: str = "python3", retries: int = 2,
                     timeout: float | None = None) -> Path:
    """Execute ``source`` with papermill into ``output`` (its folder is created).

    Parameters are passed through the Python API, so strings stay strings (UKB field ids).
    Raises :class:`NotebookFailed` naming the executed notebook when a cell raises.
    """
    import papermill as pm  # heavy (nbconvert, jupyter): only when a notebook runs
    from papermill.exceptions import PapermillExecutionError  # with papermill, above

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    last_exc: Exception | None = None
    for _attempt in range(retries + 1):
        try:
            pm.execute_notebook(
                str(source), str(output), parameters=dict(parameters or {}),
                kernel_name=kernel_name, cwd=str(cwd) if cwd else None, progress_bar=False,
                log_output=False, execution_timeout=timeout, start_timeout=120,
                kernel_manager_class="biometry.runs.notebook.IPCKernelManager",
            )
            return output
        except PapermillExecutionError as exc:
            raise NotebookFailed(output, f"{exc.ename}: {exc.evalue}") from None
        except RuntimeError as exc:  # kernel died or failed to start: retry
            last_exc = exc
    raise NotebookFailed(output, f"kernel failed to start: {last_exc}")
