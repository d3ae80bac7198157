"""The service's HTTP side: `/metrics` for Prometheus and a read-only JSON API.

    GET /devices                  the registry: online, groups, models, last OTA, figures
    GET /devices/{id}/history     the device's version changes, newest first, with outcomes
    GET /rollouts                 rollouts, newest first
    GET /rollouts/{id}            one rollout: its steps and the telemetry gate's checks
    GET /healthz                  200 while the MQTT session is up, else 503

Nothing here writes: the ingest is the only writer. One small threaded server from the
standard library; put a reverse proxy in front of it for TLS and authentication.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy import select

from cloud_sync.service.figures import figures
from cloud_sync.service.models import Device, GateCheck, Rollout, RolloutStep, VersionChange
from runtime.errors import ConfigError

log = logging.getLogger(__name__)


def device_json(device: Device) -> dict[str, Any]:
    reduced = figures(device.latest_telemetry) if device.latest_telemetry else None
    return {"device_id": device.device_id, "online": device.online,
            "offline_reason": device.offline_reason, "groups": device.groups,
            "models": device.models, "last_ota": device.last_ota,
            "first_seen": device.first_seen, "last_seen": device.last_seen,
            "restarts": device.restarts,
            "fps": reduced.fps if reduced else None,
            "p99_ms": reduced.p99_ms if reduced else None}


def change_json(change: VersionChange) -> dict[str, Any]:
    return {"update_id": change.update_id, "model": change.model,
            "from_version": change.from_version, "to_version": change.to_version,
            "started_at": change.started_at, "ended_at": change.ended_at,
            "last_state": change.last_state, "outcome": change.outcome,
            "reason": change.reason, "fps_before": change.fps_before,
            "p99_before": change.p99_before}


def rollout_json(rollout: Rollout, steps=None, checks=None) -> dict[str, Any]:
    document = {"update_id": rollout.update_id, "model": rollout.model,
                "version": rollout.version, "state": rollout.state,
                "started_at": rollout.started_at, "ended_at": rollout.ended_at,
                "canaries": rollout.canaries, "targets": rollout.targets,
                "decision": rollout.decision}
    if steps is not None:
        document["steps"] = [
            {"device_id": s.device_id, "stage": "canary" if s.device_id in rollout.canaries
             else "rest", "state": s.state, "detail": s.detail, "updated_at": s.updated_at}
            for s in steps]
    if checks is not None:
        document["gate"] = [{"device_id": c.device_id, "metric": c.metric, "before": c.before,
                             "after": c.after, "peers": c.peers, "samples": c.samples,
                             "worse": c.worse, "note": c.note} for c in checks]
    return document


def device_history(session, device_id: str) -> list[dict[str, Any]] | None:
    if session.get(Device, device_id) is None:
        return None
    changes = session.scalars(select(VersionChange).where(VersionChange.device_id == device_id)
                              .order_by(VersionChange.started_at.desc())).all()
    return [change_json(c) for c in changes]


def rollout_detail(session, update_id: str) -> dict[str, Any] | None:
    rollout = session.get(Rollout, update_id)
    if rollout is None:
        return None
    steps = session.scalars(select(RolloutStep).where(RolloutStep.update_id == update_id)
                            .order_by(RolloutStep.device_id)).all()
    checks = session.scalars(select(GateCheck).where(GateCheck.update_id == update_id)
                             .order_by(GateCheck.id)).all()
    return rollout_json(rollout, steps, checks)


def rollouts(session, limit: int = 100) -> list[dict[str, Any]]:
    rows = session.scalars(select(Rollout).order_by(Rollout.started_at.desc())
                           .limit(limit)).all()
    return [rollout_json(r) for r in rows]


class ApiServer:
    """ThreadingHTTPServer on (host, port); port 0 picks a free one (see `.port`)."""

    def __init__(self, host: str, port: int, sessions, collector, health=lambda: True) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the standard library's name
                server._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("%s %s", self.address_string(), format % args)

        self._sessions = sessions
        self._registry = registry
        self._health = health
        try:
            self._httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ConfigError(f"--http {host}:{port}: cannot listen there ({exc.strerror}); "
                              "pick another port (0: any free one)") from exc
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def start(self) -> ApiServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="sightline-cloud-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:  # shutdown() waits for serve_forever: only if it runs
            self._httpd.shutdown()
            self._thread.join(5)
        self._httpd.server_close()

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        path = urlsplit(request.path).path.rstrip("/") or "/"
        parts = [unquote(p) for p in path.strip("/").split("/")]
        try:
            if path == "/metrics":
                body = generate_latest(self._registry)
                return _reply(request, 200, body, CONTENT_TYPE_LATEST)
            if path == "/healthz":
                ok = self._health()
                return _json(request, 200 if ok else 503, {"mqtt_connected": ok})
            with self._sessions() as session:
                if parts == ["devices"]:
                    devices = session.scalars(select(Device).order_by(Device.device_id)).all()
                    return _json(request, 200, [device_json(d) for d in devices])
                if len(parts) == 3 and parts[0] == "devices" and parts[2] == "history":
                    history = device_history(session, parts[1])
                    if history is None:
                        return _json(request, 404, {"error": f"no device {parts[1]!r}"})
                    return _json(request, 200, {"device_id": parts[1], "history": history})
                if parts == ["rollouts"]:
                    return _json(request, 200, rollouts(session))
                if len(parts) == 2 and parts[0] == "rollouts":
                    detail = rollout_detail(session, parts[1])
                    if detail is None:
                        return _json(request, 404, {"error": f"no rollout {parts[1]!r}"})
                    return _json(request, 200, detail)
            return _json(request, 404, {"error": f"no such endpoint {path}; try /devices, "
                                                 "/devices/ID/history, /rollouts, /metrics"})
        except Exception as exc:  # one bad request must not stop the server
            log.exception("GET %s failed", path)
            return _json(request, 500, {"error": f"{type(exc).__name__}: {exc}"})


def _json(request: BaseHTTPRequestHandler, status: int, document: Any) -> None:
    _reply(request, status, json.dumps(document).encode(), "application/json")


def _reply(request: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str) -> None:
    request.send_response(status)
    request.send_header("Content-Type", content_type)
    request.send_header("Content-Length", str(len(body)))
    request.end_headers()
    request.wfile.write(body)
