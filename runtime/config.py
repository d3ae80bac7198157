"""Daemon configuration: a TOML file plus command-line overrides, validated once at start-up.

Unknown keys are errors (a typo must not silently fall back to a default), and every
error names the key and the reason.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from runtime.engines import EngineSettings
from runtime.errors import ConfigError, describe_validation

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoints: tuple[str, ...] = (DEFAULT_ENDPOINT,)
    max_clients: int = Field(default=64, gt=0)
    # A frame that waited longer than this (since it arrived) is dropped, not inferred.
    deadline_ms: float = Field(default=250.0, gt=0)
    max_frame_bytes: int = Field(default=32 * 1024 * 1024, gt=0)
    max_width: int = Field(default=4096, gt=0)
    max_height: int = Field(default=4096, gt=0)
    # A client silent for this long is forgotten (its slot and counters freed).
    client_timeout_s: float = Field(default=10.0, gt=0)
    # Replies queued per client before ZeroMQ drops them for a client that does not read.
    reply_hwm: int = Field(default=64, gt=0)
    # Frames per second one client may send; the excess gets RATE_LIMITED error replies.
    max_fps_per_client: float = Field(default=120.0, gt=0)
    # Requests from one headset that get an error reply (bad headers, wrong part counts,
    # oversized frames ...), per second, bursts of `bad_request_burst`. Over it, the
    # headset's frames are refused (RATE_LIMITED) before any decode until it sends fewer.
    bad_requests_per_s: float = Field(default=5.0, gt=0)
    bad_request_burst: int = Field(default=50, gt=0)
    # Dynamic batching across clients: up to this many clients' newest frames of the same
    # size run as one engine call, where the model has a batch dimension. "auto": 4 when
    # the engine runs on a GPU, 1 (no batching) on a CPU, where a batch of N costs about N
    # single calls and only delays the first frame of it.
    max_batch: int | Literal["auto"] = "auto"
    # Wait this long for a batch to fill when only one frame is waiting. 0: never wait;
    # frames that arrive during an inference form the next batch, so no frame waits longer
    # than the inference in progress and a single client's latency is unchanged.
    batch_wait_ms: float = Field(default=0.0, ge=0)
    # Prepare the next frames while the engine runs ("auto": only when the engine runs on
    # a GPU; on a CPU-bound engine it competes for the cores and adds a thread hand-over).
    prepare_ahead: Literal["auto", "on", "off"] = "auto"
    # Run the model in the thread that owns the socket, as a one-thread server would: two
    # thread hand-overs fewer per frame. "auto": when the daemon serves one model on a
    # CPU-bound engine (with several, each needs its own thread). "auto" and "on" alike:
    # only for a model that infers in under 1 ms, since a ping or another headset's frame
    # arriving mid-inference waits unseen in the socket (protocol.md §4.5: pings at once).
    inline_inference: Literal["auto", "on", "off"] = "auto"
    # Prometheus /metrics endpoint as HOST:PORT (no authentication: keep it on loopback
    # or a management network); unset: no endpoint.
    metrics_listen: str | None = Field(default=None, pattern=r"^[^:]+:\d+$")

    @field_validator("max_batch")
    @classmethod
    def _batch_is_positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("max_batch is a number of frames, 1 or more (1: no batching)")
        return value

    @field_validator("endpoints")
    @classmethod
    def _endpoints_are_zmq(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one endpoint is needed")
        for endpoint in value:
            if not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
                raise ValueError(f"{endpoint!r} is not a tcp://, ipc:// or inproc:// endpoint")
        return value


class SecuritySettings(BaseModel):
    """The headset link: CURVE (encrypted, enrolled headsets only) unless `plain` is chosen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # "plain" (no encryption, anyone may connect) exists for development only.
    mode: Literal["curve", "plain"] = "curve"
    # Directory holding daemon.key_secret and headsets/ (the allow-list).
    # Default: $SIGHTLINE_KEYS_DIR or ~/.config/sightline/keys.
    keys_dir: str | None = None
    # A peer that has not finished the CURVE handshake by then is disconnected.
    handshake_timeout_s: float = Field(default=5.0, gt=0)
    # CURVE handshakes admitted per second for one headset key, and from one source
    # address; both buckets hold `handshake_burst`. Over the rate, the handshake is refused
    # (the headset's open connection keeps its service).
    handshakes_per_s_per_key: float = Field(default=2.0, gt=0)
    handshakes_per_s_per_address: float = Field(default=20.0, gt=0)
    handshake_burst: int = Field(default=10, gt=0)
    # Open connections (TCP, handshaken or not) one source address may hold; ipc:// peers
    # count as one address, "local".
    max_connections_per_address: int = Field(default=64, gt=0)

    def resolved_keys_dir(self) -> Path:
        from runtime.curve_keys import keys_dir

        return Path(self.keys_dir) if self.keys_dir else keys_dir()


