"""Converters from raw releases (zips, folders, CSV split files) to the shard format.

Every converter reads and fully decodes every image it will store BEFORE writing
anything, so a missing or corrupt file fails fast with its name and leaves no output.
Image bytes are stored as found (no re-encoding); resizing happens when reading.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from metadist.data.images import inspect_images, summarize
from metadist.data.ingest.sources import DirSource, ImageSource, ZipSource
from metadist.data.ingest.splits import STREAM_TEST, carve, seeded_order, split_by_fraction
from metadist.data.ingest.writer import ClassData, SplitData, check_output, write_dataset
from metadist.data.schema import SPLITS, ImageInfo, PreprocessingInfo, SourceInfo

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# As torchvision.datasets.folder.IMG_EXTENSIONS.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

OMNIGLOT_SPLITS = ("background-evaluation", "1200-423")
OMNIGLOT_SETS = {
    "background": "images_background",
    "small1": "images_background_small1",
    "small2": "images_background_small2",
    "evaluation": "images_evaluation",
}
OMNIGLOT_CHARACTERS = 1623
# Strokes are black on white; invert so strokes are 1.0, as learn2learn and Finn et al. do.
OMNIGLOT_PREPROCESSING = PreprocessingInfo(28, 1, True, (0.0,), (1.0,))
MINIIMAGENET_PREPROCESSING = PreprocessingInfo(84, 3, False, IMAGENET_MEAN, IMAGENET_STD)
ALL_ROTATIONS = (0, 90, 180, 270)


def _converter(function: str, /, **args: object) -> dict[str, object]:
    return {"function": f"{__name__}.{function}", "args": args}


def _validate(
    classes: Sequence[tuple[ImageSource, Sequence[str]]],
) -> tuple[str, tuple[int, int] | None]:
    """Fully decode every image of every (source, paths); return the manifest image info."""
    infos = []
    for source, paths in classes:
        infos.extend(inspect_images(paths, source.read, source.describe))
    return summarize(infos)


# --- Omniglot ---------------------------------------------------------------------------


def _open_omniglot_set(src: Path, folder: str) -> ImageSource:
    zip_path = src / f"{folder}.zip"
    if zip_path.is_file():
        return ZipSource(zip_path)
    if (src / folder).is_dir():
        return DirSource(src, folder)
    raise FileNotFoundError(
        f"Omniglot set {folder!r} not found: expected {zip_path} or the folder {src / folder}"
    )


def _omniglot_characters(source: ImageSource, folder: str) -> dict[str, list[str]]:
    """{"<Alphabet>/<characterNN>": sorted image paths} of one Omniglot set."""
    characters: dict[str, list[str]] = {}
    for path in source.files():
        if not path.lower().endswith(".png"):
            continue
        parts = path.split("/")
        if len(parts) != 4 or parts[0] != folder:
            raise ValueError(
                f"{source.describe(path)}: unexpected location; Omniglot images "
                f"live at {folder}/<Alphabet>/<characterNN>/<image>.png"
            )
        characters.setdefault(f"{parts[1]}/{parts[2]}", []).append(path)
    if not characters:
        raise ValueError(f"{source.name}: no Omniglot images found under {folder}/")
    return characters


def convert_omniglot(
    src: str | Path,
    out: str | Path,
    *,
    split: str = "background-evaluation",
    val_classes: int = 100,
    seed: int = 0,
    background: str = "background",
    rotations: bool = True,
    overwrite: bool = False,
) -> Path:
    """Convert Omniglot from ``src`` (release zips or extracted ``images_*`` folders).

    split="background-evaluation": train and val from the ``background`` set ("background",
    "small1" or "small2"), test = the evaluation set (659 characters, 20 alphabets).
    split="1200-423" (Finn et al. 2017): all 1623 characters sorted, shuffled with ``seed``;
    the first 1200 are the training pool, the other 423 are test. Needs the full sets.
    In both, ``val_classes`` characters drawn from the training pool with ``seed`` become
    val (0: no val split). Classes are named "<Alphabet>/<characterNN>", group = alphabet.

    ``rotations=True`` records [0, 90, 180, 270] in EVERY split's manifest: as in Finn et
    al. and learn2learn, each (character, rotation) is its own class in train, val and
    test alike. Rotations are applied when reading; the shards hold each image once.
    """
    src = Path(src)
    if split not in OMNIGLOT_SPLITS:
        raise ValueError(f"split must be one of {list(OMNIGLOT_SPLITS)}, got {split!r}")
    if background not in ("background", "small1", "small2"):
        raise ValueError(
            f"background must be 'background', 'small1' or 'small2', got {background!r}"
        )
    if split == "1200-423" and background != "background":
        raise ValueError(
            "split='1200-423' draws from all 1623 characters; it needs background='background'"
        )
    check_output(out, overwrite)

    with ExitStack() as stack:
        bg_folder, ev_folder = OMNIGLOT_SETS[background], OMNIGLOT_SETS["evaluation"]
        bg = stack.enter_context(_open_omniglot_set(src, bg_folder))
        ev = stack.enter_context(_open_omniglot_set(src, ev_folder))
        bg_chars = _omniglot_characters(bg, bg_folder)
        ev_chars = _omniglot_characters(ev, ev_folder)
        clash = sorted(set(bg_chars) & set(ev_chars))
        if clash:
            raise ValueError(f"character {clash[0]!r} is in both {bg.name} and {ev.name}")
        where = {c: bg for c in bg_chars} | {c: ev for c in ev_chars}
        paths = bg_chars | ev_chars

        if split == "background-evaluation":
            pool, test = sorted(bg_chars), sorted(ev_chars)
        else:
            everything = sorted(paths)
            if len(everything) != OMNIGLOT_CHARACTERS:
                raise ValueError(
                    f"split='1200-423' needs all {OMNIGLOT_CHARACTERS} characters,"
                    f" found {len(everything)} in {bg.name} and {ev.name}"
                )
            order = seeded_order(everything, seed, STREAM_TEST)
            pool, test = order[:1200], sorted(order[1200:])
        train, val = carve(pool, val_classes, seed)
        chosen = {"train": train, "val": val, "test": test}

        mode, shape = _validate([(where[c], paths[c]) for names in chosen.values() for c in names])
        source = SourceInfo(
            f"Omniglot (Lake et al. 2015): {bg_folder} + {ev_folder}", str(src.resolve())
        )
        splits = {
            name: SplitData(
                classes=[ClassData(c, c.split("/")[0], paths[c], where[c].read) for c in names],
                source=source,
                image=ImageInfo(mode, shape),
                preprocessing=OMNIGLOT_PREPROCESSING,
                rotations=ALL_ROTATIONS if rotations else (0,),
                method=split,
                seed=seed,
            )
            for name, names in chosen.items()
            if names
        }
        return write_dataset(
            out,
            splits,
            dataset="omniglot",
            overwrite=overwrite,
            converter=_converter(
                "convert_omniglot",
                src=str(src),
                split=split,
                val_classes=val_classes,
                seed=seed,
                background=background,
                rotations=rotations,
            ),
        )


# --- miniImageNet -----------------------------------------------------------------------


def _read_split_csv(
    csv_path: Path, available: set[str], source: ImageSource, owner: dict[str, str]
) -> dict[str, list[str]]:
    """{wnid: image paths in CSV order}; ``owner`` maps filename -> "<csv>:<line>" so far."""
    classes: dict[str, list[str]] = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["filename", "label"]:
            raise ValueError(f"{csv_path}:1: expected the header 'filename,label', got {header!r}")
        for row in reader:
            here = f"{csv_path}:{reader.line_num}"
            if not row:
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise ValueError(f"{here}: expected 'filename,label', got {row!r}")
            filename, label = row[0].strip(), row[1].strip()
            if "/" in filename or "\\" in filename or filename in (".", ".."):
                raise ValueError(f"{here}: filename {filename!r} must be a plain file name")
            if filename in owner:
                raise ValueError(f"{here}: image {filename!r} already listed at {owner[filename]}")
            member = f"images/{filename}"
            if member not in available:
                raise ValueError(f"{here}: image {filename!r} not found in {source.name}")
            owner[filename] = here
            classes.setdefault(label, []).append(member)
    if not classes:
        raise ValueError(f"{csv_path}: lists no images")
    return classes


def convert_miniimagenet(src: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Convert miniImageNet with the Ravi-Larochelle split files.

    ``src`` holds ``images/`` (or ``images.zip`` with ``images/<file>`` members) and
    train.csv / val.csv / test.csv (``filename,label``; a split whose CSV is absent is
    omitted). The JPEG bytes are stored unchanged.
    """
    src = Path(src)
    csv_paths = {s: src / f"{s}.csv" for s in SPLITS if (src / f"{s}.csv").is_file()}
    if not csv_paths:
        raise FileNotFoundError(f"{src}: no train.csv, val.csv or test.csv found")
    if (src / "images").is_dir():
        source: ImageSource = DirSource(src, "images")
    elif (src / "images.zip").is_file():
        source = ZipSource(src / "images.zip")
    else:
        raise FileNotFoundError(f"{src}: neither an images/ folder nor images.zip found")
    check_output(out, overwrite)

    with source:
        available = set(source.files())
        owner: dict[str, str] = {}
        chosen = {s: _read_split_csv(p, available, source, owner) for s, p in csv_paths.items()}
        label_split: dict[str, str] = {}
        for name, classes in chosen.items():
            for label in classes:
                if label in label_split:
                    raise ValueError(
                        f"class {label!r} appears in both {csv_paths[label_split[label]]}"
                        f" and {csv_paths[name]}; splits must be disjoint"
                    )
                label_split[label] = name

        mode, shape = _validate(
            [(source, c) for classes in chosen.values() for c in classes.values()]
        )
        info = SourceInfo(
            "miniImageNet (Vinyals et al. 2016), Ravi-Larochelle split CSVs", str(src.resolve())
        )
        splits = {
            name: SplitData(
                classes=[
                    ClassData(lab, None, classes[lab], source.read) for lab in sorted(classes)
                ],
                source=info,
                image=ImageInfo(mode, shape),
                preprocessing=MINIIMAGENET_PREPROCESSING,
                rotations=(0,),
                method="csv",
                seed=None,
            )
            for name, classes in chosen.items()
        }
        return write_dataset(
            out,
            splits,
            dataset="miniimagenet",
            overwrite=overwrite,
            converter=_converter("convert_miniimagenet", src=str(src)),
        )


