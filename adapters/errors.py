"""The one error type adapter loading raises: its message names the option or tensor and the file."""


class AdapterError(ValueError):
    pass
