"""Command line: ``anycam demo``, ``anycam evaluate`` and ``anycam explain`` (also ``python -m anycam``).

``demo`` and ``evaluate`` run offline on the shipped demo model in every installed framework and
report whether the frameworks agree (``anycam.cli.demo``, ``anycam.cli.evaluate``). ``explain``
explains your own images with your own model (``anycam.cli.explain``, ``anycam.cli.models``).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from .. import core
from .._errors import AnycamError
from .demo import BACKENDS, demo
from .evaluate import evaluate
from .explain import add_explain_parser, explain_command


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``anycam`` command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    # Before anything imports TensorFlow (a demo backend or the user's factory): its C++ start-up
    # log lines are noise on a command line. A value the user set wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = argparse.ArgumentParser(
        prog="anycam",
        description="Grad-CAM for PyTorch, TensorFlow/Keras and JAX: the demo, its evaluation, and your own images.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, helptext in (
        ("demo", "explain the shipped demo model; write a PNG grid; print pointing-game accuracy"),
        ("evaluate", "deletion/insertion AUC, pointing game and the sanity check per method (needs anycam[metrics])"),
    ):
        command = commands.add_parser(name, help=helptext, description=helptext)
        command.add_argument(
            "--backend",
            default="all",
            choices=("all", *BACKENDS),
            help="framework to run the demo model in (default: all installed)",
        )
        command.add_argument(
            "--method", default="all", choices=("all", *core.METHODS), help="CAM method (default: all)"
        )
        command.add_argument(
            "--layer", default="stage3", help="layer to explain (default: stage3, the last conv stage)"
        )
        command.add_argument("--out", default="anycam-demo", help="folder for the PNG output (default: ./anycam-demo)")
    commands.choices["demo"].add_argument(
        "--rows", type=int, default=4, help="held-out canvases shown in the picture (default: 4)"
    )
    commands.choices["evaluate"].add_argument(
        "--count", type=int, default=16, help="canvases to evaluate (default: 16)"
    )
    commands.choices["evaluate"].add_argument(
        "--steps", type=int, default=32, help="deletion/insertion steps (default: 32)"
    )
    add_explain_parser(commands)
    args = parser.parse_args(argv)
    run = {"demo": demo, "evaluate": evaluate, "explain": explain_command}[args.command]
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warnings(f"anycam {args.command}")
        try:
            return run(args)
        except AnycamError as exc:
            print(f"anycam {args.command}: {exc}", file=sys.stderr)
            return 2


def _one_line_warnings(prefix: str) -> Callable[..., None]:
    """Returns a ``warnings.showwarning`` that prints ``PREFIX: warning: MESSAGE (Category)`` on one line.

    Python's own format names the file and source line that warned: on a command line that is the
    console script's ``sys.exit(main())``, which tells the user nothing.
    """

    def show(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
        text = " ".join(str(message).split())
        print(f"{prefix}: warning: {text} ({category.__name__})", file=sys.stderr)

    return show
