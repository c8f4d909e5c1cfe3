"""bench-learned-schedules: searched and learned time steps (GITS, LD3, DMN) for sampler-bench."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bench-learned-schedules")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
