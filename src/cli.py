"""What every entry point shares: one-line errors, --debug, --quiet."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable

from src.errors import PipelineError


def stage_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every stage script takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="full tracebacks on errors")
    return p


def quiet(args: argparse.Namespace | None = None) -> bool:
    """Progress bars off with --quiet, in CI (CI set) or with CNN_QUIET set."""
    return bool(
        (args is not None and getattr(args, "quiet", False))
        or os.environ.get("CI")
        or os.environ.get("CNN_QUIET")
    )


def run_stage(main: Callable[[], None]) -> None:
    """Run `main`; a PipelineError, an OSError (a path or service of the environment) or
    Ctrl-C becomes one line on stderr and a non-zero exit. Any other exception is a bug and
    keeps its traceback.

    Full tracebacks with `--debug` or CNN_DEBUG=1.
    """
    debug = "--debug" in sys.argv or os.environ.get("CNN_DEBUG") not in (None, "", "0")
    try:
        main()
    except PipelineError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        # The environment, not the code: a path that cannot be read or created, a full disk,
        # a refused connection. One line naming the path; other exceptions are bugs and keep
        # their traceback.
        if debug:
            traceback.print_exc()
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        sys.exit(2)


def os_error_line(e: OSError) -> str:
    """An OSError as one line: 'path: reason' (both paths for a rename), else its message."""
    if e.filename is not None and e.strerror:
        names = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
        return f"{names}: {e.strerror}"
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
