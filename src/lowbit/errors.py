"""The one exception type users see.

Library code raises `LowbitError` (or a subclass) for every problem caused by input: a bad file, an
unknown option, a shape that does not match. `lowbit.cli` turns it into one line on stderr and a non-zero
exit; anything else escaping is a bug and keeps its traceback.
"""


class LowbitError(Exception):
    """A problem with the user's input, explained in one line."""


class FormatError(LowbitError):
    """A checkpoint or tensor that does not follow the format it claims."""


class Overloaded(LowbitError):
    """Valid input that cannot be taken now (the engine's waiting queue is full); retrying later may work."""
