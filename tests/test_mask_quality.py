"""The statistical battery of bench/mask_quality.py at 2^22 bits (the 2^30-bit run is recorded
in bench/MASK_QUALITY.md): every check within 5 sigma."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

import mask_quality  # noqa: E402


def test_battery_at_2_pow_22_bits():
    results, total = mask_quality.battery(22)
    assert total >= 1 << 22
    failed = [(name, z) for name, z, _, ok in results if not ok]
    assert not failed, failed
