__version__ = "0.1.0"

# first of all: synehr.core tunes glibc's malloc on import, which must happen before other threads allocate (core.tune_malloc)
from . import core as _core  # noqa: E402,F401
