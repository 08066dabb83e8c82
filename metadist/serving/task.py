"""One few-shot task as a request: parsing, limits, and the answer.

A request is a mapping with three fields, one task:

    {"support": [IMAGE, ...], "labels": [LABEL, ...], "query": [IMAGE, ...]}

An IMAGE is an encoded image file (PNG, JPEG, ...) as bytes or as a base64 string; a
LABEL a string (or an integer). For a regression model (feature rows, no preprocessing)
``support``/``query`` are lists of rows of numbers and ``labels`` the support targets.
The answer is ``{"labels": [...], "probabilities": [[...]], "classes": [...]}`` (for
regression ``{"predictions": [[...]]}``).

``parse_task`` checks and decodes a request; a server with a cache splits it in two,
``read_task`` (checks, and the support set's hash, from the encoded bytes) and
``decode_task``, so that a support set whose adapted model it holds is never decoded.

Everything a client can get wrong raises :class:`BadRequest`, whose message names the
field and, for an image, its index; servers answer it with HTTP 400 and keep serving.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from metadist.learner import AdaptedLearner, Learner

FIELDS = ("support", "labels", "query")


class BadRequest(ValueError):
    """A request that cannot be answered as sent (HTTP 400); the message names the field."""


@dataclass(frozen=True)
class Limits:
    """What one request may hold. Defaults fit a 2-core CPU replica answering in seconds."""

    max_images: int = 1000  # support and query together
    max_image_bytes: int = 2 * 2**20  # encoded size of one image
    max_pixels: int = 4096 * 4096  # width x height of one image, checked before decoding
    # A request's whole body, refused (HTTP 413) before it is read or parsed: room for a
    # task of Omniglot- or miniImageNet-size images up to max_images, not for max_images
    # images of max_image_bytes each (2.8 GB in base64).
    max_request_bytes: int = 64 * 2**20


@dataclass
class Task:
    """A parsed request: decoded inputs and the cache key of its support set."""

    support: list  # PIL images, or rows of numbers for a regression model
    labels: list
    query: list
    key: str  # hash of the support set and its labels: equal keys adapt equally
    # False: the images are the encoded files still (``read_task``; ``decode_task``).
    support_decoded: bool = True
    query_decoded: bool = True

    @property
    def images(self) -> int:
        return len(self.support) + len(self.query)


def parse_task(payload: object, learner: Learner, limits: Limits = Limits()) -> Task:
    """Check ``payload`` against ``learner`` and ``limits``; decode its inputs."""
    return decode_task(read_task(payload, learner, limits), limits)


def read_task(payload: object, learner: Learner, limits: Limits = Limits()) -> Task:
    """Check ``payload``'s fields, counts, labels and image sizes, and hash its support
    set, without decoding an image: the Task's images are still the encoded files. A server
    looks the key up before paying for decoding (``decode_task``)."""
    if not isinstance(payload, Mapping):
        raise BadRequest(f"a task is an object with fields {list(FIELDS)}, got "
                         f"{type(payload).__name__}")
    missing = [f for f in FIELDS if f not in payload]
    unknown = sorted(set(payload) - set(FIELDS))
    if missing or unknown:
        raise BadRequest(f"fields {list(FIELDS)} expected: "
                         + "; ".join(([f"missing {missing}"] if missing else [])
                                     + ([f"unknown {unknown}"] if unknown else [])))
    support, labels, query = (_list(payload[f], f) for f in FIELDS)
    if not support:
        raise BadRequest("support: empty; a task needs labelled support examples")
    if not query:
        raise BadRequest("query: empty; nothing to predict")
    if len(labels) != len(support):
        raise BadRequest(f"labels: {len(labels)} labels for {len(support)} support examples")
    if len(support) + len(query) > limits.max_images:
        raise BadRequest(f"support + query: {len(support) + len(query)} examples, more than "
                         f"the {limits.max_images} this server takes in one task")
    digest = hashlib.sha256()
    if learner.preprocessing is None:
        support = _rows(support, "support", digest)
        query = _rows(query, "query")
        labels = [_number(v, f"labels[{i}]") for i, v in enumerate(labels)]
        width = getattr(learner.model, "in_features", None)
        for field, rows in (("support", support), ("query", query)):
            if width is not None and len(rows[0]) != width:
                raise BadRequest(f"{field}: rows of {len(rows[0])} numbers, but the model "
                                 f"takes {width} features")
        decoded = True
    else:
        support = [_encoded(v, f"support[{i}]", limits) for i, v in enumerate(support)]
        query = [_encoded(v, f"query[{i}]", limits) for i, v in enumerate(query)]
        labels = [_label(v, f"labels[{i}]") for i, v in enumerate(labels)]
        ways, classes = learner.ways, len(set(labels))
        if classes < 2:
            raise BadRequest("labels: a task needs at least 2 distinct classes, got "
                             f"{classes}")
        if ways is not None and classes != ways:
            raise BadRequest(f"labels: {classes} distinct classes, but this model was "
                             f"meta-trained for {ways}-way tasks with a learned head and "
                             "takes exactly that many")
        for data in support:
            digest.update(hashlib.sha256(data).digest())
        decoded = False
    digest.update(repr(labels).encode())
    return Task(support, labels, query, digest.hexdigest(), decoded, decoded)


def decode_task(task: Task, limits: Limits = Limits(), *, support: bool = True) -> Task:
    """``task`` with its images decoded (each checked against ``limits`` first); the
    support set's only if ``support`` (a server that holds the support set's adapted model
    needs the queries alone)."""
    if support and not task.support_decoded:
        task.support = [_decode(v, f"support[{i}]", limits) for i, v in enumerate(task.support)]
        task.support_decoded = True
    if not task.query_decoded:
        task.query = [_decode(v, f"query[{i}]", limits) for i, v in enumerate(task.query)]
        task.query_decoded = True
    return task


def answer(adapted: AdaptedLearner, task: Task) -> dict:
    """The adapted model's predictions for the task's queries, as JSON-ready values."""
    out = adapted.predict_proba(task.query)
    if not torch.isfinite(out).all():
        # Never a NaN answer dressed as a prediction: the server reports an error (500).
        raise FloatingPointError("the adapted model produced non-finite outputs for this "
                                 "task")
    if adapted.classes is None:
        return {"predictions": out.tolist()}
    probabilities = out.tolist()
    labels = [adapted.classes[max(range(len(p)), key=p.__getitem__)] for p in probabilities]
    return {"labels": labels, "probabilities": probabilities, "classes": list(adapted.classes)}


def adapt(learner: Learner, task: Task) -> AdaptedLearner:
    """``learner`` adapted to the task's support set; a refusal becomes a BadRequest."""
    try:
        return learner.adapt(task.support, task.labels)
    except ValueError as err:
        raise BadRequest(str(err)) from None


