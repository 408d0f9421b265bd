"""Request signatures as the cloud checks them, and the checks around them.

Two styles, both from the cloud's documentation:

- V3, `Authorization: ACS3-HMAC-SHA256 Credential=ID,SignedHeaders=a;b,
  Signature=HEX` (the current SDKs).  CanonicalRequest = METHOD "\\n" URI
  "\\n" CanonicalQueryString "\\n" CanonicalHeaders "\\n" SignedHeaders "\\n"
  HashedPayload, where the query's names and values are percent-encoded
  (RFC 3986: only A-Z a-z 0-9 - _ . ~ stay) and sorted by name, the signed
  headers are lower-cased, trimmed and sorted ("name:value\\n" each), and
  HashedPayload is x-acs-content-sha256 (hex SHA-256 of the body).
  StringToSign = "ACS3-HMAC-SHA256\\n" hex(SHA-256(CanonicalRequest));
  Signature = hex(HMAC-SHA256(secret, StringToSign)).  Time: x-acs-date;
  nonce: x-acs-signature-nonce.
- V1 RPC, `Signature=...&SignatureMethod=HMAC-SHA1&SignatureVersion=1.0`
  among the parameters (the aliyun CLI and older SDKs; GET or form POST).
  StringToSign = METHOD "&" enc("/") "&" enc(CanonicalQueryString) with
  every parameter but Signature; Signature = base64(HMAC-SHA1(secret + "&",
  StringToSign)).  Time: Timestamp; nonce: SignatureNonce.

Errors carry the cloud's codes and HTTP statuses (the OpenAPI common error
codes).  Timestamps may be 15 minutes off the daemon's clock, as in the
cloud; a nonce is remembered for that long, so a replay within the window is
SignatureNonceUsed and one after it is InvalidTimeStamp.Expired.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import re
import time
from urllib.parse import quote

from ..control.errors import CloudError

WINDOW = 15 * 60  # seconds a timestamp may be off, and a nonce is remembered
_AUTH = re.compile(r"(ACS3-[A-Z0-9-]+) Credential=([^,]*),SignedHeaders=([^,]*),Signature=([0-9a-fA-F]*)")


def enc(s: str) -> str:
    """Percent-encoding as the cloud's signatures use it (RFC 3986)."""
    return quote(s, safe="~", encoding="utf-8")


def canonical_query(params: list[tuple[str, str]]) -> str:
    return "&".join("%s=%s" % (enc(k), enc(v)) for k, v in sorted(params))


class Request:
    """What a signature covers: method, path, decoded query parameters (in
    order, duplicates kept), lower-cased headers, the raw body."""

    def __init__(self, method: str, path: str, query: list[tuple[str, str]], headers: dict[str, list[str]],
                 body: bytes = b"", form: list[tuple[str, str]] | None = None):
        self.method, self.path, self.query, self.headers, self.body = method, path, query, headers, body
        self.form = form or []

    def header(self, name: str) -> str | None:
        v = self.headers.get(name)
        return v[0] if v else None


def _fail(code: str, message: str, status: int = 400) -> CloudError:
    return CloudError(code, message, status)


def check_time(value: str | None, name: str, now: float | None = None) -> None:
    if not value:
        raise _fail("MissingParameter" if name == "Timestamp" else "IncompleteSignature",
                    "%s is mandatory for a signed request." % name)
    try:
        t = datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc).timestamp()
    except ValueError:
        raise _fail("InvalidTimeStamp.Format", "Specified time stamp or date value is not well formatted: %s %r "
                    "(expected UTC as YYYY-MM-DDThh:mm:ssZ)." % (name, value)) from None
    now = time.time() if now is None else now
    if abs(now - t) > WINDOW:
        raise _fail("InvalidTimeStamp.Expired", "Specified time stamp or date value is expired: %s %s is more than "
                    "15 minutes from the server's time %s." % (name, value, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))))


class Nonces:
    """Nonces seen in the last WINDOW seconds (per access key)."""

    def __init__(self):
        self._seen: dict[tuple[str, str], float] = {}

    def use(self, key_id: str, nonce: str | None, now: float | None = None) -> None:
        if not nonce:
            raise _fail("MissingParameter", "SignatureNonce (x-acs-signature-nonce) is mandatory for a signed request.")
        now = time.monotonic() if now is None else now
        if len(self._seen) > 100000 or (self._seen and next(iter(self._seen.values())) < now - WINDOW):
            self._seen = {k: t for k, t in self._seen.items() if t >= now - WINDOW}
        if (key_id, nonce) in self._seen:
            raise _fail("SignatureNonceUsed", "Specified signature nonce was used already: %r." % nonce)
        self._seen[(key_id, nonce)] = now


