"""bench-upsample-guidance: upsample guidance (Hwang, Park, Jo 2024) as a sampler-bench modifier."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bench-upsample-guidance")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
