"""The one exception type a user is meant to see: a one-line message naming what is at fault."""


class PipelineError(Exception):
    """A user-facing failure: bad params, bad data, an unreachable service, a missing model.

    The message is one line and names the file, parameter or service at fault. Stage scripts
    print it without a traceback (see `src.cli.run_stage`) and exit non-zero.
    """
