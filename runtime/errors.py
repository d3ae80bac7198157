"""Error types with messages a user can act on.

Raised at the edge, caught at the boundary that can answer: the server turns a
ProtocolError into an error reply, the CLI turns any SightlineError into one line
and exit code 2.
"""


class SightlineError(Exception):
    """Base of every error Sightline raises on purpose."""


class BundleError(SightlineError):
    """A model bundle (or the ONNX file going into one) is unusable."""


class EngineError(SightlineError):
    """An inference engine could not be created or failed to run."""


class ConfigError(SightlineError):
    """A configuration file or flag is invalid."""


class FetchError(SightlineError):
    """A pinned asset could not be downloaded or failed verification."""


class ProtocolError(SightlineError):
    """A client message broke the wire protocol; `code` goes into the error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class EngineMismatch(EngineError):
    """A compiled engine is not valid for this GPU / TensorRT version / bundle."""


class UpdateRejected(SightlineError):
    """An over-the-air update failed a check; the model that was serving keeps serving."""

    def __init__(self, message: str, *, step: str = "verify") -> None:
        super().__init__(message)
        self.step = step


def describe_validation(exc, names: dict[str, str] | None = None, model=None) -> str:
    """A pydantic ValidationError as one line: `field: what was wrong, expected what`, one
    clause per error joined by "; ". Config files, flags and manifests all go through here.

    `names` maps dotted field paths to what the user typed (`{"mean": "--mean"}`); `model`,
    the pydantic model validated, lets an unknown key list the keys that are allowed.
    """
    return "; ".join(_clause(error, names or {}, model) for error in exc.errors())


def _clause(error: dict, names: dict[str, str], model) -> str:
    path = ".".join(str(p) for p in error["loc"])
    field = names.get(path, path) or "(top level)"
    kind, message, value = error["type"], error["msg"], error.get("input")
    if kind == "extra_forbidden":
        allowed = _known_keys(model, error["loc"][:-1])
        expected = f"one of {', '.join(allowed)}" if allowed else "no keys here"
        return f"{field}: unknown key, expected {expected}"
    if kind == "missing":
        return f"{field}: missing, expected a value"
    if kind in ("value_error", "assertion_error"):
        # our validators word their own "got ..., expected ..."; pydantic adds "Value error, "
        return f"{field}: {error.get('ctx', {}).get('error', message)}"
    return f"{field}: got {_shown(value)}, expected {_expectation(message)}"


def _expectation(message: str) -> str:
    """Pydantic's "Input should be greater than 0" -> "greater than 0"."""
    import re

    found = re.match(r"^\w+ should (be |have |match )?(.*?)(, not \d+)?$", message)
    if not found:
        return message[:1].lower() + message[1:]
    verb, rest = found.group(1), found.group(2)
    return f"a value matching {rest}" if verb == "match " else rest


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _known_keys(model, loc: tuple) -> list[str]:
    """The field names at `loc` inside `model` (nested pydantic models only)."""
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        model = getattr(field, "annotation", None)
    return list(getattr(model, "model_fields", {}))
