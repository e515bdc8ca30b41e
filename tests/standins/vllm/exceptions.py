"""vLLM's exception hierarchy, as in vllm/exceptions.py of vLLM 0.33.0 (the part the
caption engine can meet): client errors map to HTTP 4xx, server errors to 5xx."""

from __future__ import annotations

from typing import Any


class VLLMError(Exception):
    """Base class of vLLM's own errors."""


class VLLMClientError(VLLMError):
    """Caused by the request (4xx)."""


class VLLMServerError(VLLMError):
    """Caused by the server (5xx)."""


class VLLMValidationError(VLLMClientError):
    """A request that fails validation; names the parameter when known."""

    def __init__(self, message: str, *, parameter: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.value = value

    def __str__(self) -> str:
        base = super().__str__()
        extras = [f"{k}={v}" for k, v in (("parameter", self.parameter), ("value", self.value)) if v is not None]
        return f"{base} ({', '.join(extras)})" if extras else base
