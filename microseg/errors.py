"""The one exception type for errors a user can cause (bad files, options, shapes).

The CLI turns it into a single line `microseg: error: <message>` and exit status 2.
"""


class MicrosegError(Exception):
    """An error caused by the user's input; its message names the culprit."""
