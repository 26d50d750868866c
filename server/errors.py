"""Typed domain exceptions. The HTTP layer maps them to status codes; nothing below it knows HTTP."""

from __future__ import annotations


class AdapterServerError(Exception):
    """Base class; `kind` is the short snake_case type shown to clients."""

    kind = "server_error"


class InvalidAdapterError(AdapterServerError):
    """An adapter checkpoint is malformed, refers to things the base model lacks, or uses a refused option."""

    kind = "invalid_adapter"

    def __init__(self, message: str, key: str | None = None) -> None:
        self.key = key
        super().__init__(f"{message} (key: {key})" if key else message)


class UnsupportedAdapterError(InvalidAdapterError):
    """A well-formed adapter that uses an option we deliberately do not serve."""

    kind = "unsupported_adapter"


class AdapterNotFoundError(AdapterServerError):
    kind = "adapter_not_found"

    def __init__(self, adapter_id: str) -> None:
        self.adapter_id = adapter_id
        super().__init__(f"adapter {adapter_id!r} does not exist")


class AdapterExistsError(AdapterServerError):
    kind = "adapter_exists"

    def __init__(self, adapter_id: str) -> None:
        super().__init__(f"adapter {adapter_id!r} already exists; pass ?replace=true to replace it")


class InvalidAdapterIdError(AdapterServerError):
    kind = "invalid_adapter_id"


class NotMergeableError(AdapterServerError):
    kind = "not_mergeable"


class InvalidRequestError(AdapterServerError):
    """A generation request whose parameters are out of range."""

    kind = "invalid_request"


class OverloadedError(AdapterServerError):
    kind = "overloaded"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class ModelLoadError(AdapterServerError):
    kind = "model_load_error"


class GenerationFailedError(AdapterServerError):
    """A forward step failed for the rows of this request (for example non-finite logits)."""

    kind = "generation_failed"


class RequestTimeoutError(AdapterServerError):
    kind = "timeout"


class NotReadyError(AdapterServerError):
    kind = "not_ready"


class AuthError(AdapterServerError):
    kind = "unauthorized"

    def __init__(self, message: str, status: int) -> None:
        self.status = status
        super().__init__(message)


class ConflictError(AdapterServerError):
    """The request contradicts the state of what it names (e.g. unloading an adapter that was uploaded)."""

    kind = "conflict"


class AdapterChangedError(ConflictError):
    """The adapter was replaced while a request for it was being prepared, and the new version speaks
    another vocabulary than the request was tokenised with: sending it again is safe."""

    kind = "adapter_changed"


class AdapterTooLargeError(InvalidAdapterError):
    """An adapter that would take more device memory than the server's whole byte budget for adapters."""

    kind = "adapter_too_large"


class ForbiddenError(AdapterServerError):
    kind = "forbidden"


class NotEnabledError(AdapterServerError):
    """A feature the operator did not turn on, or a server-side path that is not there."""

    kind = "not_found"


class PayloadTooLargeError(AdapterServerError):
    kind = "payload_too_large"
