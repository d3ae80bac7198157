"""CurveZMQ key files for the headset link: keypairs, the enrolled-headset directory.

Shared by the daemon, the client SDK and the CLI, so it imports only zmq. No home-made
crypto: libzmq's CURVE does the handshake and encryption; the daemon's ZAP handler is
in runtime/daemon/security.py.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import platformdirs
import zmq
import zmq.auth

from runtime.errors import ConfigError

DAEMON_KEY_NAME = "daemon"
HEADSETS_DIR = "headsets"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def keys_dir() -> Path:
    """Default key directory; SIGHTLINE_KEYS_DIR overrides."""
    return Path(os.environ.get("SIGHTLINE_KEYS_DIR")
                or Path(platformdirs.user_config_dir("sightline")) / "keys")


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ConfigError(f"{name!r} is not a valid key name (letters, digits, . _ -)")
    return name


def create_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key (public) and NAME.key_secret (secret, mode 0600); refuse to overwrite."""
    directory = Path(directory)
    _check_name(name)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    if public.exists() or secret.exists():
        raise ConfigError(f"{public} already exists; delete it first to make a new keypair "
                          "(every headset enrolled with the old daemon key must be re-issued)")
    directory.mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return public, secret


def load_public_key(path: Path) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read a CURVE certificate from {path}: {exc}") from None
    return public


def load_keypair(secret_path: Path) -> tuple[bytes, bytes]:
    try:
        public, secret = zmq.auth.load_certificate(secret_path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read a CURVE secret key from {secret_path}: {exc}") from None
    if secret is None:
        raise ConfigError(f"{secret_path} holds only a public key; give the .key_secret file")
    return public, secret


def enroll(certificate: Path, headsets_dir: Path, name: str | None = None) -> Path:
    """Allow a headset: copy its PUBLIC certificate into the allow-list directory."""
    public = load_public_key(certificate)
    name = _check_name(name or Path(certificate).name.split(".")[0])
    target = Path(headsets_dir) / f"{name}.key"
    if target.exists():
        raise ConfigError(f"a headset named {name!r} is already enrolled ({target})")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write only the public part, even when handed a secret file by mistake.
    staging = target.with_suffix(".partial")
    staging.write_text("metadata\ncurve\n    public-key = \"" + public.decode() + "\"\n")
    os.replace(staging, target)
    return target


def revoke(name: str, headsets_dir: Path) -> None:
    target = Path(headsets_dir) / f"{_check_name(name)}.key"
    if not target.exists():
        raise ConfigError(f"no headset named {name!r} is enrolled in {headsets_dir}")
    target.unlink()


def enrolled(headsets_dir: Path) -> list[tuple[str, str]]:
    """(name, public key in Z85) of every enrolled headset."""
    directory = Path(headsets_dir)
    if not directory.is_dir():
        return []
    return [(p.name[: -len(".key")], load_public_key(p).decode())
            for p in sorted(directory.glob("*.key"))]


def make_curve_server(socket: zmq.Socket, secret_path: Path) -> None:
    public, secret = load_keypair(secret_path)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True


def make_curve_client(socket: zmq.Socket, server_public: bytes, client_secret_path: Path) -> None:
    public, secret = load_keypair(client_secret_path)
    socket.curve_serverkey = server_public
    socket.curve_publickey = public
    socket.curve_secretkey = secret


def throwaway_keys(directory: Path) -> tuple[Path, dict[str, Path]]:
    """A daemon key directory with one enrolled headset, for demos and benchmarks.

    Returns (keys_dir for the daemon, keyword arguments for runtime.client.Client).
    """
    keys = Path(directory) / "keys"
    daemon_public, _ = create_keypair(keys, DAEMON_KEY_NAME)
    headset_public, headset_secret = create_keypair(Path(directory) / "headset", "headset")
    enroll(headset_public, keys / HEADSETS_DIR)
    return keys, {"server_key": daemon_public, "client_key": headset_secret}
