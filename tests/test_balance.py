"""Connection shares between supervised workers (service.balance): the rule, one worker's protocol against a
peer's cell the test sets, and two real workers behind one port."""

from __future__ import annotations

import http.client
import threading
from pathlib import Path

import pytest

from bench.harness import free_port, start_service, wait_ready
from service.balance import NOT_LISTENING, ConnectionShares
from tests.images import encode, one_per_class
from tests.procfs import socket_inodes, tcp_sockets
from tests.test_server_process import two_workers_listening, wait_for

PNG = encode(one_per_class()[2][0], "PNG")


def shares_of(tmp_path: Path, cells: list[int]) -> ConnectionShares:
    path = tmp_path / "shares.bin"
    ConnectionShares.create(path, len(cells))
    shares = ConnectionShares(path, 0)
    for i, c in enumerate(cells):
        shares.cells[i] = c
    return shares


@pytest.mark.parametrize(("cells", "over"), [
    ([2, 0], True),  # both clients on this worker, the other idle
    ([1, 1], False),
    ([2, 1], False),  # three connections: two is ceil(3 / 2), a fair share
    ([3, 1], True),
    ([17, 15], True),
    ([16, 16], False),
    ([3, 0, 0], True),
    ([1, 1, 0], False),
    ([2, NOT_LISTENING], False),  # the other worker is loading: a new connection could only come back here
    ([NOT_LISTENING, 0], False),  # this one is draining
    ([5], False),  # alone
])
def test_over_share_when_holding_more_than_the_ceiling_of_an_equal_split(tmp_path, cells, over):
    assert shares_of(tmp_path, cells).over_share() is over, cells


@pytest.fixture
def worker_of_two(default_model, tmp_path):
    """A real uvicorn server in this process as a supervised worker configures it (cell 0 of a shares file);
    cell 1, the other worker, is the test's to set."""
    from service.__main__ import SharingServer, uvicorn_config
    from service.app import create_app
    from service.settings import Settings

    shares, port = shares_of(tmp_path, [NOT_LISTENING, NOT_LISTENING]), free_port()
    settings = Settings(model_path=default_model, port=port, grpc_port=0)
    server = SharingServer(uvicorn_config(settings, create_app(settings), shares), shares)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_ready(f"http://127.0.0.1:{port}", timeout=60)
    assert wait_for(lambda: shares.cells[0] == 0), list(shares.cells)  # listening, readiness's client gone
    yield port, shares
    server.should_exit = True
    thread.join(30)


def predict(conn: http.client.HTTPConnection) -> http.client.HTTPResponse:
    conn.request("POST", "/predict", body=PNG, headers={"content-type": "image/png"})
    r = conn.getresponse()
    r.read()
    assert r.status == 200, r.status
    return r


@pytest.mark.parametrize(("peer", "connections", "closed"), [
    (0, 2, 1),  # 2 of 2 here: one leaves
    (0, 3, 2),  # 3 of 3: two leave, one at a time, down to ceil(1 / 2)
    (1, 3, 1),  # 3 of 4: one leaves
    (5, 3, 0),  # 3 of 8: under its share
    (NOT_LISTENING, 3, 0),  # the other worker is not listening: nowhere to go
])
def test_worker_over_its_share_closes_connections_after_answering(worker_of_two, peer, connections, closed):
    port, shares = worker_of_two
    shares.cells[1] = peer
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(connections)]
    for conn in conns:
        conn.connect()
    assert wait_for(lambda: shares.cells[0] == connections), list(shares.cells)
    answers = [predict(conn).getheader("connection") for conn in conns]
    assert answers.count("close") == closed, answers
    assert all(a in ("close", None) for a in answers), answers
    # The server closed those it told to; the others stay open and count, with none still leaving.
    assert wait_for(lambda: shares.cells[0] == connections - closed and shares.leaving == 0), \
        (list(shares.cells), shares.leaving)
    for conn in conns:  # the kept ones are still usable; the closed ones reconnect (http.client's auto_open)
        predict(conn)
        conn.close()


def server_side_inodes(server_port: int, client_ports: list[int]) -> dict[int, str]:
    """client port -> the inode of the server's end of that loopback connection."""
    return {remote: inode for local, remote, _, inode in tcp_sockets()
            if local == server_port and remote in client_ports}


def test_two_workers_end_up_holding_equal_shares_of_keep_alive_clients(tmp_path):
    """Eight keep-alive clients: the kernel's hash leaves them split 4/4 only about a quarter of the time; each
    worker over its share closes one after answering, and the clients' new connections are hashed anew."""
    server = start_service({"RESNET_WORKERS": "2", "RESNET_INTRA_OP_THREADS": "1"}, tmp_path / "server.log")
    conns = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=30) for _ in range(8)]
    try:
        server.wait_ready()
        workers = wait_for(lambda: two_workers_listening(server.proc.pid, server.port), 60)
        assert workers, server.log_tail()

        def split() -> list[int]:
            """Connections per worker, once those told to close have connected again."""
            for c in conns:
                if c.sock is None:
                    c.connect()
            ports = [c.sock.getsockname()[1] for c in conns]
            inodes = set(wait_for(lambda: len(found := server_side_inodes(server.port, ports)) == len(ports)
                                  and found).values())
            return sorted(len(socket_inodes(pid) & inodes) for pid in workers)

        closes, shares = 0, None
        for _ in range(40):
            closes += sum(predict(c).getheader("connection") == "close" for c in conns)
            shares = split()
            if shares == [4, 4]:
                break
        assert shares == [4, 4], (shares, closes, server.log_tail())
        for _ in range(3):  # balanced, it stays put: no more closes
            assert all(predict(c).getheader("connection") is None for c in conns), closes
    finally:
        for c in conns:
            c.close()
        code = server.stop()
    assert code == 0, server.log_tail()


def test_publish_after_stop_listening_leaves_the_worker_out(tmp_path):
    """A draining worker's connections close one by one; their counts must not make it look listening again."""
    shares = shares_of(tmp_path, [NOT_LISTENING, 4])
    shares.listen(3)
    assert shares.cells[0] == 3
    shares.stop_listening()
    shares.publish(2)
    assert shares.cells[0] == NOT_LISTENING, list(shares.cells)


def test_vacate_leaves_a_dead_workers_count_out(tmp_path):
    """The supervisor's call for a worker that died: the count it published last is no share the others owe."""
    shares = shares_of(tmp_path, [2, NOT_LISTENING])
    dead = ConnectionShares(tmp_path / "shares.bin", 1)
    dead.listen(5)
    assert shares.cells[1] == 5 and not shares.over_share(), list(shares.cells)
    ConnectionShares.vacate(tmp_path / "shares.bin", 1)
    assert list(shares.cells) == [2, NOT_LISTENING]
