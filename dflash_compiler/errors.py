"""One error type for bad input: a single line that names the file, field or parameter at fault."""


class DFlashError(ValueError):
    """Raised for a bad checkpoint, a mismatched drafter, a corrupt file or a malformed request."""
