"""The one exception type the merger raises for bad input or a failed check."""


class MergeError(Exception):
    """A merge cannot proceed. The message names the file, the key and what was expected.

    The CLI prints it as ``error: <message>`` and exits non-zero; nothing is left at the
    output path.
    """
