"""Request signatures (vdisk.http.signature) against the cloud's own signer:
the official SDK's (alibabacloud-tea-openapi) V3 and V1 functions build the
reference signatures; every way of being wrong is refused with the cloud's
code.  No daemon, no root."""
import hashlib
import time

import pytest

from vdisk.control.errors import CloudError
from vdisk.http import signature
from vdisk.http.server import _to_xml

sdk = pytest.importorskip("alibabacloud_tea_openapi.utils", reason="needs the SDK: pip install alibabacloud-ecs20140526")
Utils = sdk.Utils

KEY, SECRET = "LTAIexampleexampleexam", "s3cr3ts3cr3ts3cr3ts3cr3ts3cr3t"


def secret_of(k):
    return SECRET if k == KEY else None


class _SdkRequest:
    def __init__(self, method, pathname, query, headers):
        self.method, self.pathname, self.query, self.headers = method, pathname, query, headers


def acs3(query=None, headers=None, body=b"", method="POST", secret=SECRET, when=None):
    """A V3 request signed by the SDK's own get_authorization."""
    query = dict(query or {"DiskIds": '["d-1","d-2"]', "DiskName": "a b+c*~ é", "PageSize": "10"})
    h = {
        "host": "127.0.0.1:8080",
        "x-acs-version": "2014-05-26",
        "x-acs-action": "DescribeDisks",
        "x-acs-date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when or time.time())),
        "x-acs-signature-nonce": "n-%d" % time.monotonic_ns(),
        "accept": "application/json",
        "x-acs-content-sha256": hashlib.sha256(body).hexdigest(),
        "user-agent": "AlibabaCloud (Linux) Python/3.11",
    }
    h.update(headers or {})
    h["Authorization"] = Utils.get_authorization(_SdkRequest(method, "/", query, dict(h)), "ACS3-HMAC-SHA256",
                                                 h["x-acs-content-sha256"], KEY, secret)
    hdrs = {k.lower(): [v] for k, v in h.items()}
    return signature.Request(method, "/", list(query.items()), hdrs, body)


def test_acs3_signed_by_the_sdk_is_accepted():
    assert signature.verify_acs3(acs3(), secret_of)[0] == KEY
    body = b"Size=20&DiskName=x"
    assert signature.verify_acs3(acs3(body=body), secret_of)[0] == KEY


def refused(code, fn, *args):
    with pytest.raises(CloudError) as e:
        fn(*args)
    assert e.value.code == code, e.value.message
    return e.value


def test_acs3_every_way_of_being_wrong():
    refused("SignatureDoesNotMatch", signature.verify_acs3, acs3(secret="wrong"), secret_of)
    e = refused("InvalidAccessKeyId.NotFound", signature.verify_acs3, acs3(), lambda k: None)
    assert e.http_status == 404
    r = acs3()
    r.query.append(("Extra", "1"))  # a parameter added after signing
    refused("SignatureDoesNotMatch", signature.verify_acs3, r, secret_of)
    r = acs3()
    r.headers["x-acs-action"] = ["DeleteDisk"]  # a signed header changed
    refused("SignatureDoesNotMatch", signature.verify_acs3, r, secret_of)
    r = acs3(body=b"Size=20")
    r.body = b"Size=2000"  # the body changed: its hash no longer matches
    refused("SignatureDoesNotMatch", signature.verify_acs3, r, secret_of)
    refused("InvalidTimeStamp.Expired", signature.verify_acs3, acs3(when=time.time() - 16 * 60), secret_of)
    refused("InvalidTimeStamp.Expired", signature.verify_acs3, acs3(when=time.time() + 16 * 60), secret_of)
    refused("InvalidTimeStamp.Format", signature.verify_acs3, acs3(headers={"x-acs-date": "yesterday"}), secret_of)
    r = acs3()
    r.headers["authorization"] = ["ACS3-HMAC-SHA256 garbage"]
    refused("IncompleteSignature", signature.verify_acs3, r, secret_of)
    r = acs3()
    r.headers["authorization"] = [r.headers["authorization"][0].replace("ACS3-HMAC-SHA256", "ACS3-HMAC-SM3")]
    refused("InvalidSignatureMethod", signature.verify_acs3, r, secret_of)


def rpc(params=None, method="GET", secret=SECRET, when=None):
    """A V1 request signed by the SDK's own get_rpcsignature."""
    p = {
        "Action": "DescribeDisks", "Version": "2014-05-26", "Format": "JSON", "AccessKeyId": KEY,
        "SignatureMethod": "HMAC-SHA1", "SignatureVersion": "1.0", "SignatureNonce": "n-%d" % time.monotonic_ns(),
        "Timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when or time.time())),
        "DiskName": "a b+c*~ é",
    }
    p.update(params or {})
    p["Signature"] = Utils.get_rpcsignature(dict(p), method, secret)
    return signature.Request(method, "/", list(p.items()), {}), p


