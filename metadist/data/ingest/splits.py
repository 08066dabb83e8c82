"""Seeded, class-disjoint splitting of class names.

Each draw uses its own ``numpy.random.default_rng([seed, stream])`` so that changing one
split parameter (say, the number of validation classes) does not reshuffle another.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Independent random streams per purpose, for the reason given above.
STREAM_TEST = 0
STREAM_VAL = 1


def seeded_order(names: Sequence[str], seed: int, stream: int) -> list[str]:
    """``names`` sorted, then permuted by ``default_rng([seed, stream])``."""
    ordered = sorted(names)
    perm = np.random.default_rng([seed, stream]).permutation(len(ordered))
    return [ordered[i] for i in perm]


def carve(
    pool: Sequence[str], count: int, seed: int, stream: int = STREAM_VAL, what: str = "validation"
) -> tuple[list[str], list[str]]:
    """Split ``pool`` into (rest, carved) with ``count`` seeded-random classes carved out.

    Both lists come back sorted. At least one class must remain in ``rest``.
    """
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count < len(pool):
        raise ValueError(
            f"cannot take {count!r} {what} classes from a pool of {len(pool)} "
            f"classes (need 0 <= count < {len(pool)})"
        )
    order = seeded_order(pool, seed, stream)
    return sorted(order[count:]), sorted(order[:count])


def fraction_count(total: int, fraction: float) -> int:
    # A positive fraction always yields at least one class: asking for a validation
    # split and silently getting none would be worse than a slightly larger one.
    return 0 if fraction == 0 else max(1, round(total * fraction))


def split_by_fraction(
    names: Sequence[str], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[str]]:
    """Class-disjoint {"train", "val", "test"} (empty splits omitted), seeded and sorted."""
    for what, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= f < 1:
            raise ValueError(f"{what} must be in [0, 1), got {f}")
    n_test = fraction_count(len(names), test_fraction)
    n_val = fraction_count(len(names), val_fraction)
    if n_test + n_val >= len(names):
        raise ValueError(
            f"{len(names)} classes are too few for val_fraction={val_fraction} and "
            f"test_fraction={test_fraction}: {n_val} val + {n_test} test classes would leave "
            "no training class"
        )
    rest, test = carve(names, n_test, seed, STREAM_TEST, "test")
    train, val = carve(rest, n_val, seed, STREAM_VAL)
    return {k: v for k, v in (("train", train), ("val", val), ("test", test)) if v}
