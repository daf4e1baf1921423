"""Build hook: package metadata lives in pyproject.toml; this file only adds native code.

The C++/CUDA extension ``hetlora_kernels._C`` is described in ``csrc/build.py``;
when it cannot be built here the install still succeeds (the torch and triton
backends need no compiled code) and says why.
"""

from setuptools import setup

ext_modules, cmdclass = [], {}
try:
    from csrc.build import extension_setup_args  # type: ignore[import-not-found]
except ImportError:
    pass
else:
    ext_modules, cmdclass = extension_setup_args()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
