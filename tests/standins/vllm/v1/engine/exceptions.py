"""vllm/v1/engine/exceptions.py of vLLM 0.33.0: the engine core's two failure types.

EngineDeadError is raised by every call once the engine core process has died (offline,
from ``LLM.generate``'s engine steps); it is unrecoverable: the ``LLM`` must be rebuilt.
"""

from __future__ import annotations

from typing import Any

from vllm.exceptions import VLLMServerError


class EngineGenerateError(VLLMServerError):
    """A per-request failure of AsyncLLM.generate(); recoverable."""


class EngineDeadError(VLLMServerError):
    """The EngineCore died; unrecoverable."""

    ENGINE_DEAD_MESSAGE = "EngineCore encountered an issue. See stack trace (above) for the root cause."
    CLIENT_MESSAGE = "The server had an error while processing your request."

    def __init__(self, *args: Any, suppress_context: bool = False, **kwargs: Any) -> None:
        super().__init__(self.ENGINE_DEAD_MESSAGE, *args, **kwargs)
        self.__suppress_context__ = suppress_context
