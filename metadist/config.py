"""Typed run configuration: one YAML file per experiment, overridable from the command line.

Every field that changes a result lives here, so a run is reproducible from its config
alone and the config is logged with every run. The schema is enforced by OmegaConf:
unknown keys and values of the wrong type are errors that name the key.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclass
class DataConfig:
    dataset: str = "sinusoid"  # "sinusoid", or the directory of a converted dataset
    ways: int = 5
    shots: int = 1
    queries: int = 15
    train_ways: int | None = None  # meta-training episodes' classes; None: ways (a head
    # built per task, as protonet's, lets them differ: Snell et al. train 60-way)
    train_shots: int | None = None  # meta-training episodes' shots; None: shots
    train_queries: int | None = None  # meta-training episodes' queries; None: queries
    image_size: int | None = None  # None: the dataset manifest's recommendation
    channels: int | None = None
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    # A node-local directory where decoded classes are kept as memory-mapped .npy files,
    # shared by every process on the node and by later runs; None: each process decodes
    # and holds its own.
    decode_cache: str | None = None
    # The directory's size cap in GB (10^9 bytes), least recently used entries evicted
    # first; None: no cap.
    decode_cache_max_gb: float | None = None


@dataclass
class ModelConfig:
    # conv4 | mlp | resnet12 | torchvision:NAME | python:package.module:callable (any
    # torch.nn.Module backbone, see docs/models.md)
    name: str = "conv4"
    hidden: int = 64  # conv4 filters
    pool: str = "max"  # conv4: "max" (2x2 max-pool) or "stride" (stride-2 convs, Finn's Omniglot)
    readout: str = "mean"  # conv4: "mean" over the last feature map, or "flatten"
    mlp_hidden: list[int] = field(default_factory=lambda: [40, 40])
    # resnet12: the four residual blocks' widths (MetaOptNet's, Meta-Baseline's default)
    widths: list[int] = field(default_factory=lambda: [64, 160, 320, 640])
    # A checkpoint (of `metadist pretrain`, or any metadist run) whose parameters start
    # the backbone: every parameter but the head; None: the seeded initialisation.
    pretrained: str | None = None


@dataclass
class AlgorithmConfig:
    name: str = "maml"  # maml | fomaml | anil | reptile | metasgd | protonet
    inner_lr: float = 0.4  # α
    inner_steps: int = 1  # K during meta-training
    test_inner_steps: int = 3  # K at validation and meta-test
    first_order: bool | None = None  # None: the algorithm's own
    meta_batch_size: int = 32
    outer_lr: float = 0.001  # β
    outer_optimizer: str = "adam"  # adam | sgd (Reptile's β(φ-θ) update is sgd)
    outer_lr_final: float | None = None  # β annealed to this over train.steps
    outer_lr_schedule: str = "linear"  # linear | cosine (MAML++): how β anneals
    # Meta-steps taken first order before the second-order meta-gradient starts (MAML++'s
    # derivative-order annealing); 0: none.
    first_order_steps: int = 0
    # MAML++'s per-layer per-step learned inner rates (LSLR): a rate per parameter tensor
    # and inner step, started at inner_lr and meta-learned.
    lslr: bool = False
    # MAML++'s per-step batch-norm weights and biases: a copy per inner step, meta-learned
    # and not adapted in the inner loop (the statistics are each batch's own, per step).
    per_step_bn: bool = False
    # MAML++'s multi-step loss: over the first msl_steps meta-steps the query loss after
    # every inner step counts, annealed towards the last step's alone; 0: off.
    msl_steps: int = 0
    inner_batch: int = 0  # support rows per inner step (minibatches); 0: the whole support
    test_inner_batch: int | None = None  # at validation and meta-test; None: inner_batch
    inner_optimizer: str = "sgd"  # sgd | adam (first-order algorithms only)
    inner_betas: list[float] = field(default_factory=lambda: [0.0, 0.999])  # inner Adam's
    # The inner Adam's moments: "task" starts them at zero in every task; "carried" runs
    # them on from meta-batch to meta-batch and into evaluation (Nichol et al.'s Reptile).
    inner_state: str = "task"
    # Each task's classifier head starts from: "learned" (meta-learned, data.ways classes),
    # "prototypes" (Proto-MAML: the support set's class means, any number of classes) or
    # "zero" (any number of classes); None: the algorithm's own (protonet: prototypes).
    head_init: str | None = None
    # protonet's prototypes: "euclidean" (Snell et al.: negative squared distances) or
    # "cosine" (Chen et al.'s Classifier-Baseline: temperature x cosine similarity).
    metric: str = "euclidean"
    temperature: float = 10.0
    # Meta-Baseline's learned scale: the cosine prototypes' temperature a parameter that
    # starts at algorithm.temperature and is meta-trained with the rest.
    learn_temperature: bool = False


@dataclass
class TrainConfig:
    steps: int = 1000
    seed: int = 0
    inner_loop: str = "auto"  # auto (measure both, keep the faster) | loop | vmap
    chunk: int = 0  # tasks per vmap call; 0 = the whole meta-batch
    # Second-order inner steps recomputed in the outer backward instead of kept: the memory
    # of a task stops growing with algorithm.inner_steps, for about one more forward and
    # inner backward per step; the same meta-gradient.
    recompute_inner: bool = False
    # The query forward passes keep each block's input alone and recompute the block in the
    # outer backward: a task's query graph (most of its memory at 15 queries a class)
    # becomes one block's at a time, for one more query forward; the same meta-gradient.
    # The Conv4 and ResNet-12 (models with blocks); any algorithm with an outer graph.
    recompute_query: bool = False
    # Each worker's memory budget for its meta-gradients, in GB (10^9 bytes): at start-up
    # one task's peak is measured and the tasks run in chunks that fit (it sets
    # train.chunk); None: no budget.
    max_memory_gb: float | None = None
    log_every: int = 10
    val_every: int = 200
    val_episodes: int = 200
    checkpoint_every: int = 500
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    output_dir: str = "runs"
    progress: bool = True
    final_test: bool = True  # meta-test at the end; false: end on the validation split
    precision: str = "fp32"  # fp32 | bf16 (autocast in meta-training; evaluation stays fp32)


@dataclass
class EvalConfig:
    episodes: int = 600
    seed: int = 2017  # seeds the fixed set of test episodes; never the training seed
    batch_size: int = 50


@dataclass
class TrackingConfig:
    enabled: bool = True
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "metadist"
    run_name: str | None = None
    # `metadist train`: register the trained model in the Model Registry under this name
    # (an MLflow pyfunc model, a new version per run); empty: do not register.
    register_model: str = ""


@dataclass
class RayConfig:
    enabled: bool | None = None  # None: Ray Train when workers > 1, one local process otherwise
    address: str | None = None  # None: $RAY_ADDRESS, else a local Ray started for the run
    use_gpu: bool = False  # one GPU per worker, NCCL; gloo on CPU
    cpus_per_worker: float = 1.0
    max_failures: int = 0  # worker-group restarts from the last checkpoint before giving up
    storage_path: str | None = None  # Ray Train run storage; None: <train.output_dir>/ray
    actors: int = 2  # episode pipeline actors per worker (0: sample in the worker itself)
    actor_cpus: float = 0.25
    prefetch: int = 4  # meta-batches in flight per worker


@dataclass
class SearchDimension:
    """One searched key: ``loguniform``/``uniform`` in [low, high], ``int`` in low..high
    (inclusive), or ``choice`` of ``values``."""

    type: str = MISSING
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None


@dataclass
class TuneConfig:
    space: dict[str, SearchDimension] = field(default_factory=dict)  # dotted config keys
    search: str = "random"  # random | tpe (Optuna)
    num_samples: int = 8  # trials
    max_concurrent: int = 0  # trials at once; 0: as many as the resources allow
    metric: str = "auto"  # auto: val_accuracy (classification) or val_mse (regression)
    scheduler: str = "asha"  # asha | none
    grace_period: int = 0  # ASHA: steps before a trial can be stopped; 0: train.val_every
    reduction_factor: int = 3  # ASHA: keep the best 1/reduction_factor at each rung
    seed: int = 0  # seeds the search algorithm
    cpus_per_trial: float = 1.0  # a trial with workers > 1 adds its Ray Train workers' CPUs
    storage_path: str | None = None  # None: <train.output_dir>/sweeps
    name: str | None = None  # the sweep (its directory, its MLflow parent run); None: config name
    model_name: str | None = None  # Model Registry name of the best model; None: sweep name
    final_test: bool = True  # meta-test the best trial's model on the test split


@dataclass
class PretrainConfig:
    """Supervised pre-training (`metadist pretrain`, docs/pretraining.md): the backbone and
    a linear classifier over every class of data.train_split, data-parallel. The run's
    seed, device, threads, output directory and log interval are train.*'s; its few-shot
    validation and test follow data.*, algorithm.* (a prototype head) and eval.*."""

    epochs: int = 100  # passes over the training split's images
    steps: int | None = None  # batches in all; None: epochs x batches per epoch
    batch_size: int = 128  # images per step, over all workers (the last partial one dropped)
    # Images per forward pass and per batch-norm statistics: the batch is cut into these
    # whatever the number of workers, which share them out, so 1 and N workers compute the
    # same; 0: the whole batch at once (one worker).
    micro_batch: int = 0
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4  # on every parameter, as Meta-Baseline's and MetaOptNet's SGD
    schedule: str = "step"  # step (lr x gamma at each milestone) | cosine (to 0) | constant
    milestones: list[int] = field(default_factory=lambda: [90])  # epochs
    gamma: float = 0.1
    label_smoothing: float = 0.0
    # auto (none for 1-channel images, crop_flip for RGB) | none | crop_flip (zero-padded
    # random crop and horizontal flip) | resized_crop_flip (random resized crop and flip)
    augment: str = "auto"
    crop_padding: int = 8  # crop_flip's padding on each side, pixels
    # resnet12: DropBlock (MetaOptNet's) after blocks 3 and 4, its drop rate rising linearly
    # from 0 to this over the run; 0: off. Never at evaluation, never in meta-training.
    dropblock_rate: float = 0.0
    dropblock_size: int = 5
    val_every: float = 5.0  # epochs between few-shot validations (prototype head); 0: none
    checkpoint_every: float = 5.0  # epochs between checkpoints; 0: the final one only
    # The images handed over channels-last (NHWC in memory): oneDNN's and cuDNN's faster
    # convolution kernels; the same computation up to round-off (docs/pretraining.md).
    channels_last: bool = False


@dataclass
class Config:
    name: str = MISSING
    workers: int = 1
    resume: str | None = None  # a checkpoint to continue from
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


class ConfigError(ValueError):
    pass


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides (dotted, e.g. algorithm.inner_lr=0.1)."""
    merged = OmegaConf.structured(Config)
    where = "defaults"
    try:
        if path is not None:
            where = str(path)
            if not Path(path).is_file():
                raise ConfigError(f"config file not found: {path}")
            try:
                loaded = OmegaConf.load(path)  # YAML safe loading: no Python objects
            except OSError as err:
                if "Invalid loaded object type" in str(err):  # a scalar, not a mapping
                    raise ConfigError(f"{path}: a config is a mapping of keys, not "
                                      f"{str(err).split(':')[-1].strip()}") from None
                raise ConfigError(f"{path}: not a readable YAML file ({err})") from None
            except (yaml.YAMLError, UnicodeDecodeError) as err:
                mark = getattr(err, "problem_mark", None)
                at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                detail = getattr(err, "problem", None) or _first_line(err)
                raise ConfigError(f"{path}: not a readable YAML file ({detail}{at})") from None
            if not isinstance(loaded, DictConfig):
                raise ConfigError(f"{path}: a config is a mapping of keys, not a "
                                  f"{type(loaded).__name__}")
            refuse_resolvers(loaded, where)
            merged = OmegaConf.merge(merged, loaded)
        # Keys only: a value may be what the message refuses (a secret).
        where = f"command-line overrides of {[item.partition('=')[0] for item in overrides]}"
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
        dotlist = OmegaConf.from_dotlist(list(overrides))
        refuse_resolvers(dotlist, where)
        merged = OmegaConf.merge(merged, dotlist)
        if OmegaConf.is_missing(merged, "name"):
            merged.name = Path(path).stem if path is not None else "run"
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid config ({where}): {_describe(err)}") from None
    try:
        validate(config)
    except ConfigError as err:
        if path is None:
            raise
        # The file, not the overrides: an override may hold what the message refuses.
        raise ConfigError(f"{err} (config {path})") from None
    return config