def verify_acs3(req: Request, secret_of) -> tuple[str, str]:
    """Check a V3 request; (access key id, nonce).  secret_of(id) -> secret
    or None.  Raises CloudError with the cloud's code."""
    auth = req.header("authorization") or ""
    m = _AUTH.fullmatch(auth.strip())
    if m is None:
        raise _fail("IncompleteSignature", "The Authorization header is not ACS3-HMAC-SHA256 Credential=...,"
                    "SignedHeaders=...,Signature=...")
    algorithm, key_id, signed, signature = m.groups()
    if algorithm != "ACS3-HMAC-SHA256":
        raise _fail("InvalidSignatureMethod", "Signature algorithm %s is not supported; use ACS3-HMAC-SHA256." % algorithm)
    secret = secret_of(key_id)
    if secret is None:
        raise _fail("InvalidAccessKeyId.NotFound", "Specified access key is not found: %s." % key_id, 404)
    names = signed.split(";") if signed else []
    if names != sorted(names) or any(n != n.lower() for n in names):
        raise _fail("IncompleteSignature", "SignedHeaders must be lower-case and sorted.")
    for required in ("host", "x-acs-action", "x-acs-content-sha256", "x-acs-date", "x-acs-signature-nonce", "x-acs-version"):
        if required not in names:
            raise _fail("IncompleteSignature", "The header %s must be signed." % required)
    payload = req.header("x-acs-content-sha256") or ""
    if payload.lower() != hashlib.sha256(req.body).hexdigest():
        raise _fail("SignatureDoesNotMatch", "x-acs-content-sha256 is not the SHA-256 of the request body.")
    check_time(req.header("x-acs-date"), "x-acs-date")
    headers = "".join("%s:%s\n" % (n, ",".join(sorted(v.strip() for v in req.headers.get(n, [])))) for n in names)
    canonical = "\n".join([req.method, req.path or "/", canonical_query(req.query), headers, signed, payload])
    to_sign = "ACS3-HMAC-SHA256\n" + hashlib.sha256(canonical.encode()).hexdigest()
    want = hmac.new(secret.encode(), to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(want, signature.lower()):
        raise _fail("SignatureDoesNotMatch", "Specified signature is not matched with our calculation. "
                    "The string to sign was: %r" % to_sign)
    return key_id, req.header("x-acs-signature-nonce") or ""


def verify_rpc(req: Request, params: dict[str, str], secret_of) -> tuple[str, str]:
    """Check a V1 (RPC) request whose parameters (query and form body) are
    params; (access key id, nonce)."""
    for name in ("AccessKeyId", "Signature", "SignatureMethod", "SignatureNonce", "Timestamp"):
        if not params.get(name):
            raise _fail("MissingParameter" if name != "Signature" else "IncompleteSignature",
                        "The input parameter %s that is mandatory for processing this request is not supplied." % name)
    if params["SignatureMethod"] != "HMAC-SHA1":
        raise _fail("InvalidSignatureMethod", "SignatureMethod %r is not supported; use HMAC-SHA1." % params["SignatureMethod"])
    if params.get("SignatureVersion", "1.0") != "1.0":
        raise _fail("InvalidSignatureVersion", "SignatureVersion %r is not supported; use 1.0." % params["SignatureVersion"])
    secret = secret_of(params["AccessKeyId"])
    if secret is None:
        raise _fail("InvalidAccessKeyId.NotFound", "Specified access key is not found: %s." % params["AccessKeyId"], 404)
    check_time(params["Timestamp"], "Timestamp")
    pairs = [(k, v) for k, v in req.query + req.form if k != "Signature"]
    to_sign = "%s&%s&%s" % (req.method, enc("/"), enc(canonical_query(pairs)))
    want = base64.b64encode(hmac.new((secret + "&").encode(), to_sign.encode(), hashlib.sha1).digest()).decode()
    if not hmac.compare_digest(want, params["Signature"]):
        raise _fail("SignatureDoesNotMatch", "Specified signature is not matched with our calculation. "
                    "The string to sign was: %r" % to_sign)
    return params["AccessKeyId"], params["SignatureNonce"]
