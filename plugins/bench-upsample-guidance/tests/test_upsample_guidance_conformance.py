"""The host's conformance suite (bench.testing.check_modifier) on upsample guidance.

On the digits UNet architecture with random weights at twice its resolution: the
modifier returns a Denoiser, every network call passes the NFE counter (the guidance's
low-resolution calls as extra), samples through it are repeatable and independent of
their batch mates, and a weight of 0 computes exactly the network at 2x.
"""

from bench.testing import check_modifier, random_unet


def test_upsample_guidance_conformance():
    check_modifier(
        "upsample-guidance",
        model=random_unet(),
        options={"m": 2, "w": 1.0, "eta": 0.6},
        neutral={"m": 2, "w": 0.0},
    )
