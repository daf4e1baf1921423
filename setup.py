"""Build hook: package metadata lives in pyproject.toml; this file only adds native code.

The C++/CUDA extension ``hetlora_kernels._C`` is described in ``csrc/build.py``; when it
cannot be built here the install still succeeds (the torch and triton backends need no
compiled code) and says why in one paragraph.
"""

import importlib.util
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# pip may run this file from a temporary working directory with the project root off
# sys.path: load csrc/build.py by its path, relative to this file.
if HERE not in sys.path:
    sys.path.insert(0, HERE)


def _extension_setup_args():
    path = os.path.join(HERE, "csrc", "build.py")
    if not os.path.exists(path):  # e.g. an sdist made without csrc/
        return [], {}
    spec = importlib.util.spec_from_file_location("hetlora_csrc_build", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
        return mod.extension_setup_args()
    except Exception as e:  # noqa: BLE001 - never let the optional extension break the install
        print(
            f"\nhetlora: hetlora_kernels._C was not built: csrc/build.py failed ({type(e).__name__}: {e}). "
            "The torch and triton backends work without it.\n",
            file=sys.stderr,
        )
        return [], {}


ext_modules, cmdclass = _extension_setup_args()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
