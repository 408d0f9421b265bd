"""Build glue: compiles the C in csrc/ through cffi (see pyproject.toml)."""
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


class BuildExtClear(build_ext):
    """Turn a compiler failure into a message that says what to install."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - re-raised with advice
            sys.stderr.write(
                "\nvdisk: building the C extension (csrc/blockops.c) failed: %s\n"
                "vdisk needs a C compiler and the Python headers: on Debian,\n"
                "  apt-get install gcc python3-dev libffi-dev\n"
                "then install vdisk again.\n\n" % exc
            )
            raise SystemExit(1)


setup(
    cffi_modules=[
        "src/vdisk/engine/_build_native.py:ffibuilder",
        "src/vdisk/fuse/_build_lowlevel.py:ffibuilder",
    ],
    cmdclass={"build_ext": BuildExtClear},
)
