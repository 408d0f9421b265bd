"""Fuzzers that stay: the control socket, the CLI's arguments and every
cloud action's parameters through `vdisk api`, against a real daemon with a
disk whose data must read back intact (root, FUSE, loop devices).

Each test runs VDISK_FUZZ_EXAMPLES hypothesis examples (default 150: a short
run for CI).  The long run, by hand (docs/testing.md):

    VDISK_FUZZ_EXAMPLES=20000 scripts/test -k fuzz -s

Invariants checked after every example: the daemon process is the same and
answers; the guarded disk's data reads back intact; no answer is an InternalError or a 5xx; a batch whose every request
was refused changed nothing in the catalogue; the CLI exits 0-3 (never 4,
never a traceback).  At the end: the daemon's log holds no traceback.  Each test prints its figures.
"""
from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import random
import re
import socket
import subprocess
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdiskenv import VDiskEnv, need_root_fuse_loop

pytestmark = pytest.mark.root
EXAMPLES = int(os.environ.get("VDISK_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False, database=None,
                suppress_health_check=list(HealthCheck))


def _actions() -> list[str]:
    from vdisk.control.controller import Controller

    return sorted(n[3:] for n in dir(Controller) if n.startswith("do_")) + ["Ping"]


def _params() -> list[str]:
    """Every parameter name the control plane reads, from its source: the
    fuzz reaches each action's parameters without a hand-kept list."""
    import vdisk.control as control

    src = "".join(open(f).read() for f in glob.glob(os.path.join(os.path.dirname(control.__file__), "*.py")))
    names = set(re.findall(r'p\.(?:str|int|bool|list|name|description|struct_list)\(\s*"([A-Za-z.]+)"', src))
    names |= set(re.findall(r'self\._(?:instance|disk|snapshot|group|image)\(\s*\w+,\s*"([A-Za-z]+)"', src))
    names |= {"InstanceId", "DiskId", "SnapshotId", "ImageId", "SnapshotGroupId", "Size", "Category",
              "PerformanceLevel", "DiskName", "SnapshotName", "Force", "DryRun", "Description",
              "SystemDisk.Description", "SystemDisk.DiskName", "DataDisk.1.Description", "DataDisk.1.DiskName",
              "DataDisk.1.DeleteWithInstance",
              "DataDisk.1.Size", "DataDisk.1.Category", "DataDisk.1.PerformanceLevel", "DataDisk.1.SnapshotId",
              "DataDisk.2.Size", "Disk.1.DiskId", "Disk.1.SnapshotId", "DiskDeviceMapping.1.SnapshotId",
              "DiskDeviceMapping.1.DiskType", "DiskId.1", "ExcludeDiskId.1", "DiskIds.1", "Status.1",
              "SystemDisk.Size", "SystemDisk.Category", "SystemDisk.PerformanceLevel", "BlockIndex"}
    return sorted(names)


ACTIONS = _actions()
PARAMS = _params()
SURROGATES = ["\ud800", "\udcff", "a\udfffb"]


# ------------------------------------------------------------ the daemon under fire


class Target:
    """A daemon with a guarded instance (its disk held open, known data on
    it, ids never given to the fuzzer) and a playground instance whose ids
    the fuzzer gets, so that it reaches past the id checks."""

    def __init__(self):
        self.env = VDiskEnv(prefix="vdisk-fuzz-")
        self.env.start("--http", "127.0.0.1:0")
        self.pid = self.env.daemon_pid()
        env = self.env
        self.http_port = int(env.j("daemon", "status")["Http"].rsplit(":", 1)[1])
        self.key = env.j("accesskey", "create")
        giid, (gdisk,) = env.instance(ndata=1, name="guarded")
        env.run("instance", "start", giid)
        self.path = env.run("disk", "path", gdisk).stdout.strip()
        self.data = os.urandom(2 << 20)
        self.fd = os.open(self.path, os.O_RDWR)  # held: Shutdown without Force is refused
        os.pwrite(self.fd, self.data, 0)
        os.fsync(self.fd)
        self.iid, disks = env.instance(ndata=2, name="playground")
        self.disks = disks
        self.snap = env.run("snapshot", "create", disks[0]).stdout.strip()
        self.group = env.run("snapshot-group", "create", self.iid).stdout.strip()
        self.ids = [self.iid, *disks, self.snap, self.group]
        self.stats = {"messages": 0, "answers": 0, "refused": 0, "done": 0, "internal_errors": 0, "crashes": 0}

    def sock(self):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(60)
        s.connect(os.path.join(self.env.data, "control.sock"))
        return s

    def ask(self, req: dict) -> dict:
        with self.sock() as s:
            s.sendall(json.dumps(req).encode() + b"\n")
            return json.loads(s.makefile("rb").readline())

    def catalogue(self):
        out = []
        for action, path in (("DescribeInstances", ("Instances", "Instance")), ("DescribeDisks", ("Disks", "Disk")),
                             ("DescribeSnapshots", ("Snapshots", "Snapshot")), ("DescribeImages", ("Images", "Image")),
                             ("DescribeSnapshotGroups", ("SnapshotGroups", "SnapshotGroup"))):
            res = self.ask({"Action": action, "MaxResults": 100})
            rows = res[path[0]][path[1]]
            out.append(sorted(json.dumps(r, sort_keys=True) for r in rows))
        return out

    def check_alive(self):
        """The same daemon answers, and the guarded disk reads back intact."""
        try:
            os.kill(self.pid, 0)
            assert self.ask({"Action": "Ping"})["Pid"] == self.pid
        except (OSError, AssertionError, ValueError):
            self.stats["crashes"] += 1
            raise AssertionError("the daemon died or stopped answering; stats %s" % self.stats) from None
        assert os.pread(self.fd, len(self.data), 0) == self.data, "the guarded disk's data changed"

    def check_answer(self, ans, what):
        assert isinstance(ans, dict), (what, ans)
        self.stats["answers"] += 1
        if "Code" in ans:
            self.stats["refused"] += 1
            if ans["Code"] == "InternalError" or ans.get("HttpStatus", 400) >= 500:
                self.stats["internal_errors"] += 1
                raise AssertionError("internal error for %r: %s" % (what, ans))
            assert ans.get("Message"), ans
        else:
            self.stats["done"] += 1

    def finish(self, name):
        self.check_alive()
        with open(os.path.join(self.env.data, "daemon.log")) as f:
            log = f.read()
        assert "Traceback" not in log and "internal error" not in log.lower(), log[-3000:]
        print("\nfuzz %s: %s" % (name, json.dumps(self.stats)))

    def close(self):
        try:
            os.close(self.fd)
        finally:
            self.env.close()


@pytest.fixture(scope="module")
def target():
    need_root_fuse_loop()
    t = Target()
    try:
        yield t
    finally:
        t.close()


# ------------------------------------------------------------ strategies

odd_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\n", "abc\n", "-1", "0", "²", "9" * 25, "9" * 5000, "null", "[]", "{}", "true",
                     "../../etc/passwd", "d-" + "a" * 20, "PL0", "cloud_essd", "x" * 300, "\x00", "http://x"]),
    st.sampled_from(SURROGATES),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**30), max_value=10**30),
                    st.floats(allow_nan=False, allow_infinity=False), odd_text)


