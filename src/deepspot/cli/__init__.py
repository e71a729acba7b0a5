"""``deepspot`` command line: one sub-command per stage (typer + rich).

Errors a user can cause print one line naming the thing and the reason, exit code 1,
no traceback (set DEEPSPOT_DEBUG=1 to see it).
"""
from __future__ import annotations

import logging
import os
import sys

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Predict spatial gene expression from H&E slides (DeepSpot, DeepCell, DeepSpot2Cell).")


def _register() -> None:
    # each module adds its commands to ``app``
    from deepspot.cli import spots  # noqa: F401

    for optional in ("evaluate", "predict_cells", "weights", "cohort", "slides", "tcga", "bench"):
        try:
            __import__(f"deepspot.cli.{optional}")
        except ModuleNotFoundError as e:
            if e.name != f"deepspot.cli.{optional}":
                raise


#: What a command leaves behind if it is interrupted (Ctrl-C); commands that keep finished work say so.
_interrupt_note = ["nothing written"]


def on_interrupt(note: str) -> None:
    """Set the line printed after 'interrupted;' when the running command gets SIGINT."""
    _interrupt_note[0] = note


def _interrupted() -> None:
    print(f"deepspot: interrupted; {_interrupt_note[0]}", file=sys.stderr)
    sys.exit(130)


# (defining module, name) of the package's exceptions meant for the user
_USER_ERRORS = (("deepspot.io.slides", "SlideError"), ("deepspot.features.encoders", "EncoderError"),
                ("deepspot.convert", "ConvertError"), ("deepspot.config", "CheckpointError"),
                ("deepspot.io.spatial_checks", "SpatialDataError"), ("deepspot.io.datasets", "DataError"),
                ("deepspot.extras", "MissingExtra"))


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is meant for the user (one line, no traceback).

    Only classes of modules already imported are looked up: an exception raised before a module was
    imported cannot be an instance of its classes, and importing them (torch behind some) would make a
    quick error path slow."""
    own = tuple(getattr(sys.modules[m], name) for m, name in _USER_ERRORS if m in sys.modules)
    return own + (FileNotFoundError, FileExistsError, ValueError, PermissionError, IsADirectoryError,
                  NotADirectoryError)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("deepspot").setLevel(logging.INFO)  # our own notes (what was decided from the data)
    _register()
    debug = os.environ.get("DEEPSPOT_DEBUG", "") not in ("", "0")
    try:
        rc = app(args=argv, standalone_mode=False)  # click returns typer.Exit's code here
        if rc == 130:  # typer's answer to Ctrl-C (KeyboardInterrupt -> Exit(130), returned here)
            _interrupted()
        if isinstance(rc, int) and rc != 0:
            sys.exit(rc)
    except SystemExit:
        raise
    except KeyboardInterrupt:  # outputs are renamed into place only when complete: no partial files
        _interrupted()
    except Exception as e:  # noqa: BLE001 - the CLI boundary
        import click

        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            if isinstance(e.__cause__ or e.__context__, KeyboardInterrupt):  # click turns Ctrl-C into Abort
                _interrupted()
            print("deepspot: aborted", file=sys.stderr)
            sys.exit(1)
        if debug:
            raise
        known = isinstance(e, user_errors()) or callable(getattr(e, "format_message", None))  # click usage errors
        text = e.format_message() if callable(getattr(e, "format_message", None)) else str(e)  # click: + "Did you mean"
        msg = " ".join(text.strip().splitlines()) if text.strip() else type(e).__name__
        prefix = "error" if known else f"error ({type(e).__name__})"
        print(f"deepspot: {prefix}: {msg}", file=sys.stderr)
        if not known:
            print("deepspot: set DEEPSPOT_DEBUG=1 to see the traceback", file=sys.stderr)
        sys.exit(1)
