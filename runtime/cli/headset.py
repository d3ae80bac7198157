"""Headset-side commands: `sightline ping` and `sightline stream` (a stand-in headset)."""

from __future__ import annotations

import signal
import sys

import click

from runtime.errors import SightlineError


@click.command()
@click.argument("endpoint", default="tcp://127.0.0.1:5555")
@click.option("--count", type=click.IntRange(min=1), default=1, show_default=True,
              help="Pings to time after the first one (which lists the models and pays for "
                   "the connection): prints their round trip, min/median/max.")
@click.option("--timeout", type=float, default=2.0, show_default=True,
              help="Seconds to wait for each pong.")
@click.option("--server-key", type=click.Path(exists=True, dir_okay=False),
              help="The daemon's public key file (daemon.key), for a CURVE daemon.")
@click.option("--client-key", type=click.Path(exists=True, dir_okay=False),
              help="An enrolled headset's .key_secret file, for a CURVE daemon.")
def ping(endpoint: str, count: int, timeout: float, server_key, client_key) -> None:
    """Ask a running daemon which models it serves, and time the round trip of pings."""
    import statistics

    from runtime.client import ping_round_trips

    try:
        reply, trips = ping_round_trips(endpoint, count, timeout, server_key=server_key,
                                        client_key=client_key)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if reply is None:
        raise SightlineError(f"no daemon answered at {endpoint} within {timeout} s")
    if reply.get("type") != "pong":
        raise SightlineError(f"the daemon at {endpoint} answered {reply.get('code')}: "
                             f"{reply.get('message')}")
    for model in reply["models"]:
        default = " (default)" if model.get("default") else ""
        click.echo(f"{model['name']}@{model['version']}  {model['task']}  "
                   f"{model['provider']}{default}")
    if trips:
        ms = sorted(t * 1000 for t in trips)
        click.echo(f"round trip over {len(ms)} pings: min {ms[0]:.3f} ms, median "
                   f"{statistics.median(ms):.3f} ms, max {ms[-1]:.3f} ms")
    if len(trips) < count:
        raise SightlineError(f"ping {len(trips) + 2} got no pong within {timeout} s")


@click.command("stream")
@click.argument("endpoint", default="tcp://127.0.0.1:5555")
@click.option("--seconds", type=float, help="Stop after this long (default: until Ctrl-C).")
@click.option("--fps", type=float, default=30.0, show_default=True)
@click.option("--server-key", type=click.Path(exists=True, dir_okay=False),
              help="The daemon's public key file (daemon.key), for a CURVE daemon.")
@click.option("--client-key", type=click.Path(exists=True, dir_okay=False),
              help="An enrolled headset's .key_secret file, for a CURVE daemon.")
def stream_command(endpoint, seconds, fps, server_key, client_key) -> None:
    """Act as a headset: stream frames to a daemon, print model version changes and any
    frame that did not get a result. Exit status 1 if any frame failed."""
    from runtime.client.stream import stream

    def stop_on_term(*_: object) -> None:
        raise KeyboardInterrupt  # the summary is printed for SIGTERM too

    signal.signal(signal.SIGTERM, stop_on_term)
    try:
        summary = stream(endpoint, seconds=seconds, fps=fps, server_key=server_key,
                         client_key=client_key, on_event=click.echo)
    except ConnectionError as exc:
        raise SightlineError(str(exc)) from None
    failed = ", ".join(f"{k} {n}" for k, n in summary.not_results.items()) or "none"
    click.echo(f"{summary.sent} frames, {summary.results} results, failed: {failed}; "
               f"versions: {' -> '.join(summary.versions) or '-'}")
    sys.exit(1 if summary.failed else 0)



@click.command("conformance")
@click.argument("endpoint", default="tcp://127.0.0.1:5555")
@click.option("--server-key", type=click.Path(exists=True, dir_okay=False),
              help="The daemon's public key file (daemon.key), for a CURVE daemon.")
@click.option("--client-key", type=click.Path(exists=True, dir_okay=False),
              help="An enrolled headset's .key_secret file, for a CURVE daemon.")
@click.option("--timeout", type=float, default=5.0, show_default=True,
              help="Seconds to wait for each reply.")
def conformance(endpoint: str, server_key, client_key, timeout: float) -> None:
    """Check a running daemon against docs/protocol.md, section by section.

    Speaks the wire protocol as a client in another language would and prints PASS or
    FAIL per section, with the statement that failed. Exit status 1 on any failure. It
    ends by spending the headset's bad-request budget: that headset's frames are then
    RATE_LIMITED for some seconds, so point it at a daemon no one is streaming to."""
    from runtime.tools.conformance import NOT_CHECKED, run_conformance

    def show(section) -> None:
        verdict = "PASS" if not section.failures else "FAIL"
        click.echo(f"{verdict}  {section.title}  ({section.checks} checks)")
        for failure in section.failures:
            click.echo(f"      {failure}")

    try:
        sections = run_conformance(endpoint, server_key=server_key, client_key=client_key,
                                   timeout_s=timeout, report=show)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo("not checked: " + "; ".join(NOT_CHECKED)
               + ("" if server_key else "; §7.4 replacement (CURVE only)"))
    sys.exit(1 if any(s.failures for s in sections) else 0)
