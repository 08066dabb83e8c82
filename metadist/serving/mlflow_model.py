"""A trained learner as an MLflow pyfunc model: one few-shot task per row in, its answer out.

    info = log_learner("runs/.../checkpoints/final.pt", name="omniglot-protonet")
    mlflow models serve -m models:/omniglot-protonet/1 --env-manager local -h 127.0.0.1

The model is metadist's own code (shipped with it as ``code_paths``) plus the checkpoint
(an artifact, loaded by ``Learner.load``): the preprocessing the model was trained with
travels inside the checkpoint, so a client sends encoded image files, never tensors. A
request is parsed, bounded and answered by ``serving.task`` exactly as every other server
of metadist does it; a client's mistake becomes an ``MlflowException`` with error code
INVALID_PARAMETER_VALUE, which MLflow's scoring server answers with HTTP 400 and the
message (``ERROR_CODE_TO_HTTP_STATUS`` in ``mlflow.exceptions``).

Images are base64 strings in the signature (``Array(string)``), not ``Array(binary)``:
MLflow 3.17 enforces an ``Array(binary)`` column with numpy's ``bytes_`` dtype, which
does not base64-decode the strings a JSON request carries and strips trailing NUL bytes
from the raw bytes a Python caller passes (``_enforce_array`` in ``mlflow.models.utils``).
Raw bytes go through the ``Learner`` API.
"""

from __future__ import annotations

import base64
import io
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR
from mlflow.types.schema import Array, ColSpec, DataType, Schema
from PIL import Image, ImageDraw

import metadist
from metadist.data.episodes import Preprocessing
from metadist.learner import Learner
from metadist.serving.cache import AdaptedCache
from metadist.serving.task import BadRequest, Limits, adapt, answer, parse_task

ARTIFACT = "checkpoint"  # the key of the checkpoint in the model's artifacts
CHECKPOINT_FILE = "checkpoint.pt"  # its file name there: <model>/artifacts/checkpoint.pt
PACKAGE_DIR = Path(metadist.__file__).resolve().parent

# What ``mlflow.pyfunc.load_model(uri, model_config={...})`` may change at load time.
MODEL_CONFIG: dict[str, Any] = {
    "device": "cpu",
    "cache_mb": 256,  # adapted models kept for repeated support sets
    "max_images": Limits.max_images,
    "max_image_bytes": Limits.max_image_bytes,
    "max_pixels": Limits.max_pixels,
}

# Models from code: MLflow stores this script and runs it on load, instead of unpickling
# a Python object; the metadist it imports is the copy logged beside it (code_paths, put
# first on sys.path by MLflow) unless the loading process imported metadist already.
MODEL_SCRIPT = '''"""metadist's few-shot learner as an MLflow pyfunc model (models from code)."""
import mlflow

from metadist.serving.mlflow_model import LearnerModel

mlflow.models.set_model(LearnerModel())
'''


class LearnerModel(mlflow.pyfunc.PythonModel):
    """Answers few-shot tasks with the learner in the model's checkpoint artifact."""

    # The signature is given explicitly (``signature``); MLflow's type-hint validation
    # would only warn that ``predict`` has none.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        config = {**MODEL_CONFIG, **(context.model_config or {})}
        self.learner = Learner.load(context.artifacts[ARTIFACT], config["device"])
        self.limits = Limits(config["max_images"], config["max_image_bytes"],
                             config["max_pixels"])
        self.cache = AdaptedCache(int(config["cache_mb"] * 2**20))

    # ``model_input`` is left unannotated: a type hint would make MLflow derive the
    # signature from it and change how its scoring server parses requests.
    def predict(self, context, model_input, params=None) -> list[dict]:
        """One answer per task: a row of the DataFrame MLflow builds from a request, or a
        dict (a list of dicts) given to the model directly."""
        tasks = tasks_of(model_input)
        return [self.answer(task, f"task {i}: " if len(tasks) > 1 else "")
                for i, task in enumerate(tasks)]

    def answer(self, payload: object, where: str = "") -> dict:
        try:
            task = parse_task(payload, self.learner, self.limits)
            # A support set seen before (same images, same labels) skips the inner loop.
            adapted = self.cache.get(task.key)
            if adapted is None:
                adapted = adapt(self.learner, task)
                self.cache.put(task.key, adapted)
            return answer(adapted, task)
        except BadRequest as err:
            raise MlflowException.invalid_parameter_value(where + str(err)) from None
        except FloatingPointError as err:  # the model's failure, not the client's: a 500
            raise MlflowException(where + str(err), error_code=INTERNAL_ERROR) from None


def tasks_of(model_input: object) -> list:
    """The tasks of a request: DataFrame rows, a list of mappings, or one mapping."""
    if isinstance(model_input, pd.DataFrame):
        return model_input.to_dict("records")
    if isinstance(model_input, list):
        return model_input
    return [model_input]


# -- what the registry shows: signature, input example, usage ---------------------------


def signature(learner: Learner) -> ModelSignature:
    """Columns support/labels/query in, labels/probabilities/classes out (for a regression
    model: rows of numbers in, predictions out)."""
    if learner.preprocessing is None:
        rows = Array(Array(DataType.double))
        return ModelSignature(
            inputs=Schema([ColSpec(rows, "support"), ColSpec(Array(DataType.double), "labels"),
                           ColSpec(rows, "query")]),
            outputs=Schema([ColSpec(rows, "predictions")]))
    names = Array(DataType.string)
    return ModelSignature(
        inputs=Schema([ColSpec(names, "support"), ColSpec(names, "labels"),
                       ColSpec(names, "query")]),
        outputs=Schema([ColSpec(names, "labels"),
                        ColSpec(Array(Array(DataType.double)), "probabilities"),
                        ColSpec(names, "classes")]))


