"""Model providers by name: ``bedrock:<model-id>`` (default), ``openai:<model>``, ``anthropic:<model>``,
``ollama:<model>`` and ``scripted``.

Each provider needs only its own optional extra (``pip install 'teamster[openai]'``...). :func:`check_provider`
verifies the extra and the credentials up front -- workers call it at start-up and ``teamster doctor`` shows
it -- so a missing key is one clear error, not a stack trace in the middle of a run. Provider SDK retries are
turned off: teamster's step retry policy is the one layer that retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import inspect
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from strands.models.model import Model

from teamster.agents.scripted import FaultPlan, ScriptedModel, get_script, scripted_settings
from teamster.config.settings import TeamsterSettings
from teamster.errors import ConfigurationError, MissingCredentials, MissingExtra, ModelRequestBlocked

__all__ = [
    "ProviderRef",
    "parse_provider",
    "build_model",
    "check_provider",
    "override_model",
    "block_real_models",
    "PROVIDERS",
    "aclose_shared_clients",
    "aiohttp_available",
    "provider_http_client",
    "shared_openai_client",
]

log = logging.getLogger(__name__)

PROVIDERS = ("bedrock", "openai", "anthropic", "ollama", "scripted")
_EXTRAS = {"openai": "openai", "anthropic": "anthropic", "ollama": "ollama"}
_HTTP_KINDS = ("openai", "anthropic", "ollama")
"""Providers whose SDKs speak httpx: on a worker's agent loop their shared pools run on aiohttp (see
:func:`provider_http_client`)."""


@dataclass(frozen=True)
class ProviderRef:
    """A parsed provider string such as ``bedrock:global.anthropic.claude-sonnet-4-6``."""

    kind: str
    model_id: str

    def __str__(self) -> str:
        return self.kind if not self.model_id else f"{self.kind}:{self.model_id}"


def parse_provider(value: str) -> ProviderRef:
    """Parse ``kind:model-id``.

    Raises:
        ConfigurationError: unknown kind or missing model id.
    """
    kind, _, model_id = value.strip().partition(":")
    kind = kind.lower()
    if kind not in PROVIDERS:
        raise ConfigurationError(f"unknown model provider {kind!r} in {value!r}",
                                 hint=f"Use one of: {', '.join(PROVIDERS)} (e.g. TEAMSTER_MODEL=bedrock:<model-id>).")
    if kind not in ("scripted", "bedrock") and not model_id:
        raise ConfigurationError(f"model provider {kind!r} needs a model id: '{kind}:<model>'")
    return ProviderRef(kind, model_id)


def check_provider(value: str, settings: TeamsterSettings) -> ProviderRef:
    """Check that the provider's extra is installed and its credentials are configured.

    Raises:
        MissingExtra: the provider's optional dependency is not installed.
        MissingCredentials: no credentials found (with what to set).
    """
    ref = parse_provider(value)
    module = _EXTRAS.get(ref.kind)
    if module and importlib.util.find_spec(module) is None:
        raise MissingExtra(f"provider {ref.kind!r} needs the '{module}' package",
                           hint=f"pip install 'teamster[{ref.kind}]'")
    if ref.kind == "bedrock":
        import boto3  # noqa: PLC0415

        session = boto3.Session(region_name=settings.aws_region) if settings.aws_region else boto3.Session()
        if session.get_credentials() is None and not os.environ.get("AWS_BEARER_TOKEN_BEDROCK"):
            raise MissingCredentials(
                "no AWS credentials found for Bedrock",
                hint="Set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_BEARER_TOKEN_BEDROCK), "
                     "or run offline with TEAMSTER_MODEL=scripted.",
            )
    if ref.kind in _HTTP_KINDS and settings.model_http_client == "aiohttp" and not aiohttp_available():
        raise MissingExtra("TEAMSTER_MODEL_HTTP_CLIENT=aiohttp needs the 'aiohttp' and 'httpx-aiohttp' packages",
                           hint=f"pip install 'teamster[{ref.kind}]', or set TEAMSTER_MODEL_HTTP_CLIENT=auto.")
    if ref.kind == "openai" and not os.environ.get("OPENAI_API_KEY") and not settings.model_base_url:
        raise MissingCredentials("OPENAI_API_KEY is not set",
                                 hint="Export OPENAI_API_KEY, or set TEAMSTER_MODEL_BASE_URL for a local "
                                      "OpenAI-compatible server.")
    elif ref.kind == "anthropic" and not os.environ.get("ANTHROPIC_API_KEY"):
        raise MissingCredentials("ANTHROPIC_API_KEY is not set", hint="Export ANTHROPIC_API_KEY.")
    return ref


# --------------------------------------------------------------------------- test hooks (teamster.testing)

ModelFactory = Callable[[], Model]
_OVERRIDES: dict[str, ModelFactory] = {}
_BLOCKED: list[str] = []  # non-empty: real providers refuse to build (the reason)
_HOOK_LOCK = threading.Lock()


@contextlib.contextmanager
def override_model(agent: str, factory: ModelFactory) -> Iterator[None]:
    """Make steps of ``agent`` (``"*"``: every agent) in this process use ``factory()`` as their model."""
    with _HOOK_LOCK:
        previous = _OVERRIDES.get(agent)
        _OVERRIDES[agent] = factory
    try:
        yield
    finally:
        with _HOOK_LOCK:
            if previous is None:
                _OVERRIDES.pop(agent, None)
            else:
                _OVERRIDES[agent] = previous


@contextlib.contextmanager
def block_real_models(reason: str = "real model requests are blocked in this test") -> Iterator[None]:
    """While active, building any provider but ``scripted`` (or an override) raises :class:`ModelRequestBlocked`."""
    with _HOOK_LOCK:
        _BLOCKED.append(reason)
    try:
        yield
    finally:
        with _HOOK_LOCK:
            _BLOCKED.remove(reason)


# --------------------------------------------------------------------------- shared clients

_SHARED: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[Any, ...], Any]] = \
    weakref.WeakKeyDictionary()
_PROCESS_SHARED: dict[tuple[Any, ...], Any] = {}


def _shared(key: tuple[Any, ...], factory: Callable[[], Any], *, per_loop: bool = True) -> Any:
    """One object per ``key`` -- per event loop for async clients (their pools are bound to a loop), per process
    for thread-safe synchronous ones. Outside a running loop an async client is built unshared."""
    if not per_loop:
        with _HOOK_LOCK:
            if key not in _PROCESS_SHARED:
                _PROCESS_SHARED[key] = factory()
            return _PROCESS_SHARED[key]
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return factory()
    with _HOOK_LOCK:
        cache = _SHARED.setdefault(loop, {})
        if key not in cache:
            cache[key] = factory()
        return cache[key]


@functools.cache
def aiohttp_available() -> bool:
    """Whether the aiohttp transport for httpx clients (``aiohttp`` and ``httpx-aiohttp``) is installed (looked up
    once per process: every step on a worker asks)."""
    return all(importlib.util.find_spec(name) is not None for name in ("aiohttp", "httpx_aiohttp"))


def provider_http_client(size: int, *, aiohttp: bool) -> Any:
    """The HTTP client under a shared provider SDK client (``AsyncOpenAI``, ``AsyncAnthropic``): ``size`` pooled
    connections, on aiohttp or on httpx (see :func:`_use_aiohttp` for why aiohttp). The provider benchmark's floor
    uses it too."""
    import httpx  # noqa: PLC0415 - the provider extras

    limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
    if aiohttp:
        from httpx_aiohttp import HttpxAiohttpClient  # noqa: PLC0415

        return HttpxAiohttpClient(limits=limits, follow_redirects=True)
    return httpx.AsyncClient(limits=limits, follow_redirects=True)


def _http_transport(size: int, *, aiohttp: bool) -> Any:
    """A connection pool of ``size`` for clients that are built per request but take a ``transport`` (Ollama's)."""
    import httpx  # noqa: PLC0415 - the ollama extra

    limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
    if aiohttp:
        from httpx_aiohttp.transport import AiohttpTransport  # noqa: PLC0415

        return AiohttpTransport(limits=limits)
    return httpx.AsyncHTTPTransport(limits=limits)


def _use_aiohttp(settings: TeamsterSettings) -> bool:
    """Whether the shared HTTP pools on the running loop run on aiohttp (``TEAMSTER_MODEL_HTTP_CLIENT``, default
    ``auto``: when installed, and only on a worker's agent loop).

    With the openai SDK's default httpx client a streamed completion never goes back to the pool -- the SDK closes the
    response at ``data: [DONE]``, before the body's last bytes are read, so httpcore drops the connection and every
    model call opens a new one (a new TLS handshake against a real provider); and httpcore checks every idle pooled
    connection with a system call on each request, so keeping them alive costs more as the pool grows. aiohttp reads
    the body as it arrives and keeps the connection. On any other loop (an application's own) the pools are httpx's:
    teamster cannot close an aiohttp session on a loop it does not own.
    """
    from teamster.agents.loop import AgentLoop  # noqa: PLC0415 - the loop imports nothing of teamster at load

    return settings.model_http_client != "httpx" and AgentLoop.owns_running_loop() and aiohttp_available()


def shared_openai_client(settings: TeamsterSettings) -> Any:
    """The ``AsyncOpenAI`` client shared by the steps on the running loop, its pool sized to the worker's concurrency
    (the provider benchmark's Celery floor calls it directly, without strands)."""
    import httpx  # noqa: PLC0415 - the openai extra
    import openai  # noqa: PLC0415

    api_key = os.environ.get("OPENAI_API_KEY", "unused")
    size = settings.model_pool_size
    use_aiohttp = _use_aiohttp(settings)

    def make() -> Any:
        return openai.AsyncOpenAI(
            api_key=api_key, base_url=settings.model_base_url or None,
            max_retries=0,  # the step retry policy is the single retry layer
            timeout=httpx.Timeout(settings.step_timeout_seconds, connect=10.0),
            http_client=provider_http_client(size, aiohttp=use_aiohttp))

    return _shared(("openai", settings.model_base_url, api_key, size, use_aiohttp), make)


async def aclose_shared_clients() -> None:
    """Close the provider clients shared on the running loop, and their connection pools (the next step that needs
    one builds it again). :class:`~teamster.agents.loop.AgentLoop` calls this at exit."""
    loop = asyncio.get_running_loop()
    with _HOOK_LOCK:
        cache = _SHARED.pop(loop, {})
    for shared in cache.values():
        client = getattr(shared, "client", shared)  # a shared strands model keeps its SDK client as ``client``
        close = getattr(client, "aclose", None) or getattr(client, "close", None)  # a transport has aclose
        if close is None:
            continue
        try:
            result = close()
            if inspect.isawaitable(result):
                await result
        except Exception as exc:  # noqa: BLE001 - closing at exit: say so, close the others
            log.debug("could not close a shared provider client %r: %s", client, exc)


def build_model(value: str, settings: TeamsterSettings, *, agent: str, timeout: float | None = None) -> Model:
    """A model instance for one step of ``agent``.

    Provider clients and their connection pools (sized to the worker's concurrency) are built once per process --
    per event loop for async ones -- and shared by every step: strands would otherwise build a new HTTP client, with
    a new TLS context, for every request. An OpenAI-compatible or Ollama request carries the step's budget
    (``timeout``) as its own timeout; the shared Anthropic and Bedrock clients time out after
    ``TEAMSTER_STEP_TIMEOUT_SECONDS``.
    Either way teamster's deadline cancels the call when the step's budget is spent.

    Raises:
        ConfigurationError: see :func:`check_provider`.
        ModelRequestBlocked: a real provider while :func:`block_real_models` is active.
    """
    factory = _OVERRIDES.get(agent) or _OVERRIDES.get("*")
    if factory is not None:
        return factory()
    if _BLOCKED and parse_provider(value).kind != "scripted":
        raise ModelRequestBlocked(f"agent {agent!r} asked for model {value!r}: {_BLOCKED[-1]}")
    ref = check_provider(value, settings)
    step_timeout = timeout or settings.step_timeout_seconds
    if ref.kind == "scripted":
        scripted = scripted_settings()
        return ScriptedModel(get_script(agent), agent=agent, latency=scripted.latency,
                             faults=FaultPlan.parse(scripted.faults, scripted.seed))
    if ref.kind == "bedrock":
        shared: Model = _shared(("bedrock", ref.model_id, settings.aws_region, settings.model_max_tokens,
                                 settings.model_pool_size), lambda: _bedrock(ref, settings), per_loop=False)
        return shared
    if ref.kind == "openai":
        from strands.models.openai import OpenAIModel  # noqa: PLC0415

        client = shared_openai_client(settings)
        # the model keeps no per-call state, only its config: shared per loop, client and config alike (building one
        # validates its config keys through typing.get_type_hints, about 3% of a worker's CPU per step)
        model: Model = _shared(("openai-model", client, ref.model_id, settings.model_max_tokens, step_timeout),
                               lambda: OpenAIModel(client=client, model_id=ref.model_id,
                                                   params={"max_tokens": settings.model_max_tokens,
                                                           "timeout": step_timeout}))
        return model
    if ref.kind == "anthropic":
        return _anthropic_model(ref, settings)
    import httpx  # noqa: PLC0415 - the ollama extra
    from strands.models.ollama import OllamaModel  # noqa: PLC0415

    # strands' OllamaModel opens an ollama.AsyncClient (an httpx client) per request: each is given the loop's shared
    # transport, so the connections, their pool and its size are the process's, not the request's
    size, use_aiohttp = settings.model_pool_size, _use_aiohttp(settings)
    transport = _shared(("ollama-transport", size, use_aiohttp), lambda: _http_transport(size, aiohttp=use_aiohttp))
    return OllamaModel(settings.model_base_url or "http://localhost:11434", model_id=ref.model_id,
                       max_tokens=settings.model_max_tokens,
                       ollama_client_args={"transport": transport,
                                           "timeout": httpx.Timeout(step_timeout, connect=10.0)})


def _anthropic_model(ref: ProviderRef, settings: TeamsterSettings) -> Model:
    """strands' AnthropicModel builds its ``AsyncAnthropic`` client in ``__init__``: the model is shared per loop (it
    keeps no per-call state), so the client and its pool (sized to the worker's concurrency) are built once."""
    from strands.models.anthropic import AnthropicModel  # noqa: PLC0415

    size, use_aiohttp = settings.model_pool_size, _use_aiohttp(settings)

    def make() -> Model:
        client_args: dict[str, Any] = {"max_retries": 0, "timeout": settings.step_timeout_seconds,
                                       "http_client": provider_http_client(size, aiohttp=use_aiohttp)}
        if settings.model_base_url:  # an Anthropic-compatible gateway (else ANTHROPIC_BASE_URL or Anthropic's API)
            client_args["base_url"] = settings.model_base_url
        return AnthropicModel(client_args=client_args, model_id=ref.model_id, max_tokens=settings.model_max_tokens)

    shared: Model = _shared(("anthropic", ref.model_id, settings.model_max_tokens, settings.model_base_url, size,
                             use_aiohttp), make)
    return shared


def _bedrock(ref: ProviderRef, settings: TeamsterSettings) -> Model:
    from botocore.config import Config  # noqa: PLC0415
    from strands.models.bedrock import BedrockModel  # noqa: PLC0415

    kwargs: dict[str, Any] = {"model_id": ref.model_id} if ref.model_id else {}
    return BedrockModel(
        region_name=settings.aws_region,
        # botocore's own retries off: the step retry policy is the single retry layer. The boto3 client is
        # thread-safe and shared by every step of the process, its pool sized to the worker's concurrency.
        boto_client_config=Config(retries={"total_max_attempts": 1, "mode": "standard"},
                                  read_timeout=settings.step_timeout_seconds, connect_timeout=10,
                                  max_pool_connections=settings.model_pool_size, user_agent_extra="teamster"),
        max_tokens=settings.model_max_tokens,
        **kwargs,
    )
