"""Running a job's ``main(argv)`` in the test process, as a user's command line would, without a subprocess."""
from __future__ import annotations

from typing import Callable


def call_main(main: Callable[[list[str]], int], capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``main(args)``; a ``SystemExit`` (``--help``, a one-line error) gives its code.
    The job joins the session's Ray instance when one is running."""
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code
    got = capsys.readouterr()
    return code, got.out, got.err
