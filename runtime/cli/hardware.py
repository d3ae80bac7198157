"""`sightline devices`: what hardware this is and the profile compile and serve use."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console


@click.command("devices")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--profiles", "profiles_path", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML file whose [profiles.<class>] tables override the profile defaults.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=Path("/"),
              hidden=True, help="Read /etc and /proc under this directory (captured files).")
def devices_command(as_json: bool, profiles_path: Path | None, root: Path) -> None:
    """Show this machine's Jetson/GPU/CPU and the device profile compile and serve use."""
    import json
    from dataclasses import asdict

    from devices.platform import detect_platform
    from devices.profiles import ProfileError, load_overrides, profile_for
    from runtime.errors import ConfigError

    platform = detect_platform(root)
    try:
        overrides = load_overrides(profiles_path) if profiles_path else None
        profile = profile_for(platform, overrides)
    except ProfileError as exc:
        raise ConfigError(str(exc)) from None
    if as_json:
        click.echo(json.dumps({"kind": platform.kind, **asdict(platform),
                               "profile": profile.to_dict()}, indent=2))
        return
    _print_devices(platform, profile)


def _print_devices(platform, profile) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()

    def row(label: str, value: str, style: str = "") -> None:
        table.add_row(label, Text(value, style=style))  # Text: "[tensorrt]" is not markup

    row("kind", platform.kind)
    jetson = platform.jetson
    if jetson is not None:
        row("model", jetson.model)
        row("module", jetson.module + (" (Super)" if jetson.super_mode else ""))
        row("L4T / JetPack", f"{jetson.l4t or 'unknown'} / {jetson.jetpack or 'unknown'}")
        row("GPU", f"{jetson.gpu or 'unknown'} (integrated, {jetson.soc or '?'})")
        row("compute capability", jetson.compute_capability or "unknown")
        row("memory", f"{jetson.memory_mb} MiB, shared with the CPU"
            if jetson.memory_mb else "unknown")
        row("DLA cores", str(jetson.dla_cores))
    for gpu in platform.gpus:
        row(f"GPU {gpu.index}", f"{gpu.name}, {gpu.compute_capability}, {gpu.memory_mb} MiB")
    if platform.driver_version:
        row("driver", platform.driver_version)
    if platform.gpu_problem:
        row("GPUs", platform.gpu_problem, "yellow")
    row("usable CPUs", str(platform.cpu_count))
    row("", "")
    row("profile", profile.name)
    row("precision", profile.precision)
    row("backends", " > ".join(profile.backends))
    row("TensorRT workspace",
        f"{profile.workspace_mb} MB" if "tensorrt" in profile.backends else "-")
    row("DLA", f"{profile.dla_cores} core(s)" if profile.has_dla else "none")
    row("builds for", profile.compute_capability or "-")
    Console().print(table)

