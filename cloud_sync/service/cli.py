"""`sightline cloud serve`, and the history views `sightline fleet history DEVICE` and
`sightline fleet rollouts` (registered on the `fleet` group by cloud_sync/cli.py).

sqlalchemy, alembic and the service modules are imported inside the commands, so the
CLI starts without the `sightline[cloud]` extra."""

from __future__ import annotations

import signal
import sys
import threading

import click

from cloud_sync.cli import _broker_options, _operator_config

DB_HELP = ("Database URL: sqlite:///PATH (or a plain path) or postgresql://USER@HOST/DB. "
           "Default: $SIGHTLINE_CLOUD_DB, else cloud.db in the user's data directory.")


def _db_option(command):
    return click.option("--db", "db_url", metavar="URL", help=DB_HELP)(command)


def _url(db_url: str | None) -> str:
    from cloud_sync.service.database import default_url

    return db_url or default_url()


@click.group("cloud")
def cloud() -> None:
    """The fleet service: history in a database, metrics for Prometheus."""


def _budget(ctx, param, values) -> dict[str, float]:
    budgets = {}
    for value in values:
        name, _, ms = value.partition("=")
        try:
            budgets[name] = float(ms)
        except ValueError:
            raise click.BadParameter(f"{value!r}: expected MODEL=MS, e.g. centerface=40"
                                     ) from None
        if not name:
            raise click.BadParameter(f"{value!r}: expected MODEL=MS, e.g. centerface=40")
    return budgets


@cloud.command("serve")
@_db_option
@click.option("--http", "http", default="127.0.0.1:9310", show_default=True,
              metavar="HOST:PORT", help="Where /metrics and the JSON API listen (port 0: any).")
@click.option("--client-id", default="sightline-cloud", show_default=True,
              help="MQTT client id: names the persistent session, keep it stable; one per "
                   "instance.")
@click.option("--share", default="sightline-cloud", show_default=True,
              help="Shared-subscription group: instances with the same name split telemetry.")
@click.option("--latency-budget", "budgets", multiple=True, callback=_budget,
              metavar="MODEL=MS", help="p99 budget of a model for the alert; repeatable.")
@click.option("--raw-retention", "raw_s", type=float, default=7 * 86400.0, show_default=True,
              help="Seconds raw telemetry samples are kept before they are downsampled.")
@click.option("--rollup-bucket", "bucket_s", type=float, default=300.0, show_default=True,
              help="Seconds per downsampled telemetry bucket.")
@click.option("--rollup-retention", "rollup_s", type=float, default=90 * 86400.0,
              show_default=True, help="Seconds downsampled telemetry is kept.")
