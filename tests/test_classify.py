"""``classify_exception`` / ``classify_stop_reason``: provider, transport and strands errors -> typed errors.

The provider errors are real exception objects (botocore ``ClientError``/``EventStreamError`` built the way
botocore builds them, strands exceptions); only plain attribute-carrying exceptions stand in for SDKs that are
not installed (OpenAI/Anthropic-style ``status_code`` and ``body``).
"""

from __future__ import annotations

import json
import types
from typing import Any

import botocore.session
import pytest
import redis
from botocore import parsers
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    EventStreamError,
    NoCredentialsError,
    ReadTimeoutError,
)
from strands.types.exceptions import (
    ContextWindowOverflowException,
    EventLoopException,
    MaxTokensReachedException,
    ModelThrottledException,
    StructuredOutputException,
)

from teamster.agents.classify import UnexpectedError, classify_exception, classify_stop_reason
from teamster.errors import (
    BudgetExceeded,
    ConfigurationError,
    ContextOverflow,
    GuardrailIntervened,
    MaxTokensReached,
    MissingCredentials,
    ModelThrottled,
    ModelTimeout,
    ProviderRejected,
    ProviderUnavailable,
    RetryableError,
    StoreUnavailable,
    StructuredOutputError,
    TerminalError,
)


def client_error(code: str, message: str, status: int, operation: str = "ConverseStream") -> ClientError:
    """A botocore ClientError exactly as botocore raises it for an HTTP error response."""
    return ClientError({"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"RequestId": "req-1", "HTTPStatusCode": status, "HTTPHeaders": {},
                                             "RetryAttempts": 0}}, operation)


def stream_error(exception_type: str, message: str) -> EventStreamError:
    """A Bedrock ConverseStream mid-stream error, parsed by botocore's own event-stream parser and shape."""
    shape = botocore.session.get_session().get_service_model("bedrock-runtime").shape_for("ConverseStreamOutput")
    parsed = parsers.EventStreamJSONParser().parse(
        {"status_code": 400, "body": json.dumps({"message": message}).encode(),
         "headers": {":message-type": "exception", ":exception-type": exception_type,
                     ":content-type": "application/json"}},
        shape,
    )
    return EventStreamError(parsed, "ConverseStream")


def with_attrs(exc: BaseException, **attrs: Any) -> BaseException:
    for name, value in attrs.items():
        setattr(exc, name, value)
    return exc


# ----------------------------------------------------------------------------- botocore (Bedrock)


def test_bedrock_throttling_is_retryable() -> None:
    error = classify_exception(client_error("ThrottlingException", "Too many requests, please wait.", 429))
    assert isinstance(error, ModelThrottled)
    assert error.code == "model_throttled" and error.retryable is True
    assert error.details["provider_code"] == "ThrottlingException" and error.details["http_status"] == 429


def test_bedrock_service_unavailable_is_retryable() -> None:
    error = classify_exception(client_error("ServiceUnavailableException", "Service unavailable", 500))
    assert isinstance(error, ProviderUnavailable)
    assert error.code == "provider_unavailable" and error.retryable is True


def test_bedrock_internal_server_error_is_retryable() -> None:
    error = classify_exception(client_error("InternalServerException", "boom", 500))
    assert isinstance(error, ProviderUnavailable) and error.retryable


def test_bedrock_input_too_long_is_context_overflow() -> None:
    exc = client_error("ValidationException", "Input is too long for requested model.", 400)
    error = classify_exception(exc)
    assert isinstance(error, ContextOverflow)
    assert error.code == "context_overflow" and error.retryable is False


def test_bedrock_access_denied_is_missing_credentials() -> None:
    exc = client_error("AccessDeniedException", "You don't have access to the model with the specified model ID.", 403)
    error = classify_exception(exc)
    assert isinstance(error, MissingCredentials) and isinstance(error, ConfigurationError)
    assert error.code == "missing_credentials" and error.retryable is False
    assert error.hint


