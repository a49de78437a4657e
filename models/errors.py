"""The one exception type FedREX raises for bad input.

Commands catch it and print its message as a single line (no traceback): the message must say
what was wrong and what to do about it.
"""


class FedrexError(ValueError):
    """Bad input or configuration, reported to the user as one actionable line."""