def test_rpc_signed_by_the_sdk_is_accepted():
    r, p = rpc()
    assert signature.verify_rpc(r, p, secret_of) == (KEY, p["SignatureNonce"])
    r, p = rpc(method="POST")
    assert signature.verify_rpc(r, p, secret_of)[0] == KEY


def test_rpc_every_way_of_being_wrong():
    r, p = rpc(secret="wrong")
    refused("SignatureDoesNotMatch", signature.verify_rpc, r, p, secret_of)
    r, p = rpc()
    r.method = "POST"  # signed for GET
    refused("SignatureDoesNotMatch", signature.verify_rpc, r, p, secret_of)
    r, p = rpc()
    r.query = [(k, "2" if k == "DiskName" else v) for k, v in r.query]
    refused("SignatureDoesNotMatch", signature.verify_rpc, r, p, secret_of)
    r, p = rpc({"AccessKeyId": "LTAInobody"})
    refused("InvalidAccessKeyId.NotFound", signature.verify_rpc, r, p, secret_of)
    r, p = rpc(when=time.time() - 3600)
    refused("InvalidTimeStamp.Expired", signature.verify_rpc, r, p, secret_of)
    r, p = rpc({"SignatureMethod": "HMAC-SHA256"})
    refused("InvalidSignatureMethod", signature.verify_rpc, r, p, secret_of)
    r, p = rpc()
    del p["SignatureNonce"]
    refused("MissingParameter", signature.verify_rpc, r, p, secret_of)


def test_nonces_are_used_once_within_the_window():
    n = signature.Nonces()
    n.use(KEY, "abc", now=100.0)
    refused("SignatureNonceUsed", n.use, KEY, "abc", 200.0)
    n.use("LTAIother", "abc", now=200.0)  # per key
    n.use(KEY, "abc", now=100.0 + signature.WINDOW + 1)  # forgotten after the window
    refused("MissingParameter", n.use, KEY, "", 1.0)


def test_xml_answers_as_the_cloud_nests_them():
    xml = _to_xml({"RequestId": "R", "TotalCount": 2, "Disks": {"Disk": [{"DiskId": "d-1", "Portable": True},
                                                                          {"DiskId": "d-2", "Portable": False}]}},
                  "DescribeDisksResponse")
    assert xml.startswith(b'<?xml version="1.0" encoding="UTF-8"?><DescribeDisksResponse><RequestId>R</RequestId>')
    assert b"<Disks><Disk><DiskId>d-1</DiskId><Portable>true</Portable></Disk><Disk><DiskId>d-2</DiskId>" in xml


def test_a_bug_in_an_answer_costs_one_500_not_the_connection(tmp_path):
    """The server in-process (no daemon): a handler that raises answers 500
    InternalError, and the same connection serves the next request."""
    import json as _json

    import trio

    from vdisk.http.keys import KeyStore
    from vdisk.http.server import ApiServer

    keys = KeyStore(str(tmp_path / "accesskeys.json"))
    key = keys.create()
    calls = []

    async def answer(req):
        calls.append(req["Action"])
        if req["Action"] == "DescribeDisks":
            raise RuntimeError("a bug")
        return {"RequestId": "R", "Ok": True}

    def signed_get(action):
        from urllib.parse import urlencode

        p = {"Action": action, "Version": "2014-05-26", "Format": "JSON", "AccessKeyId": key["AccessKeyId"],
             "SignatureMethod": "HMAC-SHA1", "SignatureVersion": "1.0", "SignatureNonce": "n-%d" % time.monotonic_ns(),
             "Timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        p["Signature"] = Utils.get_rpcsignature(dict(p), "GET", key["AccessKeySecret"])
        return ("GET /?%s HTTP/1.1\r\nHost: x\r\n\r\n" % urlencode(p)).encode()

    async def read_response(stream, buf):
        while b"\r\n\r\n" not in buf:
            chunk = await stream.receive_some(65536)
            assert chunk, "the connection was closed without an answer"
            buf += chunk
        head, rest = buf.split(b"\r\n\r\n", 1)
        n = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
        while len(rest) < n:
            rest += await stream.receive_some(65536)
        return head, rest[:n], rest[n:]

    async def main():
        server = ApiServer(keys, answer)
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(server.serve, "127.0.0.1", 0)
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(signed_get("DescribeDisks"))
                head, body, rest = await read_response(stream, b"")
                assert head.startswith(b"HTTP/1.1 500"), head
                assert _json.loads(body)["Code"] == "InternalError"
                await stream.send_all(signed_get("DescribeImages"))  # same connection (keep-alive)
                head, body, _ = await read_response(stream, rest)
                assert head.startswith(b"HTTP/1.1 200") and _json.loads(body)["Ok"] is True
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert calls == ["DescribeDisks", "DescribeImages"]
