import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

import pytest


@pytest.fixture
def venv():
    """A running vdisk daemon in a temporary data directory (root only)."""
    from vdiskenv import VDiskEnv, need_root_fuse_loop

    need_root_fuse_loop()
    env = VDiskEnv()
    try:
        env.start()
        yield env
    finally:
        env.close()


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def ceph():
    """A single-node Ceph cluster (scripts/ceph-local) for the session: the
    environment with CEPH_CONF set.  Skips where Ceph is not installed."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    for tool in ("ceph-mon", "ceph-osd", "rbd"):
        if shutil.which(tool) is None:
            pytest.skip("needs Ceph (%s): scripts/ceph-local install" % tool)
    d = tempfile.mkdtemp(prefix="vdisk-ceph-")
    try:
        r = subprocess.run([os.path.join(REPO, "scripts", "ceph-local"), "start", d], capture_output=True, text=True,
                           timeout=300)
        if r.returncode != 0:
            pytest.fail("scripts/ceph-local start failed:\n%s%s" % (r.stdout, r.stderr))
        yield dict(os.environ, CEPH_CONF=os.path.join(d, "ceph.conf"))
    finally:
        subprocess.run([os.path.join(REPO, "scripts", "ceph-local"), "stop", d], timeout=120)
        shutil.rmtree(d, ignore_errors=True)