def _describe(err: OmegaConfBaseException) -> str:
    """OmegaConf's first line, with the key it is about (it keeps that in ``full_key``)."""
    key = getattr(err, "full_key", None)
    line = _first_line(err)
    return f"{key}: {line}" if key and key not in line else line


_RESOLVER = re.compile(r"\$\{[^}]*:")  # ${oc.env:HOME}, ${oc.decode:...}: not ${data.ways}


def refuse_resolvers(conf: DictConfig, where: str) -> None:
    """A config is recorded with every run (its file, MLflow params, checkpoints), so it may
    not pull values from the environment or any other resolver (``${oc.env:TOKEN}`` would
    record a secret); interpolating another key (``${data.ways}``) is fine."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(f"{prefix}[{i}]", v)
        else:
            flat[prefix] = value

    walk("", OmegaConf.to_container(conf, resolve=False))
    for key, value in flat.items():
        if isinstance(value, str) and _RESOLVER.search(value):
            raise ConfigError(f"{where}: {key} uses a resolver ({value.split(':')[0]}:...}}); "
                              "configs are recorded with every run, so values may not come "
                              "from the environment: write the value itself")


def config_from_dict(data: dict[str, Any]) -> Config:
    try:
        refuse_resolvers(OmegaConf.create(data), "config")
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), data))
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid config: {_describe(err)}") from None
    validate(config)
    return config


def to_dict(config: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def flatten(config: Config) -> dict[str, Any]:
    """``{"algorithm.inner_lr": 0.4, ...}``: the form MLflow params take."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = value

    walk("", to_dict(config))
    return out


