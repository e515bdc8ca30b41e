"""vllm.v1.engine of vLLM 0.33.0: the finish reasons a request can end with
(FINISH_REASON_STRINGS in vllm/v1/engine/__init__.py)."""

FINISH_REASON_STRINGS = ("stop", "length", "abort", "error", "repetition")
