"""The rules every restore must keep, shared by the host's and the guest's scenarios."""


def _few(items, n=3) -> str:
    return "; ".join("%s: %s" % x for x in items[:n]) + (" ..." if len(items) > n else "")


def judge_files(state: list[tuple[str, str, int]], before: int) -> list[str]:
    """The rules of a power cut at one instant, over (name, state, t_done)
    in the order the files were made: every file acknowledged before the
    snapshot began (t_done < before) is whole; no file has its full size with
    other content; the whole files form a prefix of the log (file k+1 was
    created only after file k's fsync returned)."""
    problems = []
    lost = [(n, s) for n, s, t in state if t < before and s != "whole"]
    if lost:
        problems.append("%d of %d files fsynced before the snapshot are not whole (%s)" % (
            len(lost), sum(1 for *_, t in state if t < before), _few(lost)))
    garbled = [(n, s) for n, s, _ in state if s.startswith("full size") or s.startswith("unreadable")]
    if garbled:
        problems.append("%d files have their full size but not their data (%s)" % (len(garbled), _few(garbled)))
    first_bad = next((i for i, (_, s, _) in enumerate(state) if s != "whole"), None)
    if first_bad is not None:
        later_whole = [n for n, s, _ in state[first_bad + 1:] if s == "whole"]
        if later_whole:
            problems.append("%s is %s but %d later files are whole (e.g. %s): not one point in time" % (
                state[first_bad][0], state[first_bad][1], len(later_whole), later_whole[0]))
    return problems
