"""The project's error type: every bad input names the field, the value and what was expected."""


class VlaserveError(ValueError):
    """A bad value for a named field.

    Args:
        field: what was wrong (a CLI flag, a tensor name, a spec key).
        value: the value that was given.
        expected: what would have been accepted.
    """

    def __init__(self, field: str, value: object, expected: str):
        self.field = field
        self.value = value
        self.expected = expected
        super().__init__(f"{field}: got {value!r}, expected {expected}")
