"""bench-amed: AMED-Solver and AMED-Plugin (Zhou et al., CVPR 2024) for sampler-bench."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bench-amed")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
