"""Validation of the OpenAI parameters the gateway does not act on itself.

Types, ranges and enums as OpenAI's API description defines them (``tools``, ``tool_choice``,
``response_format``, ``logprobs``/``top_logprobs``, the penalties, ``logit_bias``,
``reasoning_effort``, ``modalities``, ``metadata``, ``parallel_tool_calls``), so a bad value is a
400 naming the field here instead of an upstream's differently worded refusal. Fields not listed
are model-server extensions and pass through unchecked; ``null`` means "not given".

Plain ``isinstance`` tests on the decoded body: this runs on every request of the hot path.
"""

from __future__ import annotations

import re
from typing import Any

from citadel.errors import BadRequest
from citadel.openai.invalid import (
    above_max,
    below_min,
    empty_string,
    invalid_value,
    missing,
    wrong_type,
)

__all__ = ["REASONING_EFFORTS", "check_number", "check_parameters", "check_tools"]

REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
TOOL_CHOICE_MODES = ("none", "auto", "required")
MODALITIES = ("text", "audio")
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
_FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
# Fields checked here, by endpoint; a body with none of them costs one set intersection.
_CHAT_FIELDS = frozenset(
    {
        "tools",
        "tool_choice",
        "response_format",
        "logprobs",
        "top_logprobs",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "reasoning_effort",
        "modalities",
        "metadata",
        "parallel_tool_calls",
    }
)
_COMPLETION_FIELDS = frozenset({"logprobs", "frequency_penalty", "presence_penalty", "logit_bias"})


def check_parameters(endpoint: str, body: dict[str, Any]) -> None:
    """Raise ``BadRequest`` for the first invalid optional parameter of a chat or completion."""
    if endpoint == "chat":
        if _CHAT_FIELDS.isdisjoint(body):
            return
        check_tools(body.get("tools"), "tools")
        _check_tool_choice(body.get("tool_choice"))
        _check_response_format(body.get("response_format"))
        _check_chat_logprobs(body)
        _check_enum(body, "reasoning_effort", REASONING_EFFORTS)
        _check_modalities(body.get("modalities"))
        check_metadata(body.get("metadata"), "metadata")
        _check_bool(body, "parallel_tool_calls")
    elif endpoint == "completion":
        if _COMPLETION_FIELDS.isdisjoint(body):
            return
        logprobs = body.get("logprobs")
        if logprobs is not None:
            check_number(logprobs, "logprobs", 0, MAX_COMPLETION_LOGPROBS, integer=True)
    else:
        return
    for name in ("frequency_penalty", "presence_penalty"):
        value = body.get(name)
        if value is not None:
            check_number(value, name, -2, 2)
    _check_logit_bias(body.get("logit_bias"))


def check_number(
    value: object, param: str, minimum: float, maximum: float, *, integer: bool = False
) -> None:
    """A number (an integer if ``integer``) within ``[minimum, maximum]``."""
    if integer:
        if type(value) is not int:
            raise wrong_type(param, "an integer", value)
    elif type(value) is not float and type(value) is not int:
        raise wrong_type(param, "a number", value)
    assert isinstance(value, int | float)
    if value < minimum:
        raise below_min(param, value, minimum)
    if value > maximum:
        raise above_max(param, value, maximum)


def check_tools(tools: object, param: str, *, flat: bool = False) -> None:
    """``tools``: an array of function tools, ``{"type": "function", "function": {"name", ...}}``.

    ``flat`` is the Responses API's shape, where the function's fields sit on the tool itself.
    Tools of other types (built-in tools of some servers) pass through unchecked.
    """
    if tools is None:
        return
    if not isinstance(tools, list):
        raise wrong_type(param, "an array", tools)
    for index, tool in enumerate(tools):
        where = f"{param}[{index}]"
        if not isinstance(tool, dict):
            raise wrong_type(where, "an object", tool)
        kind = tool.get("type")
        if kind is None:
            raise missing(f"{where}.type")
        if not isinstance(kind, str):
            raise wrong_type(f"{where}.type", "a string", kind)
        if kind != "function":
            continue
        function: object
        if flat:
            function, fwhere = tool, where
        else:
            function, fwhere = tool.get("function"), f"{where}.function"
            if function is None:
                raise missing(fwhere)
        if not isinstance(function, dict):
            raise wrong_type(fwhere, "an object", function)
        name = function.get("name")
        if name is None:
            raise missing(f"{fwhere}.name")
        if not isinstance(name, str):
            raise wrong_type(f"{fwhere}.name", "a string", name)
        if not _FUNCTION_NAME.fullmatch(name):
            raise BadRequest(
                f"Invalid '{fwhere}.name': string does not match pattern. Expected a string "
                f"that matches the pattern '^[a-zA-Z0-9_-]{{1,64}}$', but got {name!r}.",
                param=f"{fwhere}.name",
                code="invalid_value",
            )
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise wrong_type(f"{fwhere}.parameters", "an object", parameters)


