"""What a running daemon reports about itself, and how `sightline status` shows it.

`DaemonStatus` builds the status document on the control thread from counters the I/O
and pipeline threads bump; `render_status` prints one for a person. Neither touches a
socket: the control socket (runtime/daemon/control.py) carries the document as msgpack.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from runtime import __version__

if TYPE_CHECKING:
    from runtime.daemon.server import Server


class DaemonStatus:
    """`status` callable for ControlServer: `DaemonStatus(server, control_endpoint)`.

    Runs on the control thread while the I/O and pipeline threads keep counting. Reading
    an int and copying a Counter (dict(...)) are each atomic under the GIL, so a snapshot
    is consistent per counter; counters may be a frame apart from each other, which is
    fine for a status report and keeps every lock off the hot path.
    """

    def __init__(self, server: Server, control_endpoint: str) -> None:
        self._server = server
        self._control = control_endpoint
        self._started_wall = time.time()
        self._started = time.monotonic()

    def __call__(self) -> dict[str, Any]:
        server = self._server
        counters = server.counters
        return {
            "version": __version__,
            "pid": os.getpid(),
            "started_at": self._started_wall,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "endpoints": list(server.endpoints),
            "control": self._control,
            "clients": server.client_count,
            # Per headset: its enrolled name under CURVE (figures survive reconnects), its
            # connection ("conn-<routing id>") in plain mode.
            "identity": "key" if server.identities.by_key else "connection",
            "headsets": headset_figures(server),
            "connections": server.monitor.figures() if server.monitor is not None else {},
            "handshakes": server.admission.figures() if server.admission is not None else {},
            "default_model": server.default_model,
            "counters": {"frames": counters.frames, "superseded": counters.superseded,
                         "errors": dict(counters.errors)},
            "models": [
                {"name": name, "version": p.bundle.version, "task": p.bundle.manifest.task,
                 "provider": p.engine.provider, "default": name == server.default_model,
                 "results": p.counters.results, "expired": p.counters.expired,
                 "errors": p.counters.errors}
                for name, p in server.pipelines.items()
            ],
        }


def headset_figures(server: Server) -> list[dict[str, Any]]:
    now = time.monotonic()
    return [
        {"name": h.name, "connected": bool(h.last_seen),
         "idle_s": round(now - h.last_seen, 3) if h.last_seen else None,
         "frames": h.frames, "dropped": server.dropped(h), "rate_limited": h.rate_limited,
         "bad_requests": h.bad_requests,
         "connections": h.connections, "replaced": h.replaced}
        for h in server.identities.headsets()
    ]


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def render_status(status: dict[str, Any], console: Console) -> None:
    """A readable summary; tolerant of missing keys (older or newer daemons)."""
    def text(value: Any) -> str:
        return escape(str(value))

    console.print(f"[bold]sightline {text(status.get('version', '?'))}[/]  pid "
                  f"{text(status.get('pid', '?'))}  up "
                  f"{format_duration(status.get('uptime_s', 0))}", highlight=False)
    if "healthy" in status:
        state = "[green]healthy[/]" if status["healthy"] else "[bold red]unhealthy[/]"
        console.print(f"  state      {state}")
    console.print(f"  endpoints  {text(', '.join(status.get('endpoints', [])) or '-')}",
                  highlight=False)
    console.print(f"  control    {text(status.get('control', '-'))}", highlight=False)
    console.print(f"  clients    {text(status.get('clients', '?'))} connected", highlight=False)
    counters = status.get("counters", {})
    errors = counters.get("errors", {})
    error_text = ", ".join(f"{code} {n}" for code, n in sorted(errors.items())) or "none"
    console.print(f"  frames     {text(counters.get('frames', 0))} received, "
                  f"{text(counters.get('superseded', 0))} superseded by a newer frame",
                  highlight=False)
    console.print(f"  rejected   {text(error_text)}", highlight=False)
    table = Table(title=None, box=None, pad_edge=False, show_edge=False)
    for column in ("model", "version", "task", "provider", "results", "expired", "errors"):
        justify = "right" if column in ("results", "expired", "errors") else "left"
        table.add_column(column, justify=justify, header_style="bold", no_wrap=True)
    for model in status.get("models", []):
        name = text(model.get("name", "?")) + (" (default)" if model.get("default") else "")
        errors_n = model.get("errors", 0)
        table.add_row(name, text(model.get("version", "?")), text(model.get("task", "?")),
                      text(model.get("provider", "?")), text(model.get("results", 0)),
                      text(model.get("expired", 0)),
                      f"[red]{errors_n}[/]" if errors_n else "0")
    console.print()
    console.print(table)
    headsets = status.get("headsets", [])
    if headsets:
        by = "enrolled key" if status.get("identity") == "key" else "connection (plain mode)"
        rows = Table(title=None, box=None, pad_edge=False, show_edge=False)
        columns = ("headset", "state", "frames", "dropped", "rate-limited", "connections",
                   "replaced")
        for column in columns:
            rows.add_column(column, justify="left" if column in ("headset", "state")
                            else "right", header_style="bold", no_wrap=True)
        for h in headsets:
            state = "connected" if h.get("connected") else "idle"
            rows.add_row(text(h.get("name", "?")), state, text(h.get("frames", 0)),
                         text(h.get("dropped", 0)), text(h.get("rate_limited", 0)),
                         text(h.get("connections", 0)), text(h.get("replaced", 0)))
        console.print()
        console.print(f"  headsets, by {by}", highlight=False)
        console.print(rows)
    connections = status.get("connections") or {}
    if connections:
        console.print(f"  transport  {text(connections.get('open', 0))} connection(s) open, "
                      f"{text(connections.get('accepted', 0))} accepted since start",
                      highlight=False)
    handshakes = status.get("handshakes") or {}
    if handshakes:
        refused = ", ".join(f"{k} {n}" for k, n in sorted(handshakes.get("refused", {}).items()))
        console.print(f"  handshakes {text(handshakes.get('accepted', 0))} accepted, refused: "
                      f"{text(refused or 'none')}", highlight=False)
