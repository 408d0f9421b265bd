"""The control plane's edge, without a daemon: what a request must look like
(vdisk.control.validate) and how the controller answers input that breaks
the rules.  Every bad input must get a clear error that names the rule, never
an InternalError, and must change nothing."""
import json

import pytest

from vdisk.control.controller import Controller
from vdisk.control.errors import CloudError
from vdisk.control.validate import MAX_DEPTH, Params, check_id, check_name, check_request
from vdisk.engine.pool import Pool


@pytest.fixture
def ctl(tmp_path):
    pool = Pool(str(tmp_path / "pool"))
    yield Controller(pool, host=None)
    pool.close()


def refused(ctl, req, code="InvalidParameter", contains=""):
    before = ctl.pool.records("")
    res = ctl.handle(req)
    assert res.get("Code") == code, res
    assert contains in res["Message"], res
    assert ctl.pool.records("") == before, "a refused request changed the catalogue"
    return res


@pytest.mark.parametrize("action", [[], {}, 5, True, None, 1.5])
def test_action_must_be_a_string(ctl, action):
    # {"Action": []} raised TypeError (unhashable) inside the dispatcher
    refused(ctl, {"Action": action}, "MissingParameter" if action is None else "InvalidParameter", "Action")


def test_request_must_be_an_object(ctl):
    for req in ([], "CreateDisk", 3, None):
        refused(ctl, req, contains="JSON object")


def test_lone_surrogate_is_refused_and_not_stored(ctl):
    # stored, it broke every later listing of the disk (UnicodeEncodeError)
    res = refused(ctl, {"Action": "CreateDisk", "Size": 20, "Description": "ok \udcff"}, contains="Description")
    assert "Unicode" in res["Message"]
    refused(ctl, {"Action": "CreateDisk", "Size": 20, "DiskName": "a\ud800b"}, contains="DiskName")
    refused(ctl, {"Action": "DescribeDisks", "Tag.1.Key\udc80": "x"}, contains="Unicode")
    assert ctl.handle({"Action": "DescribeDisks"})["Disks"]["Disk"] == []


def test_nul_and_non_string_keys_and_deep_nesting(ctl):
    refused(ctl, {"Action": "CreateDisk", "Size": 20, "DiskName": "ab\x00c"}, contains="NUL")
    refused(ctl, {"Action": "CreateDisk", 5: 20})  # only possible from Python, not JSON
    deep = "x"
    for _ in range(MAX_DEPTH + 2):
        deep = [deep]
    refused(ctl, {"Action": "DescribeDisks", "DiskIds": deep}, contains="nest")


@pytest.mark.parametrize("value", ["²", "٣", "1e3", " 20", "20\n", "0x14", "9" * 5000, "9" * 20, 2**63, -(2**63), True, 20.0, [20]])
def test_integers_are_decimal_digits_within_64_bits(ctl, value):
    # "²".isdigit() is true and int() then raised ValueError: an internal error
    refused(ctl, {"Action": "CreateDisk", "Size": value}, contains="Size")


def test_integers_as_text_are_accepted():
    assert Params({"N": "20"}).int("N") == 20
    assert Params({"N": "-1"}).int("N") == -1
    assert Params({"N": 2**63 - 1}).int("N") == 2**63 - 1


@pytest.mark.parametrize("name", ["abc\n", "abc\r\n", "\nabc", "a", "1abc", "http://x", "a" * 129])
def test_names_must_match_whole(name):
    # "$" matched before a final newline: "abc\n" was stored as a name
    with pytest.raises(CloudError):
        check_name(name, "DiskName")
    assert check_name("abc", "DiskName") == "abc"


@pytest.mark.parametrize("kind,good", [("d", "d-" + "a" * 20), ("i", "i-" + "0" * 20), ("s", "s-" + "z" * 20),
                                       ("ssg", "ssg-" + "1" * 20), ("m", "m-" + "b" * 20)])
def test_ids_must_match_whole(kind, good):
    assert check_id(kind, good, "X") == good
    for bad in (good + "\n", good + "a", good[:-1], good.upper(), "../" + good, None, 5):
        with pytest.raises(CloudError) as e:
            check_id(kind, bad, "X")
        assert e.value.code.endswith(".Malformed")


def test_trailing_newline_in_names_is_refused_by_every_action(ctl):
    refused(ctl, {"Action": "CreateInstance", "InstanceName": "abc\n"}, "InvalidInstanceName.Malformed")
    refused(ctl, {"Action": "CreateDisk", "Size": 20, "DiskName": "abc\n"}, "InvalidDiskName.Malformed")
    refused(ctl, {"Action": "DeleteImage", "ImageId": "m-" + "a" * 20 + "\n"}, "InvalidImageId.Malformed")


