"""The ``--help`` of the ``lightning`` command: the project's name, its packaged configs, the program name.

Each packaged config's first line is a comment saying what it is for; ``--help`` lists them with
that line, so a new config documents itself by its first line.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"

DESCRIPTION = ("marginboost: margin boosting and loss-landscape geometry with PyTorch Lightning. "
               "Trains MarginClassifier models (frozen W ∘ BN head, discounted cross-entropy with "
               "per-object gaps), boosted ensembles (a boosting: section in the config) and the "
               "project's studies. `lightning fit --config digits_boost.yaml` runs the offline default; "
               "`lightning SUBCOMMAND --help` lists every field.")


def config_purpose(path: str | Path) -> str:
    """The first line of a config when it is a comment (``# what it is``), else ``""``."""
    with open(path, encoding="utf-8") as f:
        first = f.readline().strip()
    return first.lstrip("#").strip() if first.startswith("#") else ""


def config_catalog(width: int = 80, config_dir: Path = CONFIG_DIR) -> str:
    """The packaged configs, one per entry with its purpose, wrapped to ``width`` columns."""
    paths = sorted(config_dir.glob("*.yaml"))
    name_width = max(len(p.name) for p in paths) + 2
    lines = ["packaged configs (--config NAME.yaml; a local file of that name wins):"]
    for path in paths:
        purpose = textwrap.wrap(config_purpose(path), width=max(20, width - name_width - 2),
                                break_on_hyphens=False) or [""]
        lines.append(f"  {path.name:<{name_width}}{purpose[0]}")
        lines += [" " * (name_width + 2) + more for more in purpose[1:]]
    lines += ["", "--verbose: Lightning's full console (tips, device lines, a model summary every round).",
              "report RUN_DIR: a boosting run's figures (PNG) and report.md, in RUN_DIR/report/."]
    return "\n".join(lines)


def program_name(argv0: str | None = None, main_module: str | None = None) -> str:
    """How the user started the command: ``lightning``/``marginboost`` (console scripts, the
    script's name) or ``python -m lightning_app`` (``__main__`` run as a module)."""
    if main_module is None:
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        main_module = getattr(spec, "name", None)
    if main_module:
        return "python -m " + main_module.removesuffix(".__main__")
    return Path(argv0 if argv0 is not None else sys.argv[0]).name or "lightning"


def help_formatter():
    """jsonargparse's help formatter, keeping the line breaks of the description and epilog."""
    from argparse import RawDescriptionHelpFormatter

    from jsonargparse import DefaultHelpFormatter

    class MarginBoostHelpFormatter(RawDescriptionHelpFormatter, DefaultHelpFormatter):
        pass

    return MarginBoostHelpFormatter


def parser_kwargs(prog: str | None = None) -> dict:
    """``LightningCLI(parser_kwargs=...)``: the project's description and the config catalog in the
    main and every subcommand's help, and the program name."""
    description = "\n".join(textwrap.wrap(DESCRIPTION, 80))
    common = {"epilog": config_catalog(), "formatter_class": help_formatter()}
    main = {"description": description, **common}
    if prog is not None:
        main["prog"] = prog
    return {**main, **{sub: dict(common) for sub in ("fit", "validate", "test", "predict")}}
