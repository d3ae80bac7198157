"""Ed25519 envelopes: only the exact bytes an operator signed, with a trusted key, pass."""

from __future__ import annotations

import base64
import json
import stat

import pytest

from cloud_sync.signing import TrustedKeys, generate_signing_key, load_private_key, sign
from runtime.errors import ConfigError, UpdateRejected


@pytest.fixture
def keys(tmp_path):
    private, public = generate_signing_key(tmp_path, "ops")
    return load_private_key(private), TrustedKeys.load([public])


def test_signed_payload_verifies_and_comes_back_unchanged(keys):
    key, trusted = keys
    payload = {"type": "update", "version": "2.0", "nested": {"a": [1, 2]}}
    assert trusted.verify(json.dumps(sign(payload, key)).encode()) == payload


def test_private_key_is_readable_by_its_owner_only_and_never_overwritten(tmp_path):
    private, public = generate_signing_key(tmp_path, "ops")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="already exists"):
        generate_signing_key(tmp_path, "ops")


@pytest.mark.parametrize("tamper", [
    lambda e: {**e, "payload": e["payload"].replace("2.0", "2.1")},
    lambda e: {**e, "signature": base64.b64encode(b"\0" * 64).decode()},
    lambda e: {**e, "signature": "not base64!"},
])
def test_any_change_to_payload_or_signature_is_rejected(keys, tamper):
    key, trusted = keys
    envelope = tamper(sign({"version": "2.0"}, key))
    with pytest.raises(UpdateRejected, match="signature does not verify"):
        trusted.verify(envelope)


def test_key_not_in_the_trusted_set_is_rejected_by_id(keys, tmp_path):
    _, trusted = keys
    other, _ = generate_signing_key(tmp_path / "other", "mallory")
    envelope = sign({"version": "2.0"}, load_private_key(other))
    with pytest.raises(UpdateRejected, match=f"unknown key '{envelope['key_id']}'"):
        trusted.verify(envelope)


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'{"payload": "x"}',
                                 b'{"payload": 1, "key_id": "a", "signature": "b"}'])
def test_malformed_envelopes_are_rejected_with_a_reason(keys, raw):
    _, trusted = keys
    with pytest.raises(UpdateRejected):
        trusted.verify(raw)


def test_a_directory_of_public_keys_is_trusted_whole(tmp_path):
    generate_signing_key(tmp_path, "a")
    generate_signing_key(tmp_path, "b")
    assert len(TrustedKeys.load([tmp_path])) == 2


def test_no_trusted_keys_rejects_everything(keys):
    key, _ = keys
    with pytest.raises(UpdateRejected, match="trusts no keys"):
        TrustedKeys([]).verify(sign({"v": 1}, key))
