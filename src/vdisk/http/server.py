"""The ECS API over HTTP (version 2014-05-26, RPC style), served on trio
with h11 (the sans-I/O HTTP/1.1 library trio's own documentation builds on).

Each request: parse (h11; header block at most 64 KiB, body at most 1 MiB,
a client has 30 s to send a request), take the parameters from the query
string and a form body, check the signature (signature.py) with a key from
keys.py, refuse a reused nonce, then hand {"Action": ..., params} to
`answer`, the daemon's coroutine that runs the same action handlers as the
control socket.  The answer goes back as JSON, or XML when asked for
(`Format=XML` in the V1 form, where XML is the cloud's default; an Accept of
application/xml in V3), with the cloud's HTTP status.

Connection contract (as the control socket's): nothing a client sends or
does raises out of `_connection`; malformed HTTP gets 400 and a close, a
slow client is dropped, a bug costs one InternalError answer.
"""
from __future__ import annotations

import json
import logging
import uuid
import xml.etree.ElementTree as ET
from urllib.parse import parse_qsl, urlsplit

import h11
import trio

from ..control.controller import COMMON_PARAMS
from ..control.errors import CloudError
from . import signature
from .keys import KeyStore

log = logging.getLogger(__name__)

VERSION = "2014-05-26"
MAX_HEADERS = 64 * 1024
MAX_BODY = 1 << 20
REQUEST_TIMEOUT = 30.0
JSON = "application/json;charset=utf-8"
class ApiServer:
    def __init__(self, keys: KeyStore | None, answer, host_id: str = "ecs.vdisk.local", metrics=None):
        """answer None: a listener of metrics only (`--metrics`); metrics: a
        function giving (content type, body) of GET /metrics, unsigned (the
        Prometheus scraper's), or None."""
        self.keys = keys
        self.answer = answer  # async (request dict) -> answer dict
        self.host_id = host_id
        self.metrics = metrics
        self.nonces = signature.Nonces()

    async def serve(self, host: str, port: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        task_status.started(listeners[0].socket.getsockname()[:2])
        await trio.serve_listeners(self._connection, listeners)

    # ------------------------------------------------------------ HTTP

    async def _connection(self, stream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADERS)
        async with stream:
            try:
                while True:
                    with trio.move_on_after(REQUEST_TIMEOUT) as timer:
                        got = await self._read_request(conn, stream)
                    if timer.cancelled_caught or got is None:
                        return
                    req, body = got
                    try:
                        status, ctype, payload = await self._handle(req, body)
                    except Exception as exc:  # noqa: BLE001 - a bug costs one answer, not the connection
                        log.exception("internal error answering an HTTP request")
                        status, ctype = 500, JSON
                        payload = json.dumps(self._error_body("InternalError", "Internal error: %s: %s"
                                                              % (type(exc).__name__, exc))).encode()
                    await self._send(conn, stream, status, ctype, payload)
                    if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
                pass  # the client went away
            except h11.RemoteProtocolError as exc:
                await self._refuse(conn, stream, exc)
            except Exception:  # noqa: BLE001 - a connection must never stop the daemon
                log.exception("an HTTP connection failed; the daemon goes on")

    async def _read_request(self, conn, stream):
        req, body = None, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                req = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise h11.RemoteProtocolError("the request body is larger than %d bytes" % MAX_BODY, 413)
            elif isinstance(event, h11.EndOfMessage):
                return req, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def _send(self, conn, stream, status: int, ctype: str, payload: bytes, close: bool = False) -> None:
        headers = [("Content-Type", ctype), ("Content-Length", str(len(payload))), ("Server", "vdisk")]
        if close:
            headers.append(("Connection", "close"))
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
        await stream.send_all(conn.send(h11.Data(data=payload)))
        await stream.send_all(conn.send(h11.EndOfMessage()))

    async def _refuse(self, conn, stream, exc) -> None:
        """Malformed HTTP: a 400 (or 413/431) if a response can still be sent, then close."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        status = exc.error_status_hint if 400 <= exc.error_status_hint < 500 else 400
        body = json.dumps(self._error_body("InvalidParameter", "Malformed HTTP request: %s" % exc)).encode()
        try:
            await self._send(conn, stream, status, JSON, body, close=True)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            pass

    # ------------------------------------------------------------ the API

    async def _handle(self, req: h11.Request, body: bytes) -> tuple[int, str, bytes]:
        headers: dict[str, list[str]] = {}
        for name, value in req.headers:
            headers.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
        target = urlsplit(req.target.decode("latin-1"))
        if self.metrics is not None and target.path == "/metrics" and req.method == b"GET":
            ctype, body = self.metrics()
            return 200, ctype, body
        if self.answer is None:
            return 404, "text/plain;charset=utf-8", b"this listener serves GET /metrics only\n"
        query = parse_qsl(target.query, keep_blank_values=True)
        form = []
        if (headers.get("content-type") or [""])[0].startswith("application/x-www-form-urlencoded"):
            form = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        sreq = signature.Request(req.method.decode("latin-1"), target.path or "/", query, headers, body, form)
        params = dict(query + form)
        acs3 = (sreq.header("authorization") or "").startswith("ACS3-")
        xml = params.get("Format", "XML").upper() == "XML" if not acs3 else "xml" in (sreq.header("accept") or "")
        try:
            action = self._check(sreq, params, acs3)
            res = await self.answer({"Action": action, **{k: v for k, v in params.items() if k not in COMMON_PARAMS}})
        except CloudError as exc:
            action, res = None, exc.to_dict()
        status = 200
        if "RequestId" in res:  # first, as the cloud writes it
            res = {"RequestId": res["RequestId"], **res}
        if "Code" in res:
            status = int(res.get("HttpStatus", 400))
            res = self._error_body(res["Code"], res.get("Message", ""), res.get("RequestId"))
        if xml:
            return status, "text/xml;charset=utf-8", _to_xml(res, (action + "Response") if status == 200 else "Error")
        return status, JSON, json.dumps(res).encode()

    def _check(self, sreq: signature.Request, params: dict, acs3: bool) -> str:
        if sreq.method not in ("GET", "POST"):
            raise CloudError("UnsupportedHTTPMethod", "HTTP method %s is not supported; use GET or POST." % sreq.method)
        if sreq.path != "/":
            raise CloudError("InvalidApi.NotFound", "Specified api is not found: the path must be /, not %s." % sreq.path, 404)
        fmt = params.get("Format")
        if fmt is not None and fmt.upper() not in ("JSON", "XML"):
            raise CloudError("InvalidParameter.Format", "Specified parameter format is not valid: Format must be JSON or XML.")
        action = sreq.header("x-acs-action") if acs3 else params.get("Action")
        version = sreq.header("x-acs-version") if acs3 else params.get("Version")
        if not action:
            raise CloudError("MissingParameter", "The input parameter Action that is mandatory for processing this request is not supplied.")
        if not version:
            raise CloudError("MissingParameter", "The input parameter Version that is mandatory for processing this request is not supplied.")
        if version != VERSION:
            raise CloudError("InvalidParameter", "The specified parameter Version %r is not valid: vdisk serves ECS %s." % (version, VERSION))
        if acs3:
            key_id, nonce = signature.verify_acs3(sreq, self.keys.secret)
        elif "Signature" in params or "AccessKeyId" in params:
            key_id, nonce = signature.verify_rpc(sreq, params, self.keys.secret)
        else:
            raise CloudError("IncompleteSignature", "The request is not signed: use an SDK or CLI configured with an "
                             "access key from 'vdisk accesskey create'.")
        self.nonces.use(key_id, nonce)
        return action

    def _error_body(self, code: str, message: str, request_id: str | None = None) -> dict:
        """An error as the cloud's body carries it."""
        return {
            "RequestId": request_id or str(uuid.uuid4()).upper(),
            "HostId": self.host_id,
            "Code": code,
            "Message": message,
            "Recommend": "vdisk: the message names the rule; README.md, 'Use your cloud SDK'",
        }


def _to_xml(res: dict, root: str) -> bytes:
    """The cloud's XML form: objects as elements, a list as its elements
    repeated under the list's own name (Disks/Disk/...)."""
    top = ET.Element(root)

    def put(parent, key, value):
        if isinstance(value, list):
            for item in value:
                put(parent, key, item)
            return
        el = ET.SubElement(parent, key)
        if isinstance(value, dict):
            for k, v in value.items():
                put(el, k, v)
        elif isinstance(value, bool):
            el.text = "true" if value else "false"
        elif value is not None:
            el.text = str(value)

    for k, v in res.items():
        put(top, k, v)
    return b'<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(top, encoding="utf-8", xml_declaration=False)
