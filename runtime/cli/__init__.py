"""`sightline` command line: one module per command group, each a thin layer over the
package that does the work.

The CLI is where runtime, exporters and cloud_sync meet: commands are imported lazily
(LazyGroup), and each imports its heavy modules inside the command, so `sightline --help`
stays fast everywhere. Any SightlineError becomes one red line and exit code 2.
"""

from __future__ import annotations

import sys

import click
from rich.markup import escape

from runtime import __version__
from runtime.cli.console import err_console
from runtime.cli.lazy_group import LazyGroup
from runtime.errors import SightlineError

COMMANDS = {
    "serve": "runtime.cli.serve:serve",
    "status": "runtime.cli.serve:status",
    "ping": "runtime.cli.headset:ping",
    "stream": "runtime.cli.headset:stream_command",
    "conformance": "runtime.cli.headset:conformance",
    "import": "runtime.cli.bundles:import_model",
    "export": "runtime.cli.bundles:export_model",
    "info": "runtime.cli.bundles:info",
    "fetch": "runtime.cli.bundles:fetch",
    "quantize": "runtime.cli.variants:quantize",
    "compile": "runtime.cli.variants:compile_command",
    "compare": "runtime.cli.variants:compare",
    "devices": "runtime.cli.hardware:devices_command",
    "keys": "runtime.cli.keys:keys",
    "service": "runtime.cli.service:service",
    "demo": "runtime.cli.tools:demo",
    "bench": "runtime.cli.tools:bench",
    # The fleet operator's commands live with the MQTT code they drive.
    "push": "cloud_sync.cli:push",
    "rollback": "cloud_sync.cli:rollback",
    "fleet": "cloud_sync.cli:fleet",
    "cloud": "cloud_sync.service.cli:cloud",
}


class _Group(LazyGroup):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SightlineError as exc:
            # escape: messages contain brackets like sightline[tensorrt] that rich would eat
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            sys.exit(2)


@click.group(cls=_Group, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sightline")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def main(log_level: str) -> None:
    """Sightline: on-device inference for AR headsets.

    \b
    Quick start:
      sightline demo                 fetch the default model, stream a demo sequence
      sightline serve                serve the default model on tcp://127.0.0.1:5555
      sightline import M.onnx --task face|detect|raw   make a bundle from an ONNX file
    """
    from runtime.daemon.journal import configure_logging

    configure_logging(log_level)  # structured journald records under systemd, else stderr