def test_lists_hold_strings(ctl):
    for bad in ([[1]], [{}], [None], [5]):
        refused(ctl, {"Action": "DescribeDisks", "DiskIds": bad}, contains="DiskIds")
    refused(ctl, {"Action": "DescribeDisks", "DiskIds.1": 5}, contains="DiskIds")


def test_check_request_walks_without_recursion():
    deep = {"Action": "X"}
    node = deep
    for _ in range(100000):  # far beyond Python's recursion limit
        node["k"] = {}
        node = node["k"]
    with pytest.raises(CloudError) as e:
        check_request(deep)
    assert "nest" in e.value.message
    assert check_request({"Action": "DescribeDisks", "DiskIds": ["d-x"]}) == "DescribeDisks"


def test_every_answer_is_json(ctl):
    for req in ({"Action": "CreateDisk", "Size": "²"}, {"Action": "x" * 100000}):
        json.dumps(ctl.handle(req))
    assert len(ctl.handle({"Action": "x" * 100000})["Message"]) < 2000  # an unknown action is not echoed whole


def test_failed_group_record_survives_a_failing_commit(ctl, monkeypatch):
    """On a full filesystem the record of a failed snapshot group cannot be
    committed either; it must still be shown, and become durable later."""
    from vdisk.engine.errors import NoSpace

    r = ctl.handle({"Action": "CreateInstance", "SystemDisk.Size": 1, "SystemDisk.PerformanceLevel": "PL0"})
    iid = r["InstanceId"]
    pool = ctl.pool

    def no_space(*a, **kw):
        raise NoSpace("the pool's filesystem is full")

    monkeypatch.setattr(pool, "snapshot", no_space)
    real_commit = pool.commit
    monkeypatch.setattr(pool, "commit", no_space)
    res = ctl.handle({"Action": "CreateSnapshotGroup", "InstanceId": iid, "Name": "doomed"})
    assert res["Code"] == "SnapshotGroup.Failed"
    gid = res["Message"].split()[2]
    # a later failing request does not drop it
    assert ctl.handle({"Action": "CreateDisk", "Size": "bad"})["Code"] == "InvalidParameter"
    shown = ctl.handle({"Action": "DescribeSnapshotGroups", "SnapshotGroupId": [gid]})["SnapshotGroups"]["SnapshotGroup"]
    assert [g["Status"] for g in shown] == ["failed"], shown
    monkeypatch.setattr(pool, "commit", real_commit)
    pool.commit()
    path = pool.path
    pool.close()
    reopened = Pool(path)
    try:
        assert reopened.get_record("snapshotgroup/" + gid)["Status"] == "failed"
    finally:
        reopened.close()
    ctl.pool = Pool(path)  # for the fixture's close


def test_pool_status_answers_when_a_commit_fails(ctl, monkeypatch):
    from vdisk.engine.errors import NoSpace

    ctl.handle({"Action": "CreateDisk", "Size": 20})

    def no_space(*a, **kw):
        raise NoSpace("mdb_txn_commit: No space left on device")

    monkeypatch.setattr(ctl.pool, "commit", no_space)
    res = ctl.handle({"Action": "DescribePool"})
    assert "Code" not in res, res
    assert "No space" in res["Pool"]["CommitError"]
    assert res["Pool"]["Volumes"] == 1


def test_values_inside_json_text_are_checked_too(ctl):
    # every value on the cloud's wire is text: a list may come as JSON text, and what it holds is checked as well
    refused(ctl, {"Action": "CreateInstance", "SystemDisk.Size": 1, "SystemDisk.PerformanceLevel": "PL0",
                  "DataDisk": '[{"Size": 1, "PerformanceLevel": "PL0", "Description": "bad \\udcff"}]'}, contains="Unicode")
    refused(ctl, {"Action": "DescribeDisks", "DiskIds": "[" * 50 + "]" * 50}, contains="nest")
    refused(ctl, {"Action": "DescribeDisks", "DiskIds": "[" * 5000 + "]" * 5000}, contains="JSON list")
    ok = ctl.handle({"Action": "CreateInstance", "SystemDisk.Size": "1", "SystemDisk.PerformanceLevel": "PL0",
                     "DataDisk": '[{"Size": "1", "PerformanceLevel": "PL0", "Description": "12345"}]'})
    assert "Code" not in ok, ok
    d = ctl.handle({"Action": "DescribeDisks", "DiskIds": '["%s"]' % ok["DataDiskIds"][0]})["Disks"]["Disk"][0]
    assert d["Description"] == "12345" and d["Size"] == 1


def test_error_messages_quote_long_values_cut_short(ctl):
    for req in ({"Action": "DeleteDisk", "DiskId": "d" * 100000}, {"Action": "CreateDisk", "Size": "20", "DiskName": "a" * 100000},
                {"Action": "x" * 100000}):
        res = ctl.handle(req)
        assert "Code" in res and len(res["Message"]) < 2000 and "characters)" in res["Message"], res["Message"][:300]