def _list(value: object, field: str) -> list:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        # numpy arrays and pandas cells arrive here as arrays: accept what iterates.
        if hasattr(value, "tolist") and not isinstance(value, str | bytes):
            return list(value.tolist())
        raise BadRequest(f"{field}: expected a list, got {type(value).__name__}")
    return list(value)


def _encoded(value: object, field: str, limits: Limits) -> bytes:
    """The encoded image file a request carries, within the size limit; not decoded."""
    if isinstance(value, str):
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"{field}: not valid base64 (send the encoded image file's "
                             "bytes, base64-encoded)") from None
    elif isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
    else:
        raise BadRequest(f"{field}: expected an encoded image (bytes or a base64 string), "
                         f"got {type(value).__name__}")
    if len(data) > limits.max_image_bytes:
        raise BadRequest(f"{field}: {len(data):,} bytes, more than the "
                         f"{limits.max_image_bytes:,} this server takes per image")
    return data


def _decode(data: bytes, field: str, limits: Limits) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size  # from the header, before any pixel is decoded
            if width * height > limits.max_pixels:
                raise BadRequest(f"{field}: {width}x{height} pixels, more than the "
                                 f"{limits.max_pixels:,} this server takes per image")
            image.load()
    except BadRequest:
        raise
    except Exception as err:  # PIL raises many types for bad bytes
        raise BadRequest(f"{field}: not a decodable image ({type(err).__name__}: "
                         f"{err})") from None
    return image


def _label(value: object, field: str) -> str | int:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise BadRequest(f"{field}: a label is a string or an integer, got "
                         f"{type(value).__name__}")
    return value


def _number(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value):
        raise BadRequest(f"{field}: expected a finite number, got {value!r}")
    return float(value)


def _rows(value: list, field: str, digest=None) -> list[list[float]]:
    rows = []
    for i, row in enumerate(value):
        row = _list(row, f"{field}[{i}]") if not isinstance(row, int | float) else [row]
        rows.append([_number(v, f"{field}[{i}]") for v in row])
    if len({len(r) for r in rows}) > 1:
        raise BadRequest(f"{field}: rows of different lengths {sorted({len(r) for r in rows})}")
    if digest is not None:
        digest.update(repr(rows).encode())
    return rows