# --- generic image folder ---------------------------------------------------------------


def convert_imagefolder(
    src: str | Path,
    out: str | Path,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
    name: str | None = None,
) -> Path:
    """Convert ``src/<class>/<image files>`` (nested folders included, as torchvision's
    ImageFolder) with a seeded, class-disjoint split. Bytes are stored unchanged.

    ``name`` is the dataset name recorded in the manifests (default: the folder's name).
    Recommended preprocessing: the stored size when uniform (else 84), 1 channel for
    all-greyscale data with mean 0 / std 1, else 3 channels with ImageNet statistics.
    """
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: not a directory")
    class_dirs = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"{src}: no class folders found (expected {src}/<class>/<images>)")
    if Path(out).resolve().is_relative_to(src.resolve()):
        # It would turn up as a class folder of the next conversion.
        raise ValueError(f"output {out} must not lie inside the image folder {src}")
    check_output(out, overwrite)

    source = DirSource(src)
    paths: dict[str, list[str]] = {}
    for label in class_dirs:
        files = [p for p in DirSource(src, label).files() if p.lower().endswith(IMAGE_EXTENSIONS)]
        if not files:
            raise ValueError(
                f"{src / label}: class folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})"
            )
        paths[label] = files
    chosen = split_by_fraction(class_dirs, val_fraction, test_fraction, seed)

    mode, shape = _validate([(source, paths[c]) for names in chosen.values() for c in names])
    grey = mode == "L"
    preprocessing = PreprocessingInfo(
        image_size=min(shape) if shape else 84,
        channels=1 if grey else 3,
        invert=False,
        mean=(0.0,) if grey else IMAGENET_MEAN,
        std=(1.0,) if grey else IMAGENET_STD,
    )
    dataset = name or src.resolve().name
    info = SourceInfo(f"image folder {dataset!r}", str(src.resolve()))
    splits = {
        split: SplitData(
            classes=[ClassData(c, None, paths[c], source.read) for c in names],
            source=info,
            image=ImageInfo(mode, shape),
            preprocessing=preprocessing,
            rotations=(0,),
            method="seeded-fraction",
            seed=seed,
        )
        for split, names in chosen.items()
    }
    return write_dataset(
        out,
        splits,
        dataset=dataset,
        overwrite=overwrite,
        converter=_converter(
            "convert_imagefolder",
            src=str(src),
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
            name=name,
        ),
    )
