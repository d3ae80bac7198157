"""Tools that are not the daemon: the demo (and its depth scene), the benchmark, the
backend comparison, latency tables, and the systemd installer.

They compose the daemon, the client SDK and the models packages; nothing in
runtime.daemon, runtime.client or runtime.models imports them.
"""