# Fields that name places on disk, relative to the working directory of the process that
# reads them: a Tune trial or a job on the local cluster runs in another one.
PATH_KEYS = ("data.dataset", "data.decode_cache", "train.output_dir", "ray.storage_path",
             "resume", "tune.storage_path", "model.pretrained")


def absolute_paths(config: Config) -> dict[str, str]:
    """``{key: absolute path}`` for each of the config's local paths that is relative
    (URIs and the built-in ``sinusoid`` data set are not paths)."""
    from metadist.data.location import is_uri  # here: pyarrow is slow to import

    flat = flatten(config)
    return {
        key: str(Path(value).resolve()) for key in PATH_KEYS
        if isinstance(value := flat.get(key), str) and value and value != "sinusoid"
        and not is_uri(value) and not Path(value).is_absolute()
    }


def validate(config: Config) -> None:
    _validate_model(config)
    choices = {
        "algorithm.outer_optimizer": (config.algorithm.outer_optimizer, ("adam", "sgd")),
        "algorithm.outer_lr_schedule": (config.algorithm.outer_lr_schedule,
                                        ("linear", "cosine")),
        "train.inner_loop": (config.train.inner_loop, ("auto", "loop", "vmap")),
        "train.precision": (config.train.precision, ("fp32", "bf16")),
        "model.pool": (config.model.pool, ("max", "stride")),
        "model.readout": (config.model.readout, ("mean", "flatten")),
        "tune.search": (config.tune.search, ("random", "tpe")),
        "tune.scheduler": (config.tune.scheduler, ("asha", "none")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}")
    at_least = {  # a None value falls back to another key
        "data.ways": (config.data.ways, 1),
        "data.shots": (config.data.shots, 1),
        "data.train_ways": (config.data.train_ways, 1),
        "data.train_shots": (config.data.train_shots, 1),
        "data.train_queries": (config.data.train_queries, 1),  # the training curves' scores
        "data.queries": (config.data.queries, 1),  # no query: nothing to score, a NaN result
        "train.log_every": (config.train.log_every, 1),
        "train.val_every": (config.train.val_every, 0),
        "train.val_episodes": (config.train.val_episodes, 1),
        "train.checkpoint_every": (config.train.checkpoint_every, 0),
        "train.threads": (config.train.threads, 0),
        "train.chunk": (config.train.chunk, 0),
        "ray.actors": (config.ray.actors, 0),
        "ray.max_failures": (config.ray.max_failures, 0),
        "algorithm.meta_batch_size": (config.algorithm.meta_batch_size, 1),
        "algorithm.first_order_steps": (config.algorithm.first_order_steps, 0),
        "algorithm.msl_steps": (config.algorithm.msl_steps, 0),
        "eval.episodes": (config.eval.episodes, 1),
        "eval.batch_size": (config.eval.batch_size, 1),
        "workers": (config.workers, 1),
        "ray.prefetch": (config.ray.prefetch, 1),
        "tune.num_samples": (config.tune.num_samples, 1),
        "tune.max_concurrent": (config.tune.max_concurrent, 0),
    }
    for key, (value, low) in at_least.items():
        if value is not None and value < low:
            raise ConfigError(f"{key}={value} must be >= {low}")
    positive = {"algorithm.outer_lr": config.algorithm.outer_lr,
                "ray.actor_cpus": config.ray.actor_cpus,
                "tune.cpus_per_trial": config.tune.cpus_per_trial}
    for key, value in positive.items():
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{key}={value} must be a finite number > 0")
    # 0 is a GPU worker that reserves no CPU.
    if not (math.isfinite(config.ray.cpus_per_worker) and config.ray.cpus_per_worker >= 0):
        raise ConfigError(f"ray.cpus_per_worker={config.ray.cpus_per_worker} must be a finite "
                          "number >= 0")
    _validate_algorithm(config.algorithm)
    _validate_inner_loop(config)
    _validate_memory(config)
    _refuse_credentials(config)
    _validate_model_names(config)
    final = config.algorithm.outer_lr_final
    if final is not None and not 0 <= final <= config.algorithm.outer_lr:
        raise ConfigError(f"algorithm.outer_lr_final={final} must lie in [0, algorithm.outer_lr="
                          f"{config.algorithm.outer_lr}] (it anneals β down)")
    if config.tune.reduction_factor < 2:
        raise ConfigError(f"tune.reduction_factor={config.tune.reduction_factor} must be >= 2")
    if config.train.steps < 0:
        raise ConfigError(f"train.steps={config.train.steps} must be >= 0")
    cap = config.data.decode_cache_max_gb
    if cap is not None:
        if not cap > 0:
            raise ConfigError(f"data.decode_cache_max_gb={cap} must be > 0 (GB)")
        if not config.data.decode_cache:
            raise ConfigError(f"data.decode_cache_max_gb={cap} caps the decode cache, and "
                              "data.decode_cache is not set (name a node-local directory)")
    _validate_heads(config)
    _validate_pretrain(config)
    if config.algorithm.msl_steps and config.algorithm.name not in ("maml", "fomaml", "metasgd"):
        raise ConfigError(
            f"algorithm.msl_steps={config.algorithm.msl_steps} weights the query loss after "
            f"every inner step of all parameters, which algorithm.name="
            f"{config.algorithm.name!r} does not take: use maml, fomaml or metasgd")
    if config.algorithm.per_step_bn and config.model.name == "mlp":
        raise ConfigError(
            f"algorithm.per_step_bn=true keeps batch-norm weights per inner step, and "
            f"model.name={config.model.name!r} has no batch norm: use model.name=conv4 "
            "or resnet12")
    # The defaults alone (sinusoid data, the Conv4) do not make a run: say what is missing.
    # (An MLP on an image dataset is refused where the model is built, from the data.)
    if config.data.dataset == "sinusoid" and config.model.name != "mlp":
        raise ConfigError(
            f"model.name={config.model.name!r} does not fit data.dataset='sinusoid': the "
            "sinusoid tasks (1-d regression) take model.name=mlp; for images, convert a "
            "dataset (`metadist data convert ...`) and set data.dataset to it")


_SECRET_QUERY = re.compile(r"(secret|password|passwd|token|access_key|credential|signature)",
                          re.IGNORECASE)


def redact(uri: str) -> str:
    """``uri`` as it may be shown: no ``user:password@``, no query (options may be keys)."""
    parts = urlsplit(uri)
    if not parts.scheme or not parts.netloc:
        return uri
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}"