def json_values(ids):
    base = st.one_of(scalars, st.sampled_from(ids))
    return st.recursive(base, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                     st.dictionaries(st.text(max_size=10), kids, max_size=4)),
                        max_leaves=12)


def _templates(t) -> list[dict]:
    """Requests that succeed as they are (on the playground), for mutation."""
    d0, d1 = t.disks
    d2 = d1
    return [
        {"Action": "CreateDisk", "Size": 20, "DiskName": "fuzzdisk", "Description": "made by the fuzzer"},
        {"Action": "CreateDisk", "SnapshotId": t.snap, "DiskCategory": "cloud_essd", "PerformanceLevel": "PL0"},
        {"Action": "DescribeDisks", "DiskIds": json.dumps([d0, d1]), "PageSize": 2, "PageNumber": 1},
        {"Action": "DescribeSnapshots", "DiskId": d0, "MaxResults": 10},
        {"Action": "CreateSnapshot", "DiskId": d1, "SnapshotName": "fuzzsnap", "RetentionDays": 3},
        {"Action": "ModifyDiskAttribute", "DiskId": d2, "DiskName": "renamed", "DeleteWithInstance": "true"},
        {"Action": "CreateSnapshotGroup", "InstanceId": t.iid, "DiskId.1": d0, "Name": "fuzzgroup"},
        {"Action": "DescribeSnapshotGroups", "InstanceId": t.iid, "Status.1": "accomplished"},
        {"Action": "ResizeDisk", "DiskId": d2, "NewSize": 2},
        {"Action": "ListChangedBlocks", "SecondSnapshotId": t.snap},
        {"Action": "GetSnapshotBlock", "SnapshotId": t.snap, "BlockIndex": 0},
        {"Action": "CreateInstance", "SystemDisk.Size": 1, "SystemDisk.PerformanceLevel": "PL0",
         "DataDisk.1.Size": 1, "DataDisk.1.PerformanceLevel": "PL0", "InstanceName": "fuzzinst"},
        {"Action": "DescribeInstances", "InstanceIds": [t.iid]},
        {"Action": "DescribePool"},
        {"Action": "DescribeSnapshotUsage"},
    ]