def input_example(learner: Learner) -> pd.DataFrame:
    """One task the model answers: a synthetic image per class at the model's size and
    channels, as many classes as a learned head takes (3 where any number will do)."""
    if learner.preprocessing is None:
        width = getattr(learner.model, "in_features", None) or 1
        task = {"support": [[x] * width for x in (-2.0, 0.0, 2.0)], "labels": [0.9, 0.0, -0.9],
                "query": [[x] * width for x in (-1.0, 1.0)]}
    else:
        ways = learner.ways or 3
        images = [synthetic_image(learner.preprocessing, c, ways) for c in range(ways)]
        task = {"support": images, "labels": [f"class-{c}" for c in range(ways)],
                "query": images[::-1]}
    return pd.DataFrame([task])


def synthetic_image(pre: Preprocessing, c: int, ways: int) -> str:
    """A base64 PNG of the model's size and channels: a dark stroke on white (as Omniglot's
    characters are drawn), its slant telling class ``c`` of ``ways`` apart."""
    size = pre.image_size
    image = Image.new("L" if pre.channels == 1 else "RGB", (size, size), "white")
    x = round(c * (size - 1) / max(ways - 1, 1))
    ImageDraw.Draw(image).line([(x, 0), (size - 1 - x, size - 1)], fill="black",
                               width=max(1, size // 10))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def usage(name: str, version: str, learner: Learner) -> str:
    """The registered model's description: what it takes, and how to call it."""
    uri = f"models:/{name}/{version}"
    if learner.preprocessing is None:
        what = ("Regression: `support` and `query` are lists of feature rows (lists of "
                "numbers), `labels` the support rows' targets; the answer is "
                "`{\"predictions\": [[...], ...]}`, one row per query.")
        task = '{"support": [[0.1], [0.5]], "labels": [0.2, 0.4], "query": [[0.3]]}'
    else:
        pre = learner.preprocessing
        ways = (f"exactly {learner.ways} classes per task (a learned head)" if learner.ways
                else "any number of classes (2 or more) per task")
        what = (f"Few-shot classification ({learner.step.algorithm}), {ways}. `support` and "
                "`query` are encoded image files (PNG, JPEG, ...) as base64 strings, of any "
                f"size: the model resizes them to {pre.image_size}x{pre.image_size}, "
                f"{pre.channels} channel(s), and normalises them as in training. `labels` "
                "names each support image's class. The answer: `labels` (one per query), "
                "`probabilities` (one row per query, columns in the order of `classes`) and "
                "`classes`.")
        task = '{"support": ["<base64 PNG>", ...], "labels": ["a", ...], "query": [...]}'
    return f"""A metadist few-shot learner: one task per request, adapted on its support set.

{what} Mistakes (a label count that differs from the support set's, an undecodable or \
oversized image, too many images) answer HTTP 400 with a message naming the field. \
The model version's input example is a complete request.

Serve it (on loopback) and ask it, with your images' base64 in place of the placeholders:

```
mlflow models serve -m {uri} --env-manager local -h 127.0.0.1 -p 5001
curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
  -d '{{"dataframe_records": [{task}]}}'
```

From Python:

```
import mlflow
model = mlflow.pyfunc.load_model("{uri}")
model.predict({task})  # a list: one answer per task
```

See metadist's docs/serving.md."""


# -- logging and registering ------------------------------------------------------------


def log_learner(checkpoint: str | Path, name: str | None = None) -> dict[str, Any]:
    """Log the checkpoint's learner as the pyfunc model ``model`` of the active MLflow
    run; register it as ``name`` if given. ``checkpoint``: a local file, or an artifact
    URI (``runs:/RUN_ID/checkpoints/final.pt``). Returns name, version and model URI."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / CHECKPOINT_FILE
        fetch_checkpoint(checkpoint, local)
        learner = Learner.load(local)
        script = Path(tmp) / "learner_model.py"
        script.write_text(MODEL_SCRIPT)
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(script), artifacts={ARTIFACT: str(local)},
            code_paths=[str(PACKAGE_DIR)], pip_requirements=requirements(),
            signature=signature(learner), input_example=input_example(learner),
            model_config=dict(MODEL_CONFIG), registered_model_name=name,
        )
    if name is None:
        return {"name": None, "version": None, "model_uri": info.model_uri}
    version = str(info.registered_model_version)
    text = usage(name, version, learner)
    client = mlflow.MlflowClient()
    client.update_registered_model(name, description=text)
    client.update_model_version(name, version, description=text)
    return {"name": name, "version": version, "model_uri": f"models:/{name}/{version}"}


def fetch_checkpoint(checkpoint: str | Path, dest: Path) -> None:
    """A copy of ``checkpoint`` at ``dest``: the model's artifact gets one name whatever
    the run called its file."""
    if Path(checkpoint).is_file():
        shutil.copyfile(checkpoint, dest)
        return
    if ":/" not in str(checkpoint):  # runs:/..., s3://..., not a local path
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.move(mlflow.artifacts.download_artifacts(str(checkpoint), dst_path=tmp), dest)


def requirements() -> list[str]:
    """What the model needs beside metadist's own code, which travels with it: the torch
    that logged it (pinned: checkpoints and numerics follow it), and the libraries
    metadist imports."""
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", "pyarrow", "pillow", "omegaconf",
            "pandas", f"mlflow=={mlflow.__version__}"]
