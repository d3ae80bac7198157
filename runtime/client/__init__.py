"""The headset's side of the link: the Python client SDK and a stand-in headset stream.

Imports only the shared vocabulary (protocol, results, curve_keys) and pyzmq/numpy, never
runtime.daemon or the engines, so a headset tool can ship it without the daemon's stack.
"""

from runtime.client.reply import ClientCounters, Reply
from runtime.client.sdk import Client, apply_curve, curve_options, ping_round_trips, query_info

__all__ = ["Client", "ClientCounters", "Reply", "apply_curve", "curve_options",
           "ping_round_trips", "query_info"]