def requests(t):
    ids = t.ids

    def build(action, params):
        req = dict(params)
        req["Action"] = action
        if action == "Shutdown" and req.get("Force") is True:
            req["Force"] = "no"  # a valid forced shutdown would end the run, not find a bug
        return req

    def mutate(template, key, value, drop):
        req = dict(template)
        if drop and key in req and key != "Action":
            del req[key]
        else:
            req[key] = value
        return build(req.pop("Action"), req) if isinstance(req.get("Action"), str) else req

    random_req = st.builds(build, st.one_of(st.sampled_from(ACTIONS + ["Shutdown"]), odd_text, json_values(ids)),
                           st.dictionaries(st.one_of(st.sampled_from(PARAMS), st.text(max_size=12)), json_values(ids),
                                           max_size=6))
    templates = st.sampled_from(_templates(t))
    mutated = templates.flatmap(lambda tpl: st.builds(
        mutate, st.just(tpl), st.one_of(st.sampled_from(sorted(tpl)), st.sampled_from(PARAMS)), json_values(ids),
        st.booleans()))
    return st.one_of(random_req, mutated, templates)
def raw_lines():
    return st.one_of(
        st.binary(max_size=200),
        st.builds(lambda n, c: (c * n).encode(), st.integers(1, 50000), st.sampled_from(["[", "{\"a\":", "\"", "-"])),
        st.builds(lambda b: b"\xff\xfe" + b + b"\xc0\xaf", st.binary(max_size=50)),
        st.just(b"{\"Action\": \"DescribeDisks\", \"MaxResults\": 1e999}"),
    )


def messages(t):
    one = st.one_of(requests(t).map(lambda r: ("json", json.dumps(r).encode())), raw_lines().map(lambda b: ("raw", b)))
    return st.tuples(st.lists(one, min_size=1, max_size=5), st.sampled_from(["whole", "half", "bytewise", "big"]))


# ------------------------------------------------------------ the fuzzers


