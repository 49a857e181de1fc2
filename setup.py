"""Build the compiled cores of kbhash and kbstream.

Cython is a build requirement (pyproject.toml); generated C files are never
committed.  ``KB_ANNOTATE=1`` writes Cython's HTML annotation next to each
``.pyx``; ``KB_LINETRACE=1`` enables line tracing for coverage runs.
"""
import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

DIRECTIVES = {
    "language_level": 3,
    "embedsignature": True,
    "linetrace": os.environ.get("KB_LINETRACE") == "1",
}
macros = [("CYTHON_TRACE_NOGIL", "1")] if DIRECTIVES["linetrace"] else []

extensions = [
    Extension("kbhash._codec", ["src/kbhash/_codec.pyx"], define_macros=macros),
    Extension(
        "kbstream.bridge._codec",
        ["src/kbstream/bridge/_codec.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=macros + [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    ),
    Extension("kbstream.replay._chunkio", ["src/kbstream/replay/_chunkio.pyx"],
              define_macros=macros),
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=DIRECTIVES,
        include_path=["src"],
        annotate=os.environ.get("KB_ANNOTATE") == "1",
        # Always regenerate the C files: one built against another numpy (a build for
        # another interpreter in the same tree) would not compile.
        force=True,
    ),
)
