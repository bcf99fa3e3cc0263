"""Model providers: parsing, up-front checks (extras, credentials), building models, failures as outcomes."""

from __future__ import annotations

import importlib.util
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from teamster.agents.outcomes import Failed, Succeeded
from teamster.agents.providers import PROVIDERS, ProviderRef, build_model, check_provider, parse_provider
from teamster.agents.runner import run_agent
from teamster.agents.scripted import ScriptedModel, finish, register_script, scripted_settings
from teamster.agents.spec import AgentSpec
from teamster.config.settings import TeamsterSettings, load_settings
from teamster.errors import ConfigurationError, MissingCredentials, MissingExtra

AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE",
           "AWS_DEFAULT_PROFILE", "AWS_BEARER_TOKEN_BEDROCK", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN",
           "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
           "AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_CREDENTIAL_EXPIRATION")


class Question(BaseModel):
    text: str


class Reply(BaseModel):
    text: str


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.fixture()
def settings() -> TeamsterSettings:
    return load_settings(model="scripted", model_base_url=None,
                         aws_region="us-east-1")


@pytest.fixture()
def no_aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for var in AWS_ENV:
        monkeypatch.delenv(var, raising=False)
    credentials = tmp_path / "credentials"
    config = tmp_path / "config"
    credentials.write_text("")
    config.write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


