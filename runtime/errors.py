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
