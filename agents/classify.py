"""Error classification in one place: provider, strands and transport exceptions -> typed teamster errors.

Retryable: throttling, timeouts, 5xx, connection failures. Terminal: structured-output failure, max tokens,
context overflow, guardrail, provider rejections (4xx), budget and criterion failures. Configuration:
missing credentials or access denied. Unknown exceptions are terminal (``unexpected_error``) so that they
reach the dead-letter queue with their message instead of looping through retries.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any

import redis
from strands.types.exceptions import (
    ContextWindowOverflowException,
    EventLoopException,
    MaxTokensReachedException,
    ModelThrottledException,
    StructuredOutputException,
)

from teamster.errors import (
    ContextOverflow,
    GuardrailIntervened,
    InvalidOutput,
    MaxTokensReached,
    MissingCredentials,
    ModelThrottled,
    ModelTimeout,
    ProviderRejected,
    ProviderUnavailable,
    StoreUnavailable,
    StructuredOutputError,
    TeamsterError,
    UnexpectedError,
)

__all__ = ["classify_exception", "classify_stop_reason", "retry_after", "UnexpectedError"]

_THROTTLE_CODES = {
    "ThrottlingException", "TooManyRequestsException", "Throttling", "ThrottledException",
    "ProvisionedThroughputExceededException", "RequestLimitExceeded", "SlowDown", "ModelNotReadyException",
    "RateLimitError", "rate_limit_error", "overloaded_error",
}
_TIMEOUT_CODES = {"ModelTimeoutException", "RequestTimeout", "RequestTimeoutException", "APITimeoutError"}
_UNAVAILABLE_CODES = {
    "ServiceUnavailableException", "ServiceUnavailable", "InternalServerException", "InternalServerError",
    "InternalFailure", "ModelStreamErrorException", "APIConnectionError", "api_error",
}
_CREDENTIAL_CODES = {
    "AccessDeniedException", "UnrecognizedClientException", "ExpiredTokenException", "InvalidSignatureException",
    "AuthenticationError", "PermissionDeniedError", "authentication_error", "permission_error",
    "NoCredentialsError", "PartialCredentialsError", "NoRegionError",
}
_THROTTLE_CODES = {c.lower() for c in _THROTTLE_CODES}
_TIMEOUT_CODES = {c.lower() for c in _TIMEOUT_CODES}
_UNAVAILABLE_CODES = {c.lower() for c in _UNAVAILABLE_CODES}
_CREDENTIAL_CODES = {c.lower() for c in _CREDENTIAL_CODES}
_CONTEXT_HINTS = ("context window", "too many tokens", "input is too long", "maximum context length",
                  "context_length_exceeded", "prompt is too long")



def _status_code(exc: BaseException) -> int | None:
    for attr in ("status_code", "status", "http_status"):
        value = getattr(exc, attr, None)
        if isinstance(value, int):
            return value
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        meta = response.get("ResponseMetadata", {})
        code = meta.get("HTTPStatusCode")
        return code if isinstance(code, int) else None
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code:
            return str(code)
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("type"):
            return str(err["type"])
    return type(exc).__name__


def retry_after(exc: BaseException) -> float | None:
    """Seconds the provider asked to wait (``retry-after-ms`` / ``retry-after`` headers), searched along the
    exception's cause chain (strands re-raises the SDK's error as its own, ``from`` the original)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        response = getattr(current, "response", None)
        headers = getattr(response, "headers", None)
        if headers is None and isinstance(response, dict):
            headers = response.get("ResponseMetadata", {}).get("HTTPHeaders")
        if headers is not None:
            for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
                value = headers.get(name) if hasattr(headers, "get") else None
                try:
                    if value is not None:
                        return max(0.0, float(value) * scale)
                except (TypeError, ValueError):
                    continue
        current = current.__cause__ or current.__context__
    return None


def classify_exception(exc: BaseException) -> TeamsterError:
    """Map any exception raised while running a step to a typed teamster error."""
    if isinstance(exc, TeamsterError):
        return exc
    if isinstance(exc, EventLoopException) and exc.original_exception is not None:
        return classify_exception(exc.original_exception)
    message = str(exc) or type(exc).__name__
    details: dict[str, Any] = {"exception": type(exc).__name__}
    wait = retry_after(exc)
    if wait is not None:
        details["retry_after"] = wait
    if isinstance(exc, ModelThrottledException):
        return ModelThrottled(f"model throttled: {message}", **details)
    if isinstance(exc, StructuredOutputException):
        return StructuredOutputError(f"no valid structured output: {message}", **details)
    if isinstance(exc, MaxTokensReachedException):
        return MaxTokensReached("the model hit its output-token limit before finishing", **details)
    if isinstance(exc, ContextWindowOverflowException):
        return ContextOverflow(f"input does not fit the model's context window: {message}", **details)
    if isinstance(exc, redis.RedisError):
        return StoreUnavailable(f"Redis error: {message}", **details)
    if isinstance(exc, UnicodeError) or "surrogates not allowed" in message:
        # the step's input is checked before it runs: text that cannot be encoded came from the model
        return InvalidOutput(f"the model's output cannot be encoded as UTF-8 (a lone surrogate?): {message}",
                             **details)

    code = _error_code(exc)
    key = code.lower()  # Bedrock's event stream reports camelCase codes ("throttlingException")
    status = _status_code(exc)
    details.update({"provider_code": code, "http_status": status})
    lowered = message.lower()
    if key in _CREDENTIAL_CODES:
        return MissingCredentials(f"provider refused the credentials ({code}): {message}",
                                  hint="Configure the provider's credentials; `teamster doctor` checks them.",
                                  **details)
    if key in _THROTTLE_CODES or status in (429, 529):  # 529: the provider is overloaded
        return ModelThrottled(f"model throttled ({code}): {message}", **details)
    if (key in _TIMEOUT_CODES or isinstance(exc, (TimeoutError, asyncio.TimeoutError,
                                                     concurrent.futures.TimeoutError))
            or "timeout" in type(exc).__name__.lower() or status in (408, 504)):
        return ModelTimeout(f"model call timed out ({code}): {message}", **details)
    if any(hint in lowered for hint in _CONTEXT_HINTS):
        return ContextOverflow(f"input does not fit the model's context window: {message}", **details)
    if (key in _UNAVAILABLE_CODES or (status is not None and status >= 500)
            or isinstance(exc, ConnectionError)
            or type(exc).__name__ in {"EndpointConnectionError", "ConnectionClosedError", "ConnectError",
                                      "RemoteProtocolError", "ReadError"}):
        return ProviderUnavailable(f"model provider unavailable ({code}): {message}", **details)
    if status is not None and 400 <= status < 500:
        return ProviderRejected(f"model provider rejected the request ({code}): {message}", **details)
    return UnexpectedError(f"{type(exc).__name__}: {message}", **details)


def classify_stop_reason(stop_reason: str) -> TeamsterError | None:
    """Typed error for a terminal stop reason that carries no exception (None when not an error)."""
    if stop_reason in ("guardrail_intervened", "content_filtered"):
        return GuardrailIntervened(f"the provider stopped the response ({stop_reason})", stop_reason=stop_reason)
    if stop_reason == "max_tokens":
        return MaxTokensReached("the model hit its output-token limit before finishing")
    return None
