"""The control socket's client (vdisk.daemon.client) against real sockets:
a daemon whose listen queue is full must make clients wait and then say what
happened, never crash them (BlockingIOError from a Unix socket's connect)."""
import json
import os
import socket
import threading
import time

import pytest

from vdisk.config import Paths
from vdisk.daemon import client


@pytest.fixture
def stuck_server(tmp_path):
    """A listening socket with the smallest queue that never accepts, and
    that queue filled by connections that wait (a stopped daemon)."""
    paths = Paths.resolve(str(tmp_path))
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(paths.socket)
    srv.listen(0)
    fillers = []
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(paths.socket)
        except BlockingIOError:
            s.close()
            break
        fillers.append(s)
        assert len(fillers) < 100
    yield paths, srv, fillers
    for s in fillers:
        s.close()
    srv.close()


def test_full_listen_queue_times_out_with_a_clear_message(stuck_server):
    paths, _srv, _ = stuck_server
    t0 = time.monotonic()
    with pytest.raises(client.DaemonUnavailable) as e:
        client.call(paths, {"Action": "Ping"}, connect_timeout=0.5)
    assert time.monotonic() - t0 >= 0.5
    assert "did not accept a connection" in str(e.value) and "VDISK_CONNECT_TIMEOUT" in str(e.value)


def test_full_listen_queue_is_waited_out(stuck_server):
    paths, srv, fillers = stuck_server

    def daemon_wakes_up():
        """Accept (the queued, abandoned connections first) until one
        request has been answered."""
        time.sleep(0.4)
        srv.settimeout(10)
        while True:
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(5)
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                if data:
                    conn.sendall(json.dumps({"Echo": json.loads(data)["Action"]}).encode() + b"\n")
                    return

    t = threading.Thread(target=daemon_wakes_up)
    t.start()
    try:
        for s in fillers:  # the waiting clients give up: their places go to ours
            s.close()
        fillers.clear()
        t0 = time.monotonic()
        assert client.call(paths, {"Action": "Ping"}, timeout=10, connect_timeout=10) == {"Echo": "Ping"}
        assert time.monotonic() - t0 >= 0.3  # it waited for the queue (closed clients stay queued)
    finally:
        t.join(10)


def test_no_daemon_and_no_pool_is_an_error_not_a_new_pool(tmp_path):
    paths = Paths.resolve(str(tmp_path / "typo"))
    with pytest.raises(client.NoPool) as e:
        client.request(paths, {"Action": "DescribePool"})
    assert "holds no vdisk pool" in str(e.value)
    assert not os.path.exists(paths.data_dir)
    assert client.create_pool(paths) is True
    assert client.create_pool(paths) is False
    assert client.request(paths, {"Action": "DescribePool"})["Pool"]["Volumes"] == 0


def test_data_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(client.NoPool) as e:
        client.request(Paths.resolve(str(f)), {"Action": "DescribePool"})
    assert "not a directory" in str(e.value)
