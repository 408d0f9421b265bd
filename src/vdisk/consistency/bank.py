"""A bank workload for MariaDB: concurrent transfers between accounts.

The sum of balances never changes.  Each transfer is one transaction that
also inserts its client-side sequence number; once COMMIT has returned, the
client logs "seq monotonic_ns".  Every transfer logged before a snapshot
began must be in a restored copy.

    python -m vdisk.consistency.bank SOCKET LOG [--threads 4]
"""
from __future__ import annotations

import argparse
import random
import signal
import threading
import time

import pymysql

ACCOUNTS = 100
START_BALANCE = 1000


def connect(socket: str):
    return pymysql.connect(unix_socket=socket, user="root", database="bank", autocommit=False)


def setup(socket: str) -> None:
    c = pymysql.connect(unix_socket=socket, user="root", autocommit=True)
    with c.cursor() as cur:
        cur.execute("CREATE DATABASE bank")
        cur.execute("USE bank")
        cur.execute("CREATE TABLE accounts (id INT PRIMARY KEY, balance BIGINT NOT NULL) ENGINE=InnoDB")
        cur.execute("CREATE TABLE transfers (seq BIGINT PRIMARY KEY, src INT, dst INT, amount INT) ENGINE=InnoDB")
        cur.executemany("INSERT INTO accounts VALUES (%s, %s)", [(i, START_BALANCE) for i in range(ACCOUNTS)])
    c.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("socket")
    ap.add_argument("log")
    ap.add_argument("--threads", type=int, default=4)
    a = ap.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    lock = threading.Lock()
    seq = [0]
    log = open(a.log, "a", buffering=1)

    def worker(n):
        r = random.Random(n)
        c = connect(a.socket)
        while not stop.is_set():
            with lock:
                seq[0] += 1
                s = seq[0]
            src, dst = r.sample(range(ACCOUNTS), 2)
            amount = r.randint(1, 50)
            with c.cursor() as cur:
                cur.execute("UPDATE accounts SET balance = balance - %s WHERE id = %s", (amount, src))
                cur.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (amount, dst))
                cur.execute("INSERT INTO transfers VALUES (%s, %s, %s, %s)", (s, src, dst, amount))
            c.commit()
            with lock:
                log.write("%d %d\n" % (s, time.monotonic_ns()))
        c.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(a.threads)]
    for t in threads:
        t.start()
    while not stop.is_set():
        time.sleep(0.1)
    for t in threads:
        t.join(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
