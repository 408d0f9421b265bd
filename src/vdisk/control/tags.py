"""Tags: the cloud's TagResources, UntagResources and ListTagResources, the
Tag.N.Key/Value of the Create* actions, and Tag.N as a filter of the
Describe* actions (Terraform and most automation find what they own by tag).

Tags live in each resource's record (_tags: key -> value), written in the
same transaction as the resource.  The cloud's limits: at most 20 tags per
resource; a key of 1-128 characters, a value of 0-128, neither starting
with "aliyun" or "acs:" nor holding "http://" or "https://"; at most 50
resources and 20 tags per TagResources call.

A mixin of Controller.
"""
from __future__ import annotations

from .errors import CloudError
from .validate import Params, check_id

MAX_TAGS = 20
MAX_RESOURCES = 50
# ResourceType -> (record prefix, id kind).  snapshotgroup is vdisk's own:
# the cloud tags snapshot groups through CreateSnapshotGroup's Tag.N.
RESOURCE_TYPES = {
    "instance": ("instance", "i"),
    "disk": ("disk", "d"),
    "snapshot": ("snapshot", "s"),
    "image": ("image", "m"),
    "snapshotpolicy": ("autosnapshotpolicy", "sp"),
    "snapshotgroup": ("snapshotgroup", "ssg"),
}


def _check_tag_text(text, what: str, param: str, empty_ok: bool) -> str:
    code = "InvalidTagKey.Malformed" if what == "key" else "InvalidTagValue.Malformed"
    if not isinstance(text, str):
        raise CloudError(code, "%s must be text." % param)
    if (not text and not empty_ok) or len(text) > 128:
        raise CloudError(code, "%s must be %d to 128 characters long." % (param, 0 if empty_ok else 1))
    low = text.lower()
    if low.startswith(("aliyun", "acs:")) or "http://" in low or "https://" in low:
        raise CloudError(code, "%s %r may not start with aliyun or acs: nor hold http:// or https://." % (param, text))
    return text


def _pairs(p: Params, name: str = "Tag") -> list[tuple[str, str | None]]:
    """Tag.N.Key / Tag.N.Value as (key, value or None) pairs, checked."""
    out = []
    for i, t in enumerate(p.struct_list(name, ("Key", "Value")), 1):
        if "Key" not in t:
            raise CloudError("InvalidTagKey.Malformed", "%s.%d.Key is missing (a tag needs a key)." % (name, i))
        key = _check_tag_text(t["Key"], "key", "%s.%d.Key" % (name, i), empty_ok=False)
        value = t.get("Value")
        if value is not None:
            value = _check_tag_text(value, "value", "%s.%d.Value" % (name, i), empty_ok=True)
        out.append((key, value))
    if len(out) > MAX_TAGS:
        raise CloudError("InvalidTagCount", "At most %d tags may be given, not %d." % (MAX_TAGS, len(out)))
    return out


def _set(record: dict, pairs: list[tuple[str, str | None]]) -> None:
    tags = dict(record.get("_tags") or {})
    for k, v in pairs:
        tags[k] = v or ""
    if len(tags) > MAX_TAGS:
        raise CloudError("InvalidTagCount", "A resource holds at most %d tags; this would make %d. Remove some "
                         "with UntagResources first." % (MAX_TAGS, len(tags)))
    record["_tags"] = tags