def credentials_in(uri: str) -> str | None:
    """What secret ``uri`` carries (``user:password@``, or a query option such as
    ``secret_key``), or None."""
    if "://" not in uri:
        return None
    parts = urlsplit(uri)
    query = [k for k, _ in parse_qsl(parts.query) if _SECRET_QUERY.search(k)]
    if query:
        return f"query option {query[0]!r}"
    if parts.password is not None or parts.username is not None:
        return "user:password@"
    return None


def _refuse_credentials(config: Config) -> None:
    """No value of a config may carry a secret: the config is recorded with every run (its
    run directory, checkpoints, MLflow params). The message shows the URI redacted."""
    for key, value in flatten(config).items():
        if isinstance(value, str) and (what := credentials_in(value)):
            raise ConfigError(
                f"{key}={redact(value)}...: the URI carries credentials ({what}), and configs "
                "are recorded with every run. Give them to the client instead: for MLflow "
                "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, for object stores the "
                "cloud SDK's environment (AWS_ACCESS_KEY_ID, ...), for Ray its token file")


def _validate_model_names(config: Config) -> None:
    """Model Registry names as MLflow takes them (``_validate_model_name`` in
    ``mlflow.utils.validation``): refused here, before training, not after it."""
    names = {"tracking.register_model": config.tracking.register_model,
             "tune.model_name": config.tune.model_name}
    for key, name in names.items():
        if not name:
            continue
        if not name.strip() or any(c in name for c in "/:") or name.strip() in (".", ".."):
            raise ConfigError(f"{key}={name!r} is not a Model Registry name: it may not be "
                              "blank, '.' or '..', nor contain '/' or ':'")
    if config.tracking.register_model and not config.tracking.enabled:
        raise ConfigError(f"tracking.register_model={config.tracking.register_model!r} "
                          "registers the model in MLflow, and tracking.enabled=false: "
                          "enable tracking, or drop tracking.register_model")


