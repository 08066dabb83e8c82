"""A small real miniImageNet layout (a few classes of the Ravi-Larochelle CSVs, their real
JPEGs) for the fast tests; the ``mini_small_src`` and ``mini_small`` fixtures
(conftest) build and convert it once a session."""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

from conftest import real_data

PER_CLASS = 30
CLASSES = {"train": 4, "val": 2, "test": 3}


def read_rows(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="") as f:
        return [(r["filename"], r["label"]) for r in csv.DictReader(f)]


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "label"])
        writer.writerows(rows)


def make_small_mini(dest: Path, *, zipped: bool = False) -> Path:
    """A few real classes x PER_CLASS real images in the standard layout."""
    dest.mkdir(parents=True)
    chosen: dict[str, list[tuple[str, str]]] = {}
    for split, n in CLASSES.items():
        rows = read_rows(real_data("miniimagenet", f"{split}.csv"))
        labels = sorted({label for _, label in rows})[:n]
        chosen[split] = [r for lab in labels for r in [x for x in rows if x[1] == lab][:PER_CLASS]]
        write_csv(dest / f"{split}.csv", chosen[split])
    with zipfile.ZipFile(real_data("miniimagenet", "images.zip")) as z:
        images = {f"images/{f}": z.read(f"images/{f}") for rows in chosen.values() for f, _ in rows}
    if zipped:
        with zipfile.ZipFile(dest / "images.zip", "w") as z:
            for name, data in images.items():
                z.writestr(name, data)
    else:
        (dest / "images").mkdir()
        for name, data in images.items():
            (dest / name).write_bytes(data)
    return dest
