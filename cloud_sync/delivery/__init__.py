"""Ways a signed update's bundle reaches the device (MQTT chunks, HTTP(S) download).

Each method only moves bytes into a file; the updater checks the signed manifest's size
and sha256 afterwards, so no method trusts the server it fetched from.
"""

from runtime.errors import SightlineError


class DeliveryError(SightlineError):
    """A bundle could not be fetched; the message says why and what to do."""