def _validate_model(config: Config) -> None:
    """``model.name`` and the values of its kind. A ``python:`` backbone is only checked
    for its form here: validating a config (a checkpoint's among them) never imports it."""
    from metadist.models import MODEL_NAMES
    from metadist.models.backbone import SOURCES, check_source

    name = config.model.name
    if name.startswith(SOURCES):
        try:
            check_source(name)
        except ValueError as err:
            raise ConfigError(f"model.name={name!r}: {err}") from None
    elif name not in MODEL_NAMES:
        raise ConfigError(f"model.name={name!r} is not one of {list(MODEL_NAMES)}, "
                          "torchvision:NAME or python:package.module:callable")
    widths = list(config.model.widths)
    if len(widths) != 4 or not all(w > 0 for w in widths):
        raise ConfigError(f"model.widths={widths} must be 4 positive integers (the "
                          "resnet12 blocks' widths)")


def _validate_inner_loop(config: Config) -> None:
    """Second order under vmap takes the im2col layers, which a torch module lacks (the
    loop's ``auto`` then picks the loop; an explicit vmap is refused here)."""
    from metadist.algorithms.meta import MetaStep
    from metadist.models.backbone import SOURCES

    name = config.model.name
    step = MetaStep.from_config(config.algorithm)
    if name.startswith(SOURCES) and config.train.inner_loop == "vmap" \
            and not step.is_first_order:
        raise ConfigError(
            f"train.inner_loop='vmap' runs second-order {step.algorithm!r} on metadist's "
            f"im2col layers, which model.name={name!r} (a torch module) has not: use "
            "train.inner_loop=loop, or auto, which picks it")


