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