@_broker_options
def serve(db_url, http, client_id, share, budgets, raw_s, bucket_s, rollup_s, **broker) -> None:
    """Record the fleet (status, telemetry, OTA progress) and serve metrics and history.

    \b
    Examples:
      sightline cloud serve --broker mqtt.example.com:8883 --tls-ca ca.pem ...
      sightline cloud serve --db postgresql://sightline@db.example.com/fleet
    Runs until SIGTERM or Ctrl-C; migrates the database's schema on start.
    """
    from cloud_sync.service.database import redact, require_sqlalchemy
    from cloud_sync.service.ingest import IngestSettings
    from cloud_sync.service.retention import Retention
    from cloud_sync.service.service import FleetService, ServiceConfig
    from runtime.errors import SightlineError

    require_sqlalchemy()
    host, _, port = http.rpartition(":")
    if not host or not port.isdigit():
        raise SightlineError(f"--http {http!r}: expected HOST:PORT, e.g. 127.0.0.1:9310")
    if not 0 < bucket_s <= raw_s:
        raise SightlineError("--rollup-bucket must be positive and at most --raw-retention")
    config = ServiceConfig(
        db_url=_url(db_url), broker=_operator_config(**broker), http_host=host,
        http_port=int(port), ingest=IngestSettings(client_id=client_id, share=share),
        retention=Retention(raw_s=raw_s, bucket_s=bucket_s, rollup_s=rollup_s),
        latency_budgets_ms=budgets)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with FleetService(config) as service:
        click.echo(f"sightline cloud: recording into {redact(config.db_url)}; "
                   f"http://{host}:{service.api.port}/metrics; broker {config.broker.address}",
                   err=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    click.echo("sightline cloud: stopped", err=True)


@click.command("history")
@click.argument("device")
@_db_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def history(device, db_url, as_json) -> None:
    """A device's model version history: every update and rollback, and how it ended."""
    import json

    from cloud_sync.service.api import device_history
    from cloud_sync.service.database import open_database
    from runtime.errors import SightlineError

    engine, sessions = open_database(_url(db_url), migrate_schema=False)
    try:
        with sessions() as session:
            changes = device_history(session, device)
    finally:
        engine.dispose()
    if changes is None:
        raise SightlineError(f"no device {device!r} in the fleet service's database "
                             f"({_url(db_url)}); is `sightline cloud serve` recording it?")
    if as_json:
        click.echo(json.dumps(changes, indent=1))
        return
    console = _console()
    from rich.table import Table

    table = Table(title=f"{device}: model versions")
    for name in ("when", "model", "from", "to", "outcome", "reason", "update"):
        table.add_column(name)
    for c in changes:
        table.add_row(_when(c["started_at"]), c["model"] or "-", c["from_version"] or "-",
                      c["to_version"] or "-", _outcome(c["outcome"]), c["reason"] or "",
                      c["update_id"])
    console.print(table)


@click.command("rollouts")
@click.argument("update_id", required=False)
@_db_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def rollouts(update_id, db_url, as_json) -> None:
    """Rollouts, newest first; with UPDATE_ID, that rollout's steps and gate figures."""
    import json

    from cloud_sync.service.api import rollout_detail
    from cloud_sync.service.api import rollouts as list_rollouts
    from cloud_sync.service.database import open_database
    from runtime.errors import SightlineError

    engine, sessions = open_database(_url(db_url), migrate_schema=False)
    try:
        with sessions() as session:
            found = rollout_detail(session, update_id) if update_id else list_rollouts(session)
    finally:
        engine.dispose()
    if found is None:
        raise SightlineError(f"no rollout {update_id!r} in {_url(db_url)}")
    if as_json:
        click.echo(json.dumps(found, indent=1))
        return
    from rich.table import Table

    console = _console()
    if not update_id:
        table = Table(title="rollouts")
        for name in ("started", "update", "model", "version", "state", "decision"):
            table.add_column(name)
        for r in found:
            table.add_row(_when(r["started_at"]), r["update_id"], r["model"] or "-",
                          r["version"] or "-", _outcome(r["state"]), r["decision"] or "")
        console.print(table)
        return
    console.print(f"{found['update_id']}: {found['model']}@{found['version']} "
                  f"{found['state']}" + (f" — {found['decision']}" if found["decision"] else ""),
                  highlight=False, markup=False)
    table = Table(title="steps")
    for name in ("device", "stage", "state", "detail"):
        table.add_column(name)
    for s in found["steps"]:
        table.add_row(s["device_id"], s["stage"] or "-", _outcome(s["state"] or "-"),
                      s["detail"] or "")
    console.print(table)
    if found["gate"]:
        console.print(gate_table(found["gate"]))


def gate_table(checks):
    from rich.table import Table

    table = Table(title="telemetry gate")
    for name in ("device", "metric", "before", "after", "not updated", "samples", "verdict"):
        table.add_column(name)
    for c in checks:
        table.add_row(c["device_id"], c["metric"], _figure(c["before"]), _figure(c["after"]),
                      _figure(c["peers"]), str(c["samples"]),
                      "[red]worse[/]" if c["worse"] else "ok")
    return table


def _figure(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def _outcome(text: str) -> str:
    if text in ("rolled_back", "rejected", "failed", "interrupted", "halted"):
        return f"[red]{text}[/]"
    if text in ("confirmed", "completed", "current"):
        return f"[green]{text}[/]"
    return text


def _when(ts: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S")


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)
