"""The SDK without its I/O thread: the calling thread owns the socket (io_thread=False)."""

from __future__ import annotations

import threading
import time

import pytest

from runtime.client import Client


def test_direct_client_gets_results_with_no_thread_of_its_own(daemon, astronaut_640x480):
    before = {t.name for t in threading.enumerate()}
    with Client(daemon.endpoint, io_thread=False, max_in_flight=1) as client:
        assert "sightline-client-io" not in {t.name for t in threading.enumerate()} - before
        assert client.wait_connected(10)
        for _ in range(3):
            seq = client.send(astronaut_640x480)
            reply = client.recv(10)
            assert reply is not None and reply.ok and reply.seq == seq
            assert reply.detections  # the astronaut's face
            assert 0 < reply.round_trip_s < 10
        assert client.counters.results == 3 and client.in_flight == 0


def test_direct_client_window_and_not_sent_without_a_daemon(short_tmp, astronaut_640x480):
    with Client(f"ipc://{short_tmp}/nobody.sock", io_thread=False, max_in_flight=1) as client:
        assert not client.wait_connected(0.3)
        client.send(astronaut_640x480)  # nobody connected: IMMEDIATE refuses it at once
        reply = client.recv(1)
        assert reply is not None and reply.kind == "not_sent"
        assert client.in_flight == 0 and client.counters.not_sent == 1


def test_direct_client_reports_a_frame_lost_with_the_daemon(daemon_factory, astronaut_640x480):
    daemon = daemon_factory()
    with Client(daemon.endpoint, io_thread=False, reply_timeout=0.5) as client:
        assert client.wait_connected(10)
        daemon.stop(9)  # killed: the frame below can never be answered
        time.sleep(0.3)
        seq = client.send(astronaut_640x480)
        reply = client.recv(5)
        assert reply is not None and reply.seq == seq and reply.kind in ("lost", "not_sent")
        assert client.in_flight == 0


def test_direct_client_refuses_a_callback():
    with pytest.raises(ValueError, match="I/O thread"):
        Client("ipc:///tmp/unused.sock", io_thread=False, on_reply=print)
