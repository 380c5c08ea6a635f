"""Settings and sampling bounds: defined once, read from the environment, documented in the README."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from internlm_app.sampling import BOUNDS, SamplingParams
from internlm_app.settings import Settings, settings_table

README = Path(__file__).parents[1] / "README.md"


def test_readme_settings_table_is_current():
    assert settings_table() in README.read_text(), "run `python -m internlm_app settings` and paste it into README"


def test_environment_variables_are_read(monkeypatch):
    monkeypatch.setenv("INTERNLM_TEMPERATURE", "0.3")
    monkeypatch.setenv("INTERNLM_API_KEYS", '["k1", "k2"]')
    monkeypatch.setenv("INTERNLM_PORT", "7000")
    settings = Settings()
    assert settings.temperature == 0.3 and settings.port == 7000
    assert [k.get_secret_value() for k in settings.api_keys] == ["k1", "k2"]
    assert settings.default_sampling().temperature == 0.3


@pytest.mark.parametrize("name", list(BOUNDS))
def test_bounds_are_enforced_everywhere(name, monkeypatch):
    bound = BOUNDS[name]
    too_high = bound.high + 1
    with pytest.raises(ValidationError):
        SamplingParams(**{name: too_high})
    monkeypatch.setenv(f"INTERNLM_{name.upper()}", str(too_high))
    with pytest.raises(ValidationError):
        Settings()
    field = SamplingParams.model_fields[name]
    assert field.description == bound.description and field.default == bound.default


def test_sampling_params_reject_unknown_fields():
    with pytest.raises(ValidationError):
        SamplingParams(temprature=0.5)
    assert SamplingParams(temperature=0).greedy


@pytest.mark.parametrize("keys", ['[""]', '["  "]', '["good", ""]'])
def test_blank_api_keys_are_refused(monkeypatch, keys):
    monkeypatch.setenv("INTERNLM_API_KEYS", keys)
    with pytest.raises(ValidationError, match="must not be empty"):
        Settings()


def _list_settings() -> list[str]:
    fields = Settings.model_fields.items()
    return [name for name, field in fields if getattr(field.annotation, "__origin__", None) is list]


def test_the_list_settings_are_found():
    assert {"api_keys", "cors_origins"} <= set(_list_settings())


@pytest.mark.parametrize("name", _list_settings())
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("sk-123", ["sk-123"]),  # one plain value, as vLLM's VLLM_API_KEY takes it
        ("sk-1,sk-2", ["sk-1", "sk-2"]),
        (" sk-1 , sk-2 ", ["sk-1", "sk-2"]),
        ('["sk-1", "sk-2"]', ["sk-1", "sk-2"]),
        ('["sk-a,b"]', ["sk-a,b"]),  # JSON keeps a comma inside a value
        ("", []),
    ],
)
def test_every_list_setting_takes_one_value_a_comma_list_or_json(monkeypatch, name, raw, expected):
    if name == "cors_origins":  # the same forms, with origins
        raw, expected = raw.replace("sk-", "https://o"), [v.replace("sk-", "https://o") for v in expected]
    monkeypatch.setenv(f"INTERNLM_{name.upper()}", raw)
    values = getattr(Settings(), name)
    assert [v.get_secret_value() if hasattr(v, "get_secret_value") else v for v in values] == expected


@pytest.mark.parametrize("name", _list_settings())
@pytest.mark.parametrize(
    ("raw", "reason"),
    [("sk-1,", "empty"), ("[sk-1", "not a JSON list"), ('["sk-1", 2]', "strings only"), (" , ", "empty")],
)
def test_a_bad_list_setting_is_a_clear_error_that_never_echoes_the_value(monkeypatch, name, raw, reason):
    from internlm_app.settings import describe_settings_error

    if name == "cors_origins":
        raw = raw.replace("sk-1", "https://sk-1")
    monkeypatch.setenv(f"INTERNLM_{name.upper()}", raw)
    with pytest.raises(ValidationError) as error:
        Settings()
    text = describe_settings_error(error.value)
    assert text.startswith(f"INTERNLM_{name.upper()} / --{name.replace('_', '-')}: ") and reason in text
    assert "sk-1" not in text and "sk-1" not in str(error.value)


def test_an_empty_value_means_the_default_never_the_current_folder_or_an_empty_password(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.py").write_text("def add(a: int, b: int) -> int:\n    return a + b\n")
    for name in ("TOOLS_DIR", "WEB_PASSWORD", "MODEL_PATH", "CONVERTED_DIR", "DB_PATH", "CACHE_DIR", "OPENAI_API_KEY"):
        monkeypatch.setenv(f"INTERNLM_{name}", " " if name == "MODEL_PATH" else "")
    settings = Settings()
    assert settings.tools_dir is None and settings.web_password is None
    assert settings.model_path is None and settings.converted_dir is None
    assert settings.db_path == Path("~/.cache/internlm_app/conversations.db").expanduser()
    assert settings.cache_dir == Path("~/.cache/internlm_app/models").expanduser()
    assert settings.openai_api_key.get_secret_value() == "EMPTY"
    assert Settings(system_prompt="").system_prompt == ""  # where empty has a meaning, it keeps it


@pytest.mark.parametrize(
    "url",
    ["ftp://host/v1", "not a url", "http://127.0.0.1:99999/v1", "http:///v1", "", "http://h/v1?x=1", "http://h :80/v1"],
)
def test_the_remote_base_url_must_be_an_http_url_with_a_host_and_port(url):
    with pytest.raises(ValidationError, match="openai_base_url"):
        Settings(openai_base_url=url)
    assert Settings(openai_base_url="https://h.example:8000/v1/").openai_base_url == "https://h.example:8000/v1"


@pytest.mark.parametrize(
    "values, message",
    [
        ({"cors_origins": "https://good.example/"}, "can never match"),
        ({"cors_origins": "good.example"}, "can never match"),
        ({"cors_origins": "https://*.good.example"}, "can never match"),
        ({"cors_origins": "https://good.example:443"}, "can never match"),
        ({"cors_origins": "HTTPS://Good.example"}, "can never match"),
        ({"cors_origins": "https://good.example?x"}, "can never match"),
        ({"cors_origins": "https://user@good.example"}, "can never match"),
        ({"cors_origins": "https://good.example:99999"}, "can never match"),
        ({"api_keys": "clé-secret"}, "printable ASCII"),
        ({"api_keys": "sk-a b"}, "spaces"),
    ],
)
def test_keys_and_origins_that_could_never_match_are_refused(values, message):
    with pytest.raises(ValidationError, match=message):
        Settings(**values)
    origins = "*,https://good.example:8443,http://[::1]:6006,http://127.0.0.1"
    assert Settings(cors_origins=origins, api_keys="sk-1,sk-2").cors_origins == origins.split(",")
