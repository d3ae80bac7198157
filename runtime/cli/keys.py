"""`sightline keys ...`: CurveZMQ keys for the headset link (and the operator's signing
keys, `keys gen`, which cloud_sync provides)."""

from __future__ import annotations

from pathlib import Path

import click

from runtime.cli.lazy_group import LazyGroup


@click.group(cls=LazyGroup, lazy={"gen": "cloud_sync.cli:keys_gen"})
def keys() -> None:
    """CurveZMQ keys for the headset link: the daemon's keypair and enrolled headsets.

    \b
    On the edge device:
      sightline keys daemon              make the daemon's keypair (once)
      sightline keys headset quest-01    make a headset keypair and enrol it
      sightline keys list                enrolled headsets
      sightline keys revoke quest-01     takes effect within a second, no restart
    Give the headset its .key_secret file and the daemon's public daemon.key.
    """


def _keys_dir(directory: str | None) -> Path:
    from runtime.curve_keys import keys_dir

    return Path(directory) if directory else keys_dir()


_keys_option = click.option("--keys", "keys_dir", type=click.Path(file_okay=False),
                            help="Key directory (default: $SIGHTLINE_KEYS_DIR or "
                                 "~/.config/sightline/keys).")


@keys.command("daemon")
@_keys_option
def keys_daemon(keys_dir) -> None:
    """Create the daemon's long-term keypair."""
    from runtime.curve_keys import DAEMON_KEY_NAME, create_keypair

    public, secret = create_keypair(_keys_dir(keys_dir), DAEMON_KEY_NAME)
    click.echo(f"daemon public key: {public}  (give this file to headsets)")
    click.echo(f"daemon secret key: {secret}  (stays on this device, mode 0600)")


@keys.command("headset")
@click.argument("name")
@_keys_option
@click.option("--out", type=click.Path(file_okay=False), help="Where to write the headset's "
              "keypair (default: KEYS/issued).")
@click.option("--no-enroll", is_flag=True, help="Only create the keypair.")
def keys_headset(name, keys_dir, out, no_enroll) -> None:
    """Create a headset keypair and enrol its public key."""
    from runtime.curve_keys import HEADSETS_DIR, create_keypair, enroll

    directory = _keys_dir(keys_dir)
    public, secret = create_keypair(Path(out) if out else directory / "issued", name)
    click.echo(f"headset secret key: {secret}  (install on the headset, keep private)")
    if not no_enroll:
        click.echo(f"enrolled: {enroll(public, directory / HEADSETS_DIR, name)}")


@keys.command("enroll")
@click.argument("certificate", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", help="Name for the headset (default: the file's name).")
@_keys_option
def keys_enroll(certificate, name, keys_dir) -> None:
    """Allow a headset by its public certificate file (NAME.key)."""
    from runtime.curve_keys import HEADSETS_DIR, enroll

    click.echo(f"enrolled: {enroll(Path(certificate), _keys_dir(keys_dir) / HEADSETS_DIR, name)}")


@keys.command("revoke")
@click.argument("name")
@_keys_option
def keys_revoke(name, keys_dir) -> None:
    """Remove a headset from the allow-list; a running daemon applies it within a second."""
    from runtime.curve_keys import HEADSETS_DIR, revoke

    revoke(name, _keys_dir(keys_dir) / HEADSETS_DIR)
    click.echo(f"revoked {name}")


@keys.command("list")
@_keys_option
def keys_list(keys_dir) -> None:
    """List enrolled headsets and their public keys."""
    from runtime.curve_keys import HEADSETS_DIR, enrolled

    headsets = enrolled(_keys_dir(keys_dir) / HEADSETS_DIR)
    if not headsets:
        click.echo("no headsets enrolled")
    for name, public in headsets:
        click.echo(f"{name}  {public}")

