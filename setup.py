"""Builds the optional compiled kernels (``softxent._fused``, Cython); everything else is in pyproject.toml.

The extension is optional: on a machine without a C compiler the install still succeeds (setuptools
prints the compiler's error) and softxent runs its NumPy kernels instead (``softxent.show_config()`` says
which are in use).
"""

import os

from setuptools import Extension, setup

try:
    from Cython.Build import cythonize
except ImportError:  # a build without Cython (e.g. an sdist built elsewhere): the NumPy kernels only
    ext_modules = []
else:
    ext_modules = cythonize(
        [Extension("softxent._fused", ["src/softxent/_fused.pyx"], optional=True,
                   # -O3 lets gcc / clang unroll the short per-class loops; MSVC takes its own defaults
                   extra_compile_args=[] if os.name == "nt" else ["-O3"])],
        compiler_directives={"language_level": 3},
    )

setup(ext_modules=ext_modules)
