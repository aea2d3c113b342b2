"""The one exception type users see: a message that names the problem and the fix."""


class RadistillError(Exception):
    """A problem with the user's input or files, explained in the message (the CLI prints it without a traceback)."""