def check_metadata(metadata: object, param: str) -> None:
    """At most 16 string pairs; keys up to 64 characters, values up to 512."""
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise wrong_type(param, "an object", metadata)
    if len(metadata) > MAX_METADATA_PAIRS:
        raise BadRequest(
            f"Invalid '{param}': too many properties. Expected an object with at most "
            f"{MAX_METADATA_PAIRS} properties, but got {len(metadata)} instead.",
            param=param,
            code="object_above_max_properties",
        )
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY:
            raise BadRequest(
                f"Invalid '{param}': key {key[:20]!r}... is longer than {MAX_METADATA_KEY} "
                "characters.",
                param=param,
                code="invalid_value",
            )
        if not isinstance(value, str):
            raise wrong_type(f"{param}.{key}", "a string", value)
        if len(value) > MAX_METADATA_VALUE:
            raise BadRequest(
                f"Invalid '{param}.{key}': string too long. Expected a string with maximum "
                f"length {MAX_METADATA_VALUE}, but got a string with length {len(value)} "
                "instead.",
                param=f"{param}.{key}",
                code="string_above_max_length",
            )


def _check_tool_choice(choice: object) -> None:
    if choice is None:
        return
    if isinstance(choice, str):
        if choice not in TOOL_CHOICE_MODES:
            raise invalid_value("tool_choice", choice, TOOL_CHOICE_MODES)
        return
    if not isinstance(choice, dict):
        raise wrong_type("tool_choice", "a string or an object", choice)
    kind = choice.get("type")
    if kind is None:
        raise missing("tool_choice.type")
    if not isinstance(kind, str):
        raise wrong_type("tool_choice.type", "a string", kind)
    if kind == "function":
        function = choice.get("function")
        if not isinstance(function, dict):
            raise (
                missing("tool_choice.function")
                if function is None
                else wrong_type("tool_choice.function", "an object", function)
            )
        name = function.get("name")
        if not isinstance(name, str):
            raise (
                missing("tool_choice.function.name")
                if name is None
                else wrong_type("tool_choice.function.name", "a string", name)
            )


def _check_response_format(fmt: object) -> None:
    if fmt is None:
        return
    if not isinstance(fmt, dict):
        raise wrong_type("response_format", "an object", fmt)
    kind = fmt.get("type")
    if kind is None:
        raise missing("response_format.type")
    if kind not in RESPONSE_FORMATS:
        raise invalid_value("response_format.type", kind, RESPONSE_FORMATS)
    if kind == "json_schema":
        schema = fmt.get("json_schema")
        if schema is None:
            raise missing("response_format.json_schema")
        if not isinstance(schema, dict):
            raise wrong_type("response_format.json_schema", "an object", schema)
        name = schema.get("name")
        if name is None:
            raise missing("response_format.json_schema.name")
        if not isinstance(name, str):
            raise wrong_type("response_format.json_schema.name", "a string", name)
        if not name:
            raise empty_string("response_format.json_schema.name")


def _check_chat_logprobs(body: dict[str, Any]) -> None:
    logprobs = _check_bool(body, "logprobs")
    top = body.get("top_logprobs")
    if top is None:
        return
    check_number(top, "top_logprobs", 0, MAX_TOP_LOGPROBS, integer=True)
    if not logprobs:
        raise BadRequest(
            "Invalid value for 'top_logprobs': 'logprobs' must be set to true when "
            "'top_logprobs' is given.",
            param="top_logprobs",
            code="invalid_value",
        )


def _check_logit_bias(bias: object) -> None:
    if bias is None:
        return
    if not isinstance(bias, dict):
        raise wrong_type("logit_bias", "an object", bias)
    for token, value in bias.items():
        if not token.isdigit():
            raise BadRequest(
                f"Invalid key in 'logit_bias': {token!r}. Keys are token ids (integers).",
                param="logit_bias",
                code="invalid_value",
            )
        check_number(value, f"logit_bias.{token}", -100, 100)


def _check_modalities(modalities: object) -> None:
    if modalities is None:
        return
    if not isinstance(modalities, list):
        raise wrong_type("modalities", "an array", modalities)
    for index, item in enumerate(modalities):
        if item not in MODALITIES:
            raise invalid_value(f"modalities[{index}]", item, MODALITIES)


def _check_enum(body: dict[str, Any], name: str, allowed: tuple[str, ...]) -> None:
    value = body.get(name)
    if value is not None and value not in allowed:
        raise invalid_value(name, value, allowed)


def _check_bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise wrong_type(name, "a boolean", value)
    return value
