import os
import sys

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
