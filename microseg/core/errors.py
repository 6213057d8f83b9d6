"""The one exception type for errors a user can cause (bad files, options, shapes), and warnings.

The CLI turns an error into a single line `microseg: error: <message>` and exit status 2 (an
`OptionError`'s option names become the command's flags). An
input that is legitimate but suspicious (an expert mask empty on every slice) gets one line
`microseg: warning: <message>` on stderr and the run goes on.
"""

import os
import sys


class MicrosegError(Exception):
    """An error caused by the user's input; its message names the culprit.

    Raised in a DataLoader worker (a cache slice that does not read), it comes back to the main
    process through torch's ExceptionWrapper, which rebuilds it from the worker's whole traceback
    ("Caught MicrosegError in DataLoader worker process 0. Original Traceback ... MicrosegError:
    <message>"): the message is cut back to its own line, so the CLI still prints one line.
    """

    def __init__(self, message: object = "") -> None:
        text = str(message)
        name = type(self).__name__
        if text.startswith(f"Caught {name} in DataLoader worker") and f"{name}: " in text:
            text = text.rstrip().rsplit(f"{name}: ", 1)[1]
        super().__init__(text)


class OptionError(MicrosegError):
    """A refused option value, in the library's words: the message names each option as its parameter or config
    field in backticks (`` `ds_weights` must be >= 0, got -1 ``); the command line says its flag (``--ds-weights``)."""


def os_error_line(err: OSError) -> str:
    """One line for an OSError: the file(s) it names, then its reason."""
    reason = os.strerror(err.errno) if err.errno else " ".join(str(err).split())
    files = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
    return f"{files}: {reason}" if files else reason


def warn(message: str) -> None:
    """Print one line ``microseg: warning: <message>`` on stderr (above any progress bar)."""
    from tqdm import tqdm

    tqdm.write(f"microseg: warning: {' '.join(message.split())}", file=sys.stderr)
