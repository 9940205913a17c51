"""The errors a request can end with, one class per TGI `error_type`.

Raised where the problem is found; the HTTP layer turns them into status codes in one place.
"""


class ServeError(Exception):
    error_type = "generation"

    def __init__(self, message: str, error_type: str | None = None):
        super().__init__(message)
        self.message = message
        if error_type is not None:
            self.error_type = error_type


class ValidationError(ServeError):
    """The request is malformed or out of bounds (TGI prefixes the message for the client)."""

    error_type = "validation"


class GenerationError(ServeError):
    """The model failed while generating."""

    error_type = "generation"


class OverloadedError(ServeError):
    error_type = "overloaded"


class IncompleteGenerationError(ServeError):
    """A stream ended without its final token."""

    error_type = "incomplete_generation"


class ToolError(ServeError):
    """Chat `tools` were given; they need constrained decoding, which this server does not have."""

    error_type = "tool_error"


class BatchSizeError(ServeError):
    """More prompts in one /v1/completions request than `max_client_batch_size`."""

    error_type = "batch size exceeded"


class SuffixError(ServeError):
    error_type = "suffix not supported"


class ConfigError(ValueError):
    """An inconsistent or invalid setting, found at start; the message names the setting."""
