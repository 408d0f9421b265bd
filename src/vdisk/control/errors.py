"""Errors the emulated cloud answers with: a stable code and a plain message."""


class CloudError(Exception):
    """A refused request.  code is stable (scripts match on it); message says
    which rule was broken and what to do; nothing was changed."""

    def __init__(self, code: str, message: str, http_status: int = 400):
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status

    def to_dict(self) -> dict:
        return {"Code": self.code, "Message": self.message, "HttpStatus": self.http_status}


def not_found(kind: str, ident: str) -> CloudError:
    names = {"instance": "InvalidInstanceId", "disk": "InvalidDiskId", "snapshot": "InvalidSnapshotId"}
    return CloudError(names[kind] + ".NotFound", "The specified %s %s does not exist." % (kind, ident), 404)


def missing(param: str) -> CloudError:
    return CloudError("MissingParameter", "The input parameter %s that is mandatory for processing this request is not supplied." % param)


def invalid(param: str, why: str) -> CloudError:
    return CloudError("InvalidParameter", "The parameter %s is invalid: %s" % (param, why))