def test_bedrock_other_validation_error_is_provider_rejected() -> None:
    exc = client_error("ValidationException", "The provided model identifier is invalid.", 400)
    error = classify_exception(exc)
    assert isinstance(error, ProviderRejected)
    assert error.code == "provider_rejected" and error.retryable is False
    assert error.details["http_status"] == 400


def test_missing_aws_credentials_error() -> None:
    error = classify_exception(NoCredentialsError())
    assert isinstance(error, MissingCredentials) and not error.retryable


@pytest.mark.parametrize("exc", [ReadTimeoutError(endpoint_url="https://bedrock-runtime.us-east-1.amazonaws.com"),
                                 ConnectTimeoutError(endpoint_url="https://bedrock-runtime.us-east-1.amazonaws.com")],
                         ids=["read", "connect"])
def test_botocore_timeouts_are_retryable(exc: BaseException) -> None:
    error = classify_exception(exc)
    assert isinstance(error, ModelTimeout)
    assert error.code == "model_timeout" and error.retryable is True


def test_botocore_endpoint_connection_error_is_retryable() -> None:
    error = classify_exception(EndpointConnectionError(endpoint_url="https://bedrock-runtime.eu-west-1.amazonaws.com"))
    assert isinstance(error, ProviderUnavailable)
    assert error.code == "provider_unavailable" and error.retryable is True


@pytest.mark.parametrize(("exception_type", "expected"), [
    ("serviceUnavailableException", "provider_unavailable"),
    ("internalServerException", "provider_unavailable"),
    ("modelStreamErrorException", "provider_unavailable"),
    ("throttlingException", "model_throttled"),
])
def test_bedrock_mid_stream_errors_are_retryable(exception_type: str, expected: str) -> None:
    exc = stream_error(exception_type, "Bedrock is unable to process your request.")
    assert exc.response["Error"]["Code"] == exception_type  # what botocore really raises
    error = classify_exception(exc)
    assert error.code == expected and error.retryable is True


# ----------------------------------------------------------------------------- strands exceptions


def test_strands_throttle() -> None:
    error = classify_exception(ModelThrottledException("rate exceeded"))
    assert isinstance(error, ModelThrottled) and error.retryable and "rate exceeded" in error.message


def test_strands_structured_output_failure_is_terminal() -> None:
    error = classify_exception(StructuredOutputException("The model did not produce structured output"))
    assert isinstance(error, StructuredOutputError)
    assert error.code == "structured_output_error" and error.retryable is False


def test_strands_max_tokens_is_terminal() -> None:
    error = classify_exception(MaxTokensReachedException("max tokens"))
    assert isinstance(error, MaxTokensReached) and error.code == "max_tokens" and not error.retryable


def test_strands_context_window_overflow_is_terminal() -> None:
    error = classify_exception(ContextWindowOverflowException("too big"))
    assert isinstance(error, ContextOverflow) and not error.retryable


@pytest.mark.parametrize(("inner", "expected"), [
    (ModelThrottledException("slow down"), ModelThrottled),
    (client_error("ThrottlingException", "slow down", 429), ModelThrottled),
    (EventLoopException(TimeoutError("read timed out")), ModelTimeout),
])
def test_event_loop_exception_is_classified_by_its_cause(inner: Exception, expected: type) -> None:
    error = classify_exception(EventLoopException(inner, {"request": 1}))
    assert isinstance(error, expected) and error.retryable is True


# ----------------------------------------------------------------------------- generic / other SDKs


@pytest.mark.parametrize(("status", "expected", "retryable"), [
    (429, ModelThrottled, True),
    (503, ProviderUnavailable, True),
    (500, ProviderUnavailable, True),
    (408, ModelTimeout, True),
    (504, ModelTimeout, True),
    (400, ProviderRejected, False),
    (404, ProviderRejected, False),
])
def test_status_code_attribute(status: int, expected: type, retryable: bool) -> None:
    error = classify_exception(with_attrs(RuntimeError("provider said no"), status_code=status))
    assert isinstance(error, expected) and error.retryable is retryable
    assert error.details["http_status"] == status