def test_fuzz_control_socket(target):
    baseline = [target.catalogue()]

    @FUZZ
    @given(messages(target))
    def run(batch):
        msgs, mode = batch
        payload = b"".join(m.replace(b"\n", b" ") + b"\n" for _, m in msgs)
        expected = len(msgs)
        if mode == "big":  # past the request limit, without a newline
            payload, expected = payload.replace(b"\n", b" ") + b"y" * ((1 << 20) + 10), 1
        with target.sock() as s:
            if mode == "half":  # half a line, then hang up
                s.sendall(payload[: max(1, len(payload) // 2)].split(b"\n")[0])
                target.stats["messages"] += 1
                return_answers = []
            else:
                sender = None
                try:
                    if mode == "bytewise":
                        # sent from a thread while the answers are read here:
                        # large answers (GetSnapshotBlock's 64 KiB) fill the
                        # socket's buffers, and a client that only sends would
                        # wait on a daemon waiting for it to read
                        def dribble():
                            for i in range(0, len(payload), 7):
                                s.sendall(payload[i : i + 7])

                        sender = threading.Thread(target=dribble)
                        sender.start()
                    else:
                        s.sendall(payload)
                except BrokenPipeError:
                    # past the limit the daemon answers and closes while we
                    # still send: its answer is still there to read
                    assert mode == "big", msgs
                target.stats["messages"] += len(msgs)
                f = s.makefile("rb")
                return_answers = [json.loads(f.readline()) for _ in range(expected)]
                if sender is not None:
                    sender.join()
                if mode == "big":
                    assert "larger than" in return_answers[0]["Message"], return_answers
        for ans in return_answers:
            target.check_answer(ans, msgs)
        target.check_alive()
        now = target.catalogue()
        if return_answers and all("Code" in a for a in return_answers) or mode == "half":
            assert now == baseline[0], "refused requests changed the catalogue: %r" % (msgs,)
        baseline[0] = now

    run()
    target.finish("control socket")


def test_fuzz_many_concurrent_connections(target):
    """200 connections at once, each doing something odd (or right)."""
    rng = random.Random(int(os.environ.get("VDISK_FUZZ_SEED", "0")))
    errors = []

    def client(n):
        try:
            s = target.sock()
            kind = n % 5
            with s:
                if kind == 0:
                    pass  # connect and hang up
                elif kind == 1:
                    s.sendall(b'{"Action": "DescribeDisks"')  # half a request
                elif kind == 2:
                    s.sendall(b"[" * 3000 + b"\n")
                    ans = json.loads(s.makefile("rb").readline())
                    assert ans["Code"] == "InvalidParameter", ans
                elif kind == 3:
                    s.sendall(bytes(rng.randrange(256) for _ in range(300)) + b"\n")
                else:
                    s.sendall(b'{"Action": "DescribeDisks"}\n')
                    ans = json.loads(s.makefile("rb").readline())
                    assert "Disks" in ans, ans
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(repr(exc))

    for _ in range(max(1, EXAMPLES // 150)):
        threads = [threading.Thread(target=client, args=(n,)) for n in range(200)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        target.stats["messages"] += 200
    assert errors == []
    target.finish("concurrent connections")


def _main(argv):
    """Run the CLI in this process; (exit code, stdout, stderr)."""
    from vdisk.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: 2 for bad usage, 0 for --help
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def _cli_shapes():
    """(command path, [(option strings, takes a value)], positional count) of
    every subcommand, from the parser itself."""
    import argparse

    from vdisk.cli.main import build_parser

    shapes = []

    def walk(parser, path):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if subs:
            for name, sp in subs[0].choices.items():
                walk(sp, path + [name])
            return
        opts = [(a.option_strings, a.nargs != 0) for a in parser._actions if a.option_strings and a.dest != "help"]
        npos = sum(1 for a in parser._actions if not a.option_strings)
        shapes.append((path, opts, npos))

    walk(build_parser(), [])
    # these act on the host or the daemon's life, not on input, or wait by
    # design (disk stats sleeps --interval, up to an hour): not fuzzed
    return [s for s in shapes if s[0][:2] not in (["daemon", "start"], ["daemon", "stop"], ["daemon", "run"],
                                                  ["disk", "stats"])
            and s[0][0] != "service"]


def test_fuzz_cli_arguments(target, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files the commands write (snapshot export -o NAME) land here
    shapes = _cli_shapes()
    values = st.one_of(odd_text, st.sampled_from(target.ids))
    stats = {"commands": 0, "exit_codes": {}}

    @FUZZ
    @given(st.sampled_from(shapes), st.data())
    def run(shape, data):
        path, opts, npos = shape
        argv = ["--data-dir", target.env.data, *path]
        for strings, takes in data.draw(st.lists(st.sampled_from(opts), max_size=4)) if opts else []:
            argv.append(data.draw(st.sampled_from(strings)))
            if takes:
                argv.append(data.draw(values))
        n = npos if data.draw(st.integers(0, 4)) else data.draw(st.integers(0, npos + 1))
        argv += [data.draw(values) for _ in range(n)]
        if data.draw(st.booleans()):
            argv.insert(data.draw(st.integers(0, len(argv))), data.draw(st.sampled_from(["--json", "--help", "-x", "--", "--bogus=1"])))
        code, out, err = _main(argv)
        stats["commands"] += 1
        stats["exit_codes"][code] = stats["exit_codes"].get(code, 0) + 1
        assert code in (0, 1, 2, 3), (argv, code, err)
        assert "Traceback" not in err + out and "internal error" not in err, (argv, err)
        target.check_alive()

    try:
        run()
    finally:
        for dev in target.env._my_loops():  # `loop attach` of a playground disk may have succeeded
            subprocess.run(["losetup", "-d", dev], check=False)
    target.stats["cli"] = stats
    target.finish("CLI arguments")


def test_fuzz_cloud_actions_through_vdisk_api(target):
    values = st.one_of(odd_text, st.sampled_from(target.ids), st.integers().map(str),
                       json_values(target.ids).map(lambda v: json.dumps(v)))
    stats = {"calls": 0, "exit_codes": {}}
    baseline = [target.catalogue()]

    @FUZZ
    @given(st.sampled_from(ACTIONS), st.lists(st.tuples(st.sampled_from(PARAMS), values), max_size=6))
    def run(action, params):
        argv = ["--data-dir", target.env.data, "api", action] + ["%s=%s" % kv for kv in params]
        code, out, err = _main(argv)
        stats["calls"] += 1
        stats["exit_codes"][code] = stats["exit_codes"].get(code, 0) + 1
        assert code in (0, 1, 2), (argv, code, err)
        assert "Traceback" not in err + out and "InternalError" not in err, (argv, err)
        target.check_alive()
        now = target.catalogue()
        if code != 0:
            assert now == baseline[0], "a refused %s changed the catalogue: %r" % (action, params)
        baseline[0] = now

    run()
    target.stats["api"] = stats
    target.finish("vdisk api")


def _signed_v1(target, action, params, method):
    """A V1 request signed as the aliyun CLI signs it (the SDK's own signer)."""
    from urllib.parse import urlencode

    from alibabacloud_tea_openapi.utils import Utils

    p = {"Version": "2014-05-26", "AccessKeyId": target.key["AccessKeyId"], "SignatureMethod": "HMAC-SHA1",
         "SignatureVersion": "1.0", "SignatureNonce": "fuzz-%d" % time.monotonic_ns(), "Format": "JSON",
         "Timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "Action": action}
    p.update(params)
    p["Signature"] = Utils.get_rpcsignature(dict(p), method, target.key["AccessKeySecret"])
    body = urlencode(p).encode()
    if method == "GET":
        return b"GET /?%s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % body
    return (b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


def _http(target, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", target.http_port), timeout=60) as s:
        try:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return out
                out += chunk
        except ConnectionResetError:
            return out


def test_fuzz_http_endpoint(target):
    """The HTTP API: raw garbage, odd request lines and headers, and signed
    V1 requests carrying every parameter with odd values (text, as the wire
    carries them)."""
    pytest.importorskip("alibabacloud_tea_openapi.utils", reason="needs the SDK to sign requests")
    stats = {"requests": 0, "signed": 0, "statuses": {}}
    text_values = st.one_of(odd_text.filter(lambda v: "\x00" not in v and not any(0xD800 <= ord(c) < 0xE000 for c in v)),
                            st.sampled_from(target.ids), st.integers().map(str),
                            json_values(target.ids).map(lambda v: json.dumps(v)))
    signed = st.builds(lambda a, ps, m: ("signed", _signed_v1(target, a, dict(ps), m)),
                       st.sampled_from([a for a in ACTIONS if a != "Ping"]),
                       st.lists(st.tuples(st.sampled_from(PARAMS), text_values), max_size=6),
                       st.sampled_from(["GET", "POST"]))
    header_names = st.sampled_from(["Host", "Content-Length", "Transfer-Encoding", "Authorization", "x-acs-action",
                                    "x-acs-version", "x-acs-date", "Content-Type", "Accept", "X-" + "a" * 100])
    odd = st.builds(
        lambda m, t, hs, body: ("raw", b"%s %s HTTP/1.1\r\n%s\r\n%s" % (
            m, t, b"".join(b"%s: %s\r\n" % (k.encode(), v) for k, v in hs), body)),
        st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"G\x00T", b"OPTIONS"]),
        st.one_of(st.sampled_from([b"/", b"/?Action=DescribeDisks", b"/x/../", b"*", b"/?" + b"a=" * 5000]),
                  st.binary(max_size=50).map(lambda b: b"/?" + b.replace(b" ", b"").replace(b"\r", b"").replace(b"\n", b""))),
        st.lists(st.tuples(header_names, st.binary(max_size=80).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))),
                 max_size=5),
        st.binary(max_size=200))
    garbage = st.binary(max_size=300).map(lambda b: ("raw", b))

    @FUZZ
    @given(st.one_of(signed, odd, garbage))
    def run(msg):
        kind, raw = msg
        out = _http(target, raw)
        stats["requests"] += 1
        if out:
            assert out.startswith(b"HTTP/1.1 "), out[:200]
            status = int(out[9:12])
            stats["statuses"][status] = stats["statuses"].get(status, 0) + 1
            assert status < 500, out[:2000]
        if kind == "signed":
            stats["signed"] += 1
            body = json.loads(out.split(b"\r\n\r\n", 1)[1])
            assert body.get("Code") != "InternalError", body
        target.check_alive()

    run()
    target.stats["http"] = stats
    target.finish("HTTP endpoint")
