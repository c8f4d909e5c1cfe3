"""bench-skip-tuning: Skip-Tuning (Ma et al., ICML 2024) as a sampler-bench modifier."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bench-skip-tuning")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
