"""`sightline service install`: run the daemon under systemd on this device."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def service() -> None:
    """Run sightline as a systemd service on this device."""


@service.command("install")
@click.option("--user", default="sightline", show_default=True,
              help="Unprivileged account the daemon runs as (created if missing).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("/etc/sightline/sightline.toml"), show_default=True,
              help="Config file for the service (a default is written if missing).")
@click.option("--dry-run", is_flag=True, help="Print what it would do; change nothing.")
def service_install(user: str, config_path: Path, dry_run: bool) -> None:
    """Install the systemd service: unit, user, config, daemon key (root; see --dry-run)."""
    from runtime.tools.service_install import apply_plan, format_plan, plan_install, require_root

    if not dry_run:
        require_root()
    plan = plan_install(user=user, config=config_path)
    if dry_run:
        click.echo(format_plan(plan, dry_run=True))
    else:
        click.echo("installing the sightline service:")
        for note in plan.notes:
            click.echo(f"  note: {note}")
        apply_plan(plan, echo=click.echo)
    click.echo("then start it now and at every boot with:" if dry_run
               else "installed. Start it now and at every boot with:")
    for step in plan.next_steps:
        click.echo(f"  {step}")