class CascadeSettings(BaseModel):
    """[[cascades]]: run model `run` on each object model `on` finds (runtime/daemon/cascade.py).

    The crop is the object's box made square (its longer side), grown by `margin` on each
    side and moved by `shift_y` box heights along its "up"; with `rotate_from` = (a, b) it
    is turned so keypoint a -> b points up (MediaPipe's palm: wrist 0 -> middle finger 2).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    on: str = Field(description="name of the served model whose objects are cropped")
    run: str = Field(description="bundle (path or built-in name) run on each crop")
    labels: tuple[str, ...] = Field(default=(), description="only objects with these labels")
    min_size: float = Field(default=0.0, ge=0.0, description="shorter box side, source px")
    max_objects: int = Field(default=4, gt=0)
    margin: float = Field(default=0.25, ge=0.0, le=4.0)
    shift_y: float = Field(default=0.0, ge=-2.0, le=2.0)
    rotate_from: tuple[int, int] | None = None
    # Re-run policy, per tracked object (the spatial tracker's ids): new track, box area
    # grown by `rerun_growth`, or `every` frames since the last run; else the last result.
    rerun_growth: float = Field(default=0.2, ge=0.0)
    every: int = Field(default=1, gt=0)
    # ROI tracking: while every object's result scores at least `track_roi`, the next
    # frame's crops come from this frame's landmarks and model `on` is skipped; 0 = off.
    track_roi: float = Field(default=0.0, ge=0.0, le=1.0)
    roi_margin: float = Field(default=0.5, ge=0.0, le=4.0)
    roi_shift_y: float = Field(default=0.0, ge=-2.0, le=2.0)
    roi_rotate_from: tuple[int, int] | None = None


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    server: ServerSettings = ServerSettings()
    security: SecuritySettings = SecuritySettings()
    engine: EngineSettings = EngineSettings()
    # Bundle directories/archives, or "centerface" for the built-in default model.
    # The first one serves frames whose header names no model.
    models: tuple[str, ...] = ("centerface",)
    # Which precision variant to serve when `sightline quantize` wrote one beside a bundle;
    # "auto" takes the device profile's precision (fp16 on NVIDIA GPUs, fp32 on CPU).
    precision: Literal["auto", "fp32", "fp16", "int8"] = "auto"
    # Device profile overrides, [profiles.<class>] tables (see `sightline devices`).
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # [[cascades]]: second-stage models run on a served model's objects.
    cascades: tuple[CascadeSettings, ...] = ()
    # [cloud]: MQTT link, telemetry and OTA updates (validated by cloud_sync.agent, which
    # the daemon imports only when this table is present).
    cloud: dict[str, Any] | None = None

    @field_validator("profiles")
    @classmethod
    def _profiles_valid(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from devices.profiles import validate_overrides

        validate_overrides(value)  # raises ValueError subclasses naming the bad key
        return value


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> ServeConfig:
    """Read `path` (if any), apply dotted-key overrides like {"server.deadline_ms": 100}."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as exc:
        where = f"in {path}" if path else "in the command-line options"
        raise ConfigError(f"invalid configuration {where}: "
                          f"{describe_validation(exc, model=ServeConfig)}") from None


def apply_device_profile(config: ServeConfig):
    """This machine's device profile, and the config with its choices filled in: the
    precision to prefer and, under backend=auto, whether TensorRT is tried at all."""
    from devices.platform import detect_platform
    from devices.profiles import ProfileError, profile_for

    try:
        profile = profile_for(detect_platform(), config.profiles)
    except ProfileError as exc:
        raise ConfigError(f"invalid device profile override: {exc}") from None
    updates: dict[str, Any] = {}
    if config.precision == "auto":
        updates["precision"] = profile.precision
    if config.engine.backend == "auto" and "tensorrt" not in profile.backends:
        updates["engine"] = config.engine.model_copy(update={"backend": "onnxruntime"})
    return config.model_copy(update=updates), profile
