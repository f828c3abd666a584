"""The ``biometry`` command: a thin dispatcher over the library.

Each subcommand lives in the module that implements it as ``main(argv) -> int``; this file only
maps names to those functions, so that modules own their own arguments and help.
"""

from __future__ import annotations

import importlib
import sys

from biometry import __version__

#: subcommand -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "synth": ("biometry.phantom", "main", "generate a phantom cohort that looks like a UKB release"),
    "fields": ("biometry.config.fields", "main", "list the field catalogue"),
    "prepare": ("biometry.data.prepare", "main", "stations (NIfTI or UKB zips) -> fused volumes -> 2D formats"),
    "run": ("biometry.runs.pipeline", "run_main", "run one stage of a study (train, evaluate, ..., figures)"),
    "study": ("biometry.runs.pipeline", "study_main", "start a study from a preset; run all its stages"),
    "demo": ("biometry.runs.demo", "main", "the whole pipeline on a phantom cohort"),
    "figures": ("biometry.runs.figures", "main", "regenerate a study's figures and tables"),
    "thigh": ("biometry.runs.thigh", "main", "the thigh-function study: high/low from thigh slices"),
    "export": ("biometry.inference.export", "main", "write a trained module as a model bundle"),
    "infer": ("biometry.inference.engine", "main", "predict a release with calibrated 95 % intervals"),
}


def _usage() -> str:
    lines = ["usage: biometry <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {helptext}" for name, (_m, _f, helptext) in COMMANDS.items()]
    lines += ["", "`biometry <command> --help` describes each command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"biometry {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"biometry: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _h = COMMANDS[name]
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as exc:  # pragma: no cover - a packaging error
        print(f"biometry {name}: not available ({exc})", file=sys.stderr)
        return 2
    try:
        return int(fn(rest) or 0)
    except KeyboardInterrupt:
        print(f"biometry {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