def test_status_of_an_attached_http_response() -> None:
    exc = with_attrs(RuntimeError("bad gateway"), response=types.SimpleNamespace(status_code=503))
    assert isinstance(classify_exception(exc), ProviderUnavailable)


@pytest.mark.parametrize(("error_type", "expected"), [
    ("overloaded_error", ModelThrottled),
    ("rate_limit_error", ModelThrottled),
    ("api_error", ProviderUnavailable),
    ("authentication_error", MissingCredentials),
])
def test_anthropic_style_error_body(error_type: str, expected: type) -> None:
    exc = with_attrs(RuntimeError("Error code: ..."), body={"type": "error", "error": {"type": error_type}})
    assert isinstance(classify_exception(exc), expected)


def test_openai_style_exception_names() -> None:
    class RateLimitError(Exception):
        pass

    class APITimeoutError(Exception):
        pass

    class APIConnectionError(Exception):
        pass

    class AuthenticationError(Exception):
        pass

    class BadRequestError(Exception):
        pass

    assert isinstance(classify_exception(RateLimitError("429")), ModelThrottled)
    assert isinstance(classify_exception(APITimeoutError("t")), ModelTimeout)
    assert isinstance(classify_exception(APIConnectionError("c")), ProviderUnavailable)
    assert isinstance(classify_exception(AuthenticationError("bad key")), MissingCredentials)
    overflow = with_attrs(BadRequestError("This model's maximum context length is 128000 tokens"), status_code=400)
    assert isinstance(classify_exception(overflow), ContextOverflow)


@pytest.mark.parametrize("exc", [TimeoutError("timed out"), ConnectionResetError("reset"),
                                 ConnectionRefusedError("refused")], ids=["timeout", "reset", "refused"])
def test_builtin_transport_errors_are_retryable(exc: BaseException) -> None:
    error = classify_exception(exc)
    assert isinstance(error, RetryableError) and error.retryable


def test_redis_errors_are_store_unavailable() -> None:
    error = classify_exception(redis.ConnectionError("Connection refused"))
    assert isinstance(error, StoreUnavailable) and error.retryable


def test_unknown_exception_is_terminal_unexpected_error() -> None:
    error = classify_exception(ValueError("something odd"))
    assert isinstance(error, UnexpectedError) and isinstance(error, TerminalError)
    assert error.code == "unexpected_error" and error.retryable is False
    assert error.message == "ValueError: something odd"
    assert error.details["exception"] == "ValueError"


def test_teamster_errors_pass_through_unchanged() -> None:
    original = BudgetExceeded("over", budget="tokens")
    assert classify_exception(original) is original


def test_classifications_serialise_to_json() -> None:
    for exc in (client_error("ThrottlingException", "x", 429), ReadTimeoutError(endpoint_url="u"), ValueError("v")):
        json.dumps(classify_exception(exc).to_dict())


# ----------------------------------------------------------------------------- stop reasons


@pytest.mark.parametrize("stop_reason", ["guardrail_intervened", "content_filtered"])
def test_guardrail_stop_reasons(stop_reason: str) -> None:
    error = classify_stop_reason(stop_reason)
    assert isinstance(error, GuardrailIntervened)
    assert error.code == "guardrail_intervened" and error.retryable is False
    assert error.details["stop_reason"] == stop_reason


def test_max_tokens_stop_reason() -> None:
    assert isinstance(classify_stop_reason("max_tokens"), MaxTokensReached)


@pytest.mark.parametrize("stop_reason", ["end_turn", "tool_use", "stop_sequence", ""])
def test_normal_stop_reasons_are_not_errors(stop_reason: str) -> None:
    assert classify_stop_reason(stop_reason) is None
