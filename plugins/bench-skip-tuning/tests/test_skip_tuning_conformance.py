"""The host's conformance suite (bench.testing.check_modifier) on skip-tuning.

On the digits UNet architecture with random weights (no weights file needed): the
modifier returns a Denoiser, every network call passes the NFE counter (skip-tuning adds
none), samples through it are repeatable and independent of their batch mates, and
factors of 1 change nothing.
"""

from bench.testing import check_modifier, random_unet


def test_skip_tuning_conformance():
    check_modifier(
        "skip-tuning",
        model=random_unet(),
        options={"rho_bottom": 0.8, "rho_top": 1.1},
        neutral={"rho_bottom": 1.0, "rho_top": 1.0},
    )
