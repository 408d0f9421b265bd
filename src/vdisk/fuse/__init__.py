"""The FUSE layer: serves a pool's volumes as files (pyfuse3 on trio).

It knows the storage engine's volume API and nothing of the cloud's rules:
the control plane tells it which named files to show (see DiskFS.expose).
"""
from . import discard

discard.install()  # before anything imports pyfuse3