@pytest.fixture()
def fake_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Make an optional SDK *findable* (an empty package on sys.path) to reach the credential checks offline."""

    def make(module: str) -> None:
        if installed(module):
            return
        package = tmp_path / "fake_extras" / module
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("# stand-in: only importlib.util.find_spec looks at it\n")
        monkeypatch.syspath_prepend(str(tmp_path / "fake_extras"))
        importlib.invalidate_caches()
        assert installed(module)

    return make


# ----------------------------------------------------------------------------- parse_provider


@pytest.mark.parametrize(("value", "expected"), [
    ("bedrock:global.anthropic.claude-sonnet-4-6", ProviderRef("bedrock", "global.anthropic.claude-sonnet-4-6")),
    ("bedrock", ProviderRef("bedrock", "")),
    ("scripted", ProviderRef("scripted", "")),
    (" OpenAI:gpt-4o ", ProviderRef("openai", "gpt-4o")),
    ("ollama:llama3.2:3b", ProviderRef("ollama", "llama3.2:3b")),
])
def test_parse_provider(value: str, expected: ProviderRef) -> None:
    assert parse_provider(value) == expected
    assert str(expected) == (expected.kind if not expected.model_id else f"{expected.kind}:{expected.model_id}")


@pytest.mark.parametrize("value", ["gemini:pro", "gpt-4o", "", "mystery"])
def test_parse_provider_unknown_kind(value: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_provider(value)
    assert "unknown model provider" in info.value.message
    assert all(kind in info.value.hint for kind in PROVIDERS)


@pytest.mark.parametrize("value", ["openai", "anthropic:", "ollama"])
def test_parse_provider_missing_model_id(value: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_provider(value)
    assert "needs a model id" in info.value.message


# ----------------------------------------------------------------------------- extras


@pytest.mark.parametrize(("value", "module"), [("openai:gpt-4o", "openai"), ("anthropic:claude-x", "anthropic"),
                                               ("ollama:llama3", "ollama")])
def test_missing_extra(settings: TeamsterSettings, value: str, module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # not installed, as far as find_spec and import can tell
    with pytest.raises(MissingExtra) as info:
        check_provider(value, settings)
    assert info.value.code == "missing_extra" and module in info.value.message
    assert info.value.hint == f"pip install 'teamster[{value.split(':')[0]}]'"


def test_scripted_needs_nothing(settings: TeamsterSettings) -> None:
    assert check_provider("scripted", settings) == ProviderRef("scripted", "")


# ----------------------------------------------------------------------------- credentials


def test_openai_without_key_or_base_url_is_missing_credentials(
        settings: TeamsterSettings, monkeypatch: pytest.MonkeyPatch, fake_extra) -> None:  # type: ignore[no-untyped-def]
    fake_extra("openai")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(MissingCredentials) as info:
        check_provider("openai:gpt-4o", settings)
    assert "OPENAI_API_KEY" in info.value.message and "TEAMSTER_MODEL_BASE_URL" in info.value.hint
    # a local OpenAI-compatible server needs no key ...
    local = load_settings(model="scripted", model_base_url="http://localhost:8000/v1")
    assert check_provider("openai:local-model", local) == ProviderRef("openai", "local-model")
    # ... and a key is enough
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    assert check_provider("openai:gpt-4o", settings).kind == "openai"


def test_anthropic_without_key_is_missing_credentials(
        settings: TeamsterSettings, monkeypatch: pytest.MonkeyPatch, fake_extra) -> None:  # type: ignore[no-untyped-def]
    fake_extra("anthropic")
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(MissingCredentials) as info:
        check_provider("anthropic:claude-sonnet-4-6", settings)
    assert "ANTHROPIC_API_KEY" in info.value.message
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    assert check_provider("anthropic:claude-sonnet-4-6", settings).model_id == "claude-sonnet-4-6"


def test_ollama_needs_no_credentials(settings: TeamsterSettings, fake_extra) -> None:  # type: ignore[no-untyped-def]
    fake_extra("ollama")
    assert check_provider("ollama:llama3", settings) == ProviderRef("ollama", "llama3")


def test_bedrock_without_aws_credentials(settings: TeamsterSettings,
                                         no_aws_credentials: pytest.MonkeyPatch) -> None:
    with pytest.raises(MissingCredentials) as info:
        check_provider("bedrock:global.anthropic.claude-sonnet-4-6", settings)
    assert info.value.code == "missing_credentials"
    assert "TEAMSTER_MODEL=scripted" in info.value.hint
    # build_model runs the same check: no half-configured model object
    with pytest.raises(MissingCredentials):
        build_model("bedrock", settings, agent="any")


def test_bedrock_with_a_bearer_token_or_keys(settings: TeamsterSettings,
                                             no_aws_credentials: pytest.MonkeyPatch) -> None:
    no_aws_credentials.setenv("AWS_BEARER_TOKEN_BEDROCK", "token")
    assert check_provider("bedrock", settings) == ProviderRef("bedrock", "")
    no_aws_credentials.delenv("AWS_BEARER_TOKEN_BEDROCK")
    no_aws_credentials.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    no_aws_credentials.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert check_provider("bedrock:my-model", settings) == ProviderRef("bedrock", "my-model")


def test_bedrock_model_is_built_with_sdk_retries_off(settings: TeamsterSettings,
                                                     no_aws_credentials: pytest.MonkeyPatch) -> None:
    from strands.models.bedrock import BedrockModel

    no_aws_credentials.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    no_aws_credentials.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    model = build_model("bedrock:my-model", settings, agent="any")
    assert isinstance(model, BedrockModel)
    assert model.get_config()["model_id"] == "my-model"
    assert model.get_config()["max_tokens"] == settings.model_max_tokens
    client_config = model.client.meta.config
    assert client_config.retries == {"total_max_attempts": 1, "mode": "standard"}
    assert client_config.read_timeout == settings.step_timeout_seconds
    assert model.client.meta.region_name == "us-east-1"
    assert build_model("bedrock", settings, agent="any").get_config()["model_id"]  # strands' default model


# ----------------------------------------------------------------------------- scripted


def test_build_scripted_model_uses_the_registered_script(settings: TeamsterSettings) -> None:
    name = f"prov_{uuid.uuid4().hex[:8]}"
    script = [finish({"text": "scripted reply"})]
    register_script(name, script)
    model = build_model("scripted", settings, agent=name)
    assert isinstance(model, ScriptedModel)
    assert model.script is script and model.agent == name
    assert model.faults.rates == {}
    other = build_model("scripted", settings, agent=name)
    assert other is not model, "a fresh model per step"


@pytest.fixture(autouse=True)
def _fresh_scripted_settings() -> Iterator[None]:
    yield
    scripted_settings.cache_clear()  # a test's TEAMSTER_SCRIPTED_* variables must not outlive it


def test_build_scripted_model_takes_faults_latency_and_seed_from_the_scripted_settings(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEAMSTER_SCRIPTED_FAULTS", "throttle=0.25,refusal=0.1")
    monkeypatch.setenv("TEAMSTER_SCRIPTED_SEED", "9")
    monkeypatch.setenv("TEAMSTER_SCRIPTED_LATENCY", "0.5")
    scripted_settings.cache_clear()  # read once per process: read again
    model = build_model("scripted", load_settings(model="scripted"), agent=f"none_{uuid.uuid4().hex[:6]}")
    assert isinstance(model, ScriptedModel)
    assert model.script is None
    assert model.faults.rates == {"throttle": 0.25, "refusal": 0.1} and model.faults.seed == 9
    assert model.latency == 0.5


def test_run_agent_uses_the_configured_scripted_provider(settings: TeamsterSettings,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"prov_run_{uuid.uuid4().hex[:8]}"
    register_script(name, [finish({"text": "from the registered script"})])
    spec = AgentSpec(name=name, input_model=Question, output_model=Reply, instructions="Reply.")
    result = run_agent(spec, {"text": "hi"}, settings=settings)
    assert isinstance(result.outcome, Succeeded)
    assert result.output == Reply(text="from the registered script")
    monkeypatch.setenv("TEAMSTER_SCRIPTED_FAULTS", "throttle=1")
    scripted_settings.cache_clear()
    throttled = run_agent(spec, {"text": "hi"}, settings=load_settings(model="scripted"))
    assert isinstance(throttled.outcome, Failed) and throttled.outcome.error_type == "model_throttled"


# ----------------------------------------------------------------------------- failures become outcomes


def test_run_agent_with_a_missing_extra_returns_failed(settings: TeamsterSettings,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openai", None)  # not installed, as far as find_spec and import can tell
    spec = AgentSpec(name=f"prov_{uuid.uuid4().hex[:8]}", input_model=Question, output_model=Reply, instructions="x")
    events: list[str] = []
    result = run_agent(spec, {"text": "hi"}, model="openai:x", settings=settings,
                       on_event=lambda kind, _payload: events.append(kind))
    assert isinstance(result.outcome, Failed)
    assert result.outcome.error_type == "missing_extra" and result.outcome.retryable is False
    assert result.model_calls == 0
    assert events == ["outcome"]
    # the same through the spec's own model override
    via_spec = run_agent(spec.with_model("openai:x"), {"text": "hi"}, settings=settings)
    assert isinstance(via_spec.outcome, Failed) and via_spec.outcome.error_type == "missing_extra"


def test_run_agent_with_missing_bedrock_credentials_returns_failed(
        settings: TeamsterSettings, no_aws_credentials: pytest.MonkeyPatch) -> None:
    spec = AgentSpec(name=f"prov_{uuid.uuid4().hex[:8]}", input_model=Question, output_model=Reply, instructions="x")
    result = run_agent(spec, {"text": "hi"}, model="bedrock:some-model", settings=settings)
    assert isinstance(result.outcome, Failed)
    assert result.outcome.error_type == "missing_credentials" and result.outcome.retryable is False


def test_run_agent_with_an_unknown_provider_returns_failed(settings: TeamsterSettings) -> None:
    spec = AgentSpec(name=f"prov_{uuid.uuid4().hex[:8]}", input_model=Question, output_model=Reply, instructions="x")
    result = run_agent(spec, {"text": "hi"}, model="gemini:pro", settings=settings)
    assert isinstance(result.outcome, Failed) and result.outcome.error_type == "configuration_error"
