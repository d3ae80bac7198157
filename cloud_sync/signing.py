"""Ed25519 signatures on OTA commands: the operator signs, every device verifies.

A command travels as an envelope `{"payload": "<JSON text>", "key_id", "signature"}`.
The signature covers the payload's exact UTF-8 bytes (no re-serialisation on either
side), so nothing between the operator and the device can change a byte unnoticed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from runtime.errors import ConfigError, UpdateRejected

PRIVATE_SUFFIX = ".ed25519"
PUBLIC_SUFFIX = ".ed25519.pub"


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: the first 16 hex digits of its sha256."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_signing_key(directory: Path, name: str) -> tuple[Path, Path]:
    """Write NAME.ed25519 (private, mode 0600) and NAME.ed25519.pub; refuse to overwrite."""
    directory.mkdir(parents=True, exist_ok=True)
    private_path = directory / f"{name}{PRIVATE_SUFFIX}"
    public_path = directory / f"{name}{PUBLIC_SUFFIX}"
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path} already exists; pick another name or move it away "
                              "(a device trusting the old key would reject new updates)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise ConfigError(f"no signing key at {path}; make one with `sightline keys gen`") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key (OTA commands are signed with Ed25519)")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"trusted key {path} does not exist") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} is not an Ed25519 public key")
    return key


class TrustedKeys:
    """The public keys a device accepts OTA commands from, by key id."""

    def __init__(self, keys: Iterable[Ed25519PublicKey]) -> None:
        self._keys = {key_id(k): k for k in keys}

    @classmethod
    def load(cls, paths: Iterable[Path]) -> TrustedKeys:
        """Public key files, or directories whose *.ed25519.pub files are all trusted."""
        keys = []
        for path in map(Path, paths):
            if path.is_dir():
                keys += [load_public_key(p) for p in sorted(path.glob(f"*{PUBLIC_SUFFIX}"))]
            else:
                keys.append(load_public_key(path))
        return cls(keys)

    @property
    def ids(self) -> list[str]:
        return sorted(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def verify(self, envelope: bytes | Mapping[str, Any]) -> dict[str, Any]:
        """The payload of a correctly signed envelope; UpdateRejected saying why otherwise."""
        if isinstance(envelope, (bytes, bytearray)):
            try:
                envelope = json.loads(envelope)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise UpdateRejected(f"command is not JSON: {exc}") from None
        if not isinstance(envelope, Mapping) or not {"payload", "key_id", "signature"} <= set(
                envelope):
            raise UpdateRejected("command is not a signed envelope (needs payload, key_id, "
                                 "signature); sign it with `sightline push`")
        payload, kid, signature = envelope["payload"], envelope["key_id"], envelope["signature"]
        if not all(isinstance(v, str) for v in (payload, kid, signature)):
            raise UpdateRejected("envelope fields payload, key_id and signature must be strings")
        key = self._keys.get(kid)
        if key is None:
            raise UpdateRejected(
                f"signed with unknown key {kid!r}; this device trusts "
                f"{', '.join(self.ids) or 'no keys'} (add the operator's .ed25519.pub to "
                "cloud.trusted_keys)")
        try:
            key.verify(base64.b64decode(signature, validate=True), payload.encode())
        except (InvalidSignature, ValueError):
            raise UpdateRejected(f"signature does not verify with key {kid}: the command was "
                                 "altered or signed with another key") from None
        try:
            document = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise UpdateRejected(f"signed payload is not JSON: {exc}") from None
        if not isinstance(document, dict):
            raise UpdateRejected("signed payload is not a JSON object")
        return document


def sign(payload: Mapping[str, Any], private_key: Ed25519PrivateKey) -> dict[str, str]:
    """The envelope for `payload`, ready to publish as JSON."""
    text = json.dumps(payload, separators=(",", ":"), sort_keys=True)
    signature = private_key.sign(text.encode())
    return {"payload": text, "key_id": key_id(private_key.public_key()),
            "signature": base64.b64encode(signature).decode()}


def describe_unverified(raw: bytes) -> dict[str, Any]:
    """What a refused command says about itself, for correlating the rejection: the
    sha256 of the bytes received and, under `unverified`, the ids it claims (read without
    trusting the signature; strings cut to 64 characters)."""
    summary: dict[str, Any] = {"command_sha256": hashlib.sha256(raw).hexdigest()}
    try:
        envelope = json.loads(raw)
        payload = json.loads(envelope["payload"]) if isinstance(envelope, dict) else None
    except (ValueError, TypeError, KeyError):
        return summary
    claims: dict[str, Any] = {}
    if isinstance(envelope.get("key_id"), str):
        claims["key_id"] = envelope["key_id"][:64]
    if isinstance(payload, dict):
        for field in ("type", "update_id", "command_id", "model", "version", "to_version"):
            if isinstance(payload.get(field), str):
                claims[field] = payload[field][:64]
        if isinstance(payload.get("issued_at"), (int, float)):
            claims["issued_at"] = payload["issued_at"]
    if claims:
        summary["unverified"] = claims
    return summary
