"""Problems in a YAML or JSON document, each one line that starts with its path in the
document: `spec.workerGroupSpecs[0].replicas: must be of type integer, not str 'two'`."""

import jsonschema
from pydantic import ValidationError

Location = list[str | int]


def dotted(location: Location) -> str:
    """`["spec", "workerGroupSpecs", 0, "template"]` -> `spec.workerGroupSpecs[0].template`."""
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "(document)"


def pydantic_problems(error: ValidationError, location: Location) -> list[str]:
    lines = []
    for item in error.errors():
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        lines.append(f"{dotted(list(location) + list(item['loc']))}: {message}")
    return lines


def schema_problems(document, schema: dict, location: Location = ()) -> list[str]:
    """The document against a (strict) schema, after dropping null fields as the server does."""
    validator = jsonschema.Draft7Validator(schema)
    problems = []
    for error in validator.iter_errors(_without_nulls(document)):
        problems += _schema_error_lines(error, list(location) + list(error.absolute_path))
    return sorted(set(problems))


def _without_nulls(value):
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def _schema_error_lines(error: jsonschema.ValidationError, location: Location) -> list[str]:
    if error.validator == "additionalProperties":
        known = error.schema.get("properties", {})
        return [f"{dotted(location + [key])}: unknown key" for key in error.instance if key not in known]
    if error.validator == "required":
        return [
            f"{dotted(location + [name])}: missing (required)"
            for name in error.validator_value if name not in error.instance
        ]
    return [f"{dotted(location)}: {_schema_error_message(error)}"]


def _schema_error_message(error: jsonschema.ValidationError) -> str:
    if error.schema.get("x-kubernetes-int-or-string") and error.validator == "anyOf":
        return f"must be an integer or a string, not {error.instance!r}"
    if error.validator == "type":
        return f"must be of type {error.validator_value}, not {type(error.instance).__name__} {error.instance!r}"
    if error.validator == "enum":
        return f"must be one of {', '.join(map(str, error.validator_value))}, not {error.instance!r}"
    return error.message
