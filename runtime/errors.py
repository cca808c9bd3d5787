"""The one exception type for mistakes a user can make (bad input, bad files, bad names).

The CLI prints such an error as one line and exits with status 2; programming errors stay tracebacks.
"""


class EdgeVLMError(Exception):
    """A user-facing error with an actionable message."""


class BundleError(EdgeVLMError):
    """A model bundle (manifest + files) is missing, altered or of an unsupported format."""


class ImageError(EdgeVLMError):
    """An image could not be read (not an image, truncated, too large)."""


class ContextLengthError(EdgeVLMError):
    """The prompt (plus visual tokens) does not fit the model's context."""


class ConstraintError(EdgeVLMError):
    """A JSON schema, regex or choice list for constrained decoding cannot be compiled."""
