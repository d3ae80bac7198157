"""Validation errors read as one line per problem: the field, what was wrong, what is expected."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from runtime.config import ServeConfig, load_config
from runtime.errors import BundleError, ConfigError, describe_validation
from runtime.models.bundle import Manifest, Preprocess, read_manifest


def error_of(model, data: dict) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(data)
    return caught.value


def test_range_and_choice_errors_say_what_was_given_and_what_is_expected():
    text = describe_validation(error_of(ServeConfig, {"server": {"deadline_ms": -5},
                                                      "precision": "fp64"}))
    assert "server.deadline_ms: got -5, expected greater than 0" in text
    assert "precision: got 'fp64', expected 'auto', 'fp32', 'fp16' or 'int8'" in text
    assert "\n" not in text and "pydantic.dev" not in text


def test_an_unknown_key_lists_the_keys_allowed_where_it_was_found():
    text = describe_validation(error_of(ServeConfig, {"server": {"deadlin_ms": 5}}),
                               model=ServeConfig)
    assert text.startswith("server.deadlin_ms: unknown key, expected one of endpoints, ")
    assert "deadline_ms" in text


def test_field_names_can_be_given_as_the_flags_the_user_typed():
    text = describe_validation(error_of(Preprocess, {"color": "rgb", "mean": [0.5, 0.5]}),
                               {"mean": "--mean"})
    assert text == "--mean: got 2 values 0.5,0.5, expected 3, one per channel of color rgb"


def test_several_errors_are_joined_on_one_line():
    text = describe_validation(error_of(Preprocess, {"std": [1, 0, 1], "pad_value": 300}))
    clauses = text.split("; ")
    assert any(c.startswith("std: got 1,0,1, expected non-zero values") for c in clauses)
    assert "pad_value: got 300, expected less than or equal to 255" in clauses


def test_a_missing_field_says_so():
    text = describe_validation(error_of(Manifest, {"name": "m", "version": "1", "task": "raw",
                                                   "preprocess": {}, "onnx": {"sha256": "0" * 64},
                                                   }))
    assert text == "input: missing, expected a value"


def test_a_bad_manifest_file_is_one_line_naming_the_file_and_the_field(tmp_path):
    (tmp_path / "manifest.json").write_text('{"name": "has space", "version": "1"}')
    with pytest.raises(BundleError) as caught:
        read_manifest(tmp_path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{tmp_path}/manifest.json: invalid manifest")
    assert "name: got 'has space', expected a value matching pattern" in message
    assert "task: missing" in message


def test_config_overrides_from_flags_are_reported_in_one_line():
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"server.deadline_ms": 0})
    assert str(caught.value) == ("invalid configuration in the command-line options: "
                                 "server.deadline_ms: got 0, expected greater than 0")