def _validate_memory(config: Config) -> None:
    """The memory switches: a budget is a positive number and sets the chunk itself;
    recomputing inner steps needs second-order ones, recomputing blocks needs a model with
    blocks and an outer backward."""
    from metadist.algorithms.meta import MetaStep

    budget = config.train.max_memory_gb
    if budget is not None:
        if not (math.isfinite(budget) and budget > 0):
            raise ConfigError(f"train.max_memory_gb={budget} must be a finite number > 0 (GB)")
        if config.train.chunk:
            raise ConfigError(f"train.chunk={config.train.chunk} and train.max_memory_gb="
                              f"{budget} both set the tasks per chunk: set one of them")
    step = MetaStep.from_config(config.algorithm)
    if config.train.recompute_inner and step.is_first_order:
        if step.algorithm == "protonet":
            what = "algorithm.name='protonet' has no inner loop"
        elif config.algorithm.first_order is None:
            what = f"algorithm.name={step.algorithm!r} takes first-order ones"
        else:
            what = "algorithm.first_order=true takes first-order ones"
        raise ConfigError(f"train.recompute_inner=true recomputes second-order inner steps, "
                          f"and {what}, which keep no inner graph: drop train.recompute_inner")
    if config.train.recompute_query:
        if config.model.name not in ("conv4", "resnet12"):
            raise ConfigError(f"train.recompute_query=true recomputes a model's blocks, and "
                              f"model.name={config.model.name!r} has none metadist knows: use "
                              "conv4 or resnet12, or drop train.recompute_query")
        if step.algorithm == "reptile":
            raise ConfigError("train.recompute_query=true recomputes the query forward in the "
                              "outer backward, and algorithm.name='reptile' takes no outer "
                              "backward: drop train.recompute_query")