class TagActions:
    def _tags_given(self, p: Params) -> dict:
        """The Tag.N of a Create* request, as a record's _tags."""
        rec: dict = {}
        _set(rec, _pairs(p))
        return rec["_tags"]

    @staticmethod
    def _tags_public(rec: dict, key: str = "TagKey", value: str = "TagValue") -> dict:
        return {"Tag": [{key: k, value: v} for k, v in sorted((rec.get("_tags") or {}).items())]}

    @staticmethod
    def _tag_filter(p: Params):
        """A record filter from a Describe*'s Tag.N.Key/Value: every tag
        given must be on the record (any value when Value is not given)."""
        want = _pairs(p)

        def match(rec: dict) -> bool:
            tags = rec.get("_tags") or {}
            return all(k in tags and (v is None or tags[k] == v) for k, v in want)

        return match

    def _tag_targets(self, p: Params) -> tuple[str, list[tuple[str, dict]]]:
        rtype = p.str("ResourceType", required=True)
        if rtype not in RESOURCE_TYPES:
            raise CloudError("InvalidResourceType.NotFound", "ResourceType %r is not one vdisk tags; use one of %s."
                             % (rtype, ", ".join(RESOURCE_TYPES)), 404)
        prefix, kind = RESOURCE_TYPES[rtype]
        ids = p.list("ResourceId")
        if len(ids) > MAX_RESOURCES:
            raise CloudError("InvalidParameter", "At most %d ResourceId.N may be given, not %d." % (MAX_RESOURCES, len(ids)))
        out = []
        for i, rid in enumerate(ids, 1):
            check_id(kind, rid, "ResourceId.%d" % i)
            rec = self.pool.get_record("%s/%s" % (prefix, rid))
            if rec is None:
                raise CloudError("InvalidResourceId.NotFound", "The specified %s %s does not exist." % (rtype, rid), 404)
            out.append(("%s/%s" % (prefix, rid), rec))
        return prefix, out

    def do_TagResources(self, p: Params) -> dict:
        _prefix, targets = self._tag_targets(p)
        if not targets:
            raise CloudError("MissingParameter", "TagResources needs ResourceId.N.")
        pairs = _pairs(p)
        if not pairs:
            raise CloudError("MissingParameter", "TagResources needs Tag.N.Key.")
        for key, rec in targets:
            _set(rec, pairs)
        for key, rec in targets:
            self.pool.put_record(key, rec)
        self.pool.commit_meta()
        return {}

    def do_UntagResources(self, p: Params) -> dict:
        _prefix, targets = self._tag_targets(p)
        if not targets:
            raise CloudError("MissingParameter", "UntagResources needs ResourceId.N.")
        keys = p.list("TagKey")
        if len(keys) > MAX_TAGS:
            raise CloudError("InvalidParameter", "At most %d TagKey.N may be given." % MAX_TAGS)
        everything = p.bool("All")
        if not keys and not everything:
            raise CloudError("MissingParameter", "UntagResources needs TagKey.N, or All=true to remove every tag.")
        for key, rec in targets:
            tags = dict(rec.get("_tags") or {})
            for k in list(tags) if everything and not keys else keys:
                tags.pop(k, None)
            rec["_tags"] = tags
            self.pool.put_record(key, rec)
        self.pool.commit_meta()
        return {}

    def do_ListTagResources(self, p: Params) -> dict:
        rtype = p.str("ResourceType", required=True)
        prefix, targets = self._tag_targets(p)
        match = self._tag_filter(p)
        if not targets:
            if not p.struct_list("Tag", ("Key", "Value")):
                raise CloudError("MissingParameter", "ListTagResources needs ResourceId.N or Tag.N.Key.")
            targets = sorted(self.pool.records(prefix + "/").items())
        rows = []
        for key, rec in targets:
            if not match(rec):
                continue
            rid = key.split("/", 1)[1]
            for k, v in sorted((rec.get("_tags") or {}).items()):
                rows.append({"ResourceId": rid, "ResourceType": rtype, "TagKey": k, "TagValue": v})
        token = p.str("NextToken", default="")
        try:
            start = int(token) if token else 0
        except ValueError:
            raise CloudError("InvalidParameter.NextToken", "NextToken %r is not one this service issued." % token) from None
        page = rows[start:start + 50]
        out = {"TagResources": {"TagResource": page}}
        if start + 50 < len(rows):
            out["NextToken"] = str(start + 50)
        return out