def _validate_heads(config: Config) -> None:
    """A head built per task needs classes; only such a head can change the ways."""
    from metadist.algorithms.meta import MetaStep

    step = MetaStep.from_config(config.algorithm)
    if step.any_ways and config.data.dataset == "sinusoid":
        what = ("algorithm.name='protonet'" if step.algorithm == "protonet"
                else f"algorithm.head_init={step.head!r}")
        raise ConfigError(f"{what} builds each task's head from its classes, and "
                          "data.dataset='sinusoid' is regression: use a classification dataset")
    ways = config.data.train_ways
    if ways is not None and ways != config.data.ways and not step.any_ways:
        raise ConfigError(
            f"data.train_ways={ways} differs from data.ways={config.data.ways}, and "
            f"algorithm.name={step.algorithm!r} meta-learns a head of data.ways outputs: "
            "set algorithm.head_init=prototypes (Proto-MAML) or zero, or drop data.train_ways")


PRETRAIN_SCHEDULES = ("step", "cosine", "constant")
PRETRAIN_AUGMENTATIONS = ("auto", "none", "crop_flip", "resized_crop_flip")


def _validate_pretrain(config: Config) -> None:
    """The ``pretrain`` section's values (checked for every config, like every section)."""
    p = config.pretrain
    for key, value, allowed in (("schedule", p.schedule, PRETRAIN_SCHEDULES),
                                ("augment", p.augment, PRETRAIN_AUGMENTATIONS)):
        if value not in allowed:
            raise ConfigError(f"pretrain.{key}={value!r} is not one of {list(allowed)}")
    for key, value, low in (("epochs", p.epochs, 1), ("steps", p.steps, 1),
                            ("batch_size", p.batch_size, 1), ("micro_batch", p.micro_batch, 0),
                            ("crop_padding", p.crop_padding, 0),
                            ("dropblock_size", p.dropblock_size, 1)):
        if value is not None and value < low:
            raise ConfigError(f"pretrain.{key}={value} must be >= {low}")
    if not (math.isfinite(p.lr) and p.lr > 0):
        raise ConfigError(f"pretrain.lr={p.lr} must be a finite number > 0")
    if not 0 < p.gamma <= 1:
        raise ConfigError(f"pretrain.gamma={p.gamma} must lie in (0, 1] (the factor of the "
                          "rate at each milestone)")
    below = {"momentum": (p.momentum, 1), "label_smoothing": (p.label_smoothing, 1),
             "dropblock_rate": (p.dropblock_rate, 1), "weight_decay": (p.weight_decay, math.inf),
             "val_every": (p.val_every, math.inf),
             "checkpoint_every": (p.checkpoint_every, math.inf)}
    for key, (value, high) in below.items():
        if not (math.isfinite(value) and 0 <= value < high):
            raise ConfigError(f"pretrain.{key}={value} must be " + (
                f"in [0, {high})" if high < math.inf else "a finite number >= 0"))
    if p.nesterov and not p.momentum > 0:
        raise ConfigError(f"pretrain.nesterov=true needs momentum, and pretrain.momentum="
                          f"{p.momentum}: set pretrain.momentum (0.9) or nesterov=false")
    milestones = list(p.milestones)
    if any(m < 1 for m in milestones) or milestones != sorted(set(milestones)):
        raise ConfigError(f"pretrain.milestones={milestones} must be increasing epochs >= 1")
    if p.dropblock_rate > 0 and config.model.name != "resnet12":
        raise ConfigError(f"pretrain.dropblock_rate={p.dropblock_rate} drops blocks of "
                          f"ResNet-12's last two stages, and model.name={config.model.name!r}"
                          " has none: use model.name=resnet12, or pretrain.dropblock_rate=0")


def check_pretraining(config: Config) -> None:
    """What ``metadist pretrain`` needs beyond a valid config: images, and a few-shot head
    built per task for its validation and test episodes (the classifier's head has one
    output per training class, not ``data.ways``)."""
    from metadist.algorithms.meta import MetaStep

    if config.data.dataset == "sinusoid" or config.model.name == "mlp":
        raise ConfigError(f"data.dataset={config.data.dataset!r} with model.name="
                          f"{config.model.name!r}: pre-training classifies the images of a "
                          "converted dataset; set data.dataset to one, and an image model")
    step = MetaStep.from_config(config.algorithm, test=True)
    if not step.any_ways:
        raise ConfigError(
            f"algorithm.name={step.algorithm!r} with a learned head: the pre-trained model's "
            "head has one output per training class, and the few-shot episodes it is "
            f"validated and tested on have data.ways={config.data.ways}: set "
            "algorithm.name=protonet (a prototype head on the pre-trained backbone), or "
            "algorithm.head_init=prototypes to fine-tune from one")
    p = config.pretrain
    micro_batches = -(-p.batch_size // (p.micro_batch or p.batch_size))
    if uses_ray(config) and config.workers > micro_batches:
        raise ConfigError(
            f"workers={config.workers} share each batch of pretrain.batch_size={p.batch_size} "
            f"by micro-batches, and pretrain.micro_batch={p.micro_batch} makes "
            f"{micro_batches}: set pretrain.micro_batch to {p.batch_size // config.workers} "
            "or less (a micro-batch is a batch-norm statistics' group, so the result does "
            "not depend on the workers)")
    for key in ("lslr", "per_step_bn"):
        if getattr(config.algorithm, key):
            raise ConfigError(f"algorithm.{key}=true adds parameters that meta-training "
                              "learns, and pre-training has none to learn: drop it here, and "
                              "set it in the meta-training run that starts from the backbone")


def _validate_algorithm(algorithm: AlgorithmConfig) -> None:
    """The algorithm's rules live with the algorithm: its meta-training step and its
    meta-test step are built here once, and a value they refuse names its config key."""
    from metadist.algorithms.meta import MetaStep

    for test in (False, True):
        try:
            MetaStep.from_config(algorithm, test=test)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def train_episode_shape(data: DataConfig) -> tuple[int, int, int]:
    """(ways, shots, queries) of meta-training episodes; validation and test use
    data.ways, data.shots and data.queries."""
    ways = data.ways if data.train_ways is None else data.train_ways
    shots = data.shots if data.train_shots is None else data.train_shots
    return ways, shots, data.queries if data.train_queries is None else data.train_queries


def uses_ray(config: Config) -> bool:
    """Ray Train runs the workers when asked, or when there is more than one."""
    return config.ray.enabled if config.ray.enabled is not None else config.workers > 1


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0]


def resolve_config(name: str) -> Path:
    """A path, or the name of a file in ./configs (``omniglot_5w1s_maml``)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (Path("configs") / name, Path("configs") / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"config not found: {name}")
