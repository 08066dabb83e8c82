"""Supervised pre-training (``metadist pretrain``): it learns, resumes bit for bit, gives
the 1-worker result on 2 workers, hands its backbone to meta-training, is evaluated by the
meta-test protocol with a prototype head, and DropBlock does what MetaOptNet's does."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_torchrun

from metadist.algorithms import MetaStep
from metadist.cli import main
from metadist.config import ModelConfig, load_config
from metadist.data.augment import Augmentation, resized_crop_box
from metadist.models import ResNet12, build_model, model_from_spec
from metadist.models.layers import DropBlock, drop_block
from metadist.training import pretrain as pretrain_module
from metadist.training.checkpoint import load_checkpoint
from metadist.training.loop import initial_params, train
from metadist.training.pretrain import dropblock, pretrain
from metadist.training.streams import open_streams

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/omniglot_pretrain_conv4.yaml"


def tiny(dataset: Path, out: Path, *overrides: str) -> list[str]:
    """The Omniglot pre-training config made tiny: the validation split's 80 classes
    (20 characters x 4 rotations, 1,600 images) as the training set, a Conv4 of 16 filters,
    no validation, 20 test episodes."""
    return [f"data.dataset={dataset}", f"train.output_dir={out}", "data.train_split=val",
            "data.val_split=test", "data.queries=5", "model.hidden=16", "pretrain.epochs=1",
            "pretrain.batch_size=64", "pretrain.micro_batch=0", "pretrain.val_every=0",
            "pretrain.checkpoint_every=0", "train.val_episodes=10", "eval.episodes=20",
            "eval.batch_size=10", "train.log_every=1", "train.progress=false",
            "train.threads=1", "tracking.enabled=false", *overrides]


# A small ResNet-12 with every source of randomness on: DropBlock, crops and flips, label
# smoothing, Nesterov momentum, a milestone after the first epoch; 400-image batches in two
# micro-batches, 4 steps an epoch.
RANDOM = ["model.name=resnet12", "model.widths=[4,4,8,8]", "pretrain.dropblock_rate=0.2",
          "pretrain.augment=crop_flip", "pretrain.crop_padding=4", "pretrain.label_smoothing=0.1",
          "pretrain.nesterov=true", "pretrain.schedule=step", "pretrain.milestones=[1]",
          "pretrain.batch_size=400", "pretrain.micro_batch=200", "eval.episodes=8"]


def test_pretraining_lowers_the_loss_and_ends_with_a_meta_test(tmp_path, omniglot_small):
    result = pretrain(load_config(ROOT / CONFIG, tiny(omniglot_small, tmp_path,
                                                      "pretrain.epochs=3")))
    history = json.loads((Path(result["run_dir"]) / "history.json").read_text())
    assert result["steps"] == len(history) == 3 * 25 and result["classes"] == 80
    losses = [h["train_loss"] for h in history]
    assert losses[0] == pytest.approx(math.log(80), abs=0.3)  # chance over 80 classes
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    assert result["metric"] == "accuracy" and result["split"] == "test"
    assert result["episodes"] == 20 and result["algorithm"] == "protonet"
    assert result["head"] == "prototypes" and result["inner_steps"] == 0
    assert result["mean"] > 0.3  # 5-way: 0.2 is chance
    assert [h["lr"] for h in history[-1:]] == [pytest.approx(0.1 * 0.5 * (
        1 + math.cos(math.pi * 74 / 75)))]  # the cosine schedule's last step


def test_resume_continues_the_identical_trajectory_bit_for_bit(tmp_path, omniglot_small):
    # 2T steps against T steps and a resume, with every random draw of the recipe on
    # (order, crops, flips, DropBlock) and momentum in the optimiser's state.
    def config(name: str):
        return load_config(ROOT / CONFIG, tiny(omniglot_small, tmp_path / name, *RANDOM,
                                               "pretrain.epochs=2",
                                               "pretrain.checkpoint_every=1"))

    full = pretrain(config("full"))
    half = Path(full["run_dir"]) / "checkpoints" / "step-0000004.pt"
    resumed = pretrain(config("resumed"), resume=half)
    assert resumed["resumed_from_step"] == 4
    a, b = load_checkpoint(full["checkpoint"]), load_checkpoint(resumed["checkpoint"])
    assert a["step"] == b["step"] == 8
    for k in a["params"]:
        torch.testing.assert_close(a["params"][k], b["params"][k], rtol=0, atol=0)
    for i, state in a["optimizer"]["state"].items():  # the momentum buffers
        torch.testing.assert_close(state["momentum_buffer"],
                                   b["optimizer"]["state"][i]["momentum_buffer"], rtol=0, atol=0)
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    assert [h["lr"] for h in a["history"]] == [0.1] * 4 + [pytest.approx(0.01)] * 4
    assert resumed["mean"] == full["mean"]


def test_a_sigterm_stops_after_the_step_in_flight_and_the_run_resumes_from_it(
        tmp_path, omniglot_small, monkeypatch, capsys):
    import os
    import signal

    from metadist.data.labelled import LabelledImages
    from metadist.training.signals import sigterm_unwinds

    real, calls = LabelledImages.load, []

    def load(self, indices):  # one call a step (one micro-batch): signal in step 3
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, indices)

    def config(name: str):
        return load_config(ROOT / CONFIG, tiny(omniglot_small, tmp_path / name,
                                               "pretrain.steps=5", "pretrain.augment=crop_flip"))

    monkeypatch.setattr(LabelledImages, "load", load)
    with pytest.raises(SystemExit) as stopped, sigterm_unwinds():  # as `metadist pretrain`
        pretrain(config("a"))
    monkeypatch.undo()
    assert stopped.value.code == 128 + signal.SIGTERM
    ckpt = next((tmp_path / "a").glob("*/checkpoints/step-0000003.pt"))
    assert f"stopped after step 3 of 5; continue with resume={ckpt}" in capsys.readouterr().err
    resumed, full = pretrain(config("b"), resume=ckpt), pretrain(config("c"))
    a, b = load_checkpoint(full["checkpoint"]), load_checkpoint(resumed["checkpoint"])
    for k in a["params"]:
        torch.testing.assert_close(a["params"][k], b["params"][k], rtol=0, atol=0)
    assert resumed["mean"] == full["mean"]


@pytest.mark.parametrize("model", [["model.hidden=8"], [*RANDOM, "model.widths=[4,4,8,8]"]],
                         ids=["conv4", "resnet12"])
def test_channels_last_images_reach_the_model_and_compute_the_same_loss(
        model, tmp_path, mini_small, monkeypatch):
    # RGB images: with one channel (Omniglot) channels-last and NCHW are the same layout.
    formats: list[bool] = []
    built = pretrain_module.build_model

    def spying(*args, **kwargs):
        net = built(*args, **kwargs)
        features = net.features

        def recorded(params, x, *args, **kwargs):
            if x.shape[0] >= 30:  # a training micro-batch, not an episode's support or query
                formats.append(x.is_contiguous(memory_format=torch.channels_last))
            return features(params, x, *args, **kwargs)

        object.__setattr__(net, "features", recorded)  # a frozen dataclass
        return net

    monkeypatch.setattr(pretrain_module, "build_model", spying)
    first_loss = {}
    for layout in ("false", "true"):
        formats.clear()
        result = pretrain(load_config(ROOT / "configs/miniimagenet_pretrain_conv4.yaml", [
            f"data.dataset={mini_small}", f"train.output_dir={tmp_path / layout}", *model,
            "data.ways=2", "data.queries=5", "pretrain.batch_size=60", "pretrain.micro_batch=30",
            "pretrain.steps=2", "pretrain.val_every=0", "pretrain.checkpoint_every=0",
            "train.final_test=false", "train.val_episodes=4", "train.progress=false",
            "train.log_every=1", "train.threads=1", "tracking.enabled=false",
            f"pretrain.channels_last={layout}"]))
        assert set(formats) == {layout == "true"} and len(formats) == 4
        history = json.loads((Path(result["run_dir"]) / "history.json").read_text())
        first_loss[layout] = history[0]["train_loss"]
    # The same parameters and images: the same loss up to float32's round-off. (After an
    # update the two drift apart further, as any change of kernels makes them: a max-pool's
    # near-tie goes the other way; the float64 test below is the exact comparison.)
    assert first_loss["true"] == pytest.approx(first_loss["false"], rel=1e-5)


@pytest.mark.parametrize("name, spec", [("conv4", {"hidden": 8, "readout": "flatten"}),
                                        ("resnet12", {"widths": [4, 4, 8, 8]})])
def test_a_channels_last_batch_gives_the_same_loss_and_gradients_in_float64(name, spec):
    net = build_model(ModelConfig(name=name, **spec), ways=4, in_channels=3, image_size=84)
    params = {k: v.double().requires_grad_()
              for k, v in net.init_params(torch.Generator().manual_seed(0)).items()}
    x = torch.rand(20, 3, 84, 84, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.arange(20) % 4

    def loss_and_grads(images):
        loss = F.cross_entropy(net.head(params, net.features(params, images)), y)
        return [loss, *torch.autograd.grad(loss, list(params.values()))]

    for a, b in zip(loss_and_grads(x),
                    loss_and_grads(x.contiguous(memory_format=torch.channels_last))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_two_workers_end_with_the_parameters_of_one(tmp_path, omniglot_small):
    overrides = tiny(omniglot_small, tmp_path / "out", *RANDOM, "pretrain.steps=3")
    single = pretrain(load_config(ROOT / CONFIG, overrides), run_dir=tmp_path / "one")
    run_torchrun(2, ["-m", "metadist.worker", "--pretrain"], [CONFIG, *overrides],
                 tmp_path / "two", timeout=300)
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["workers"] == 2
    a = load_checkpoint(tmp_path / "one" / "checkpoints" / "final.pt")
    b = load_checkpoint(tmp_path / "two" / "checkpoints" / "final.pt")
    initial = build_model(load_config(ROOT / CONFIG, overrides).model, ways=80, in_channels=1,
                          image_size=28).init_params(torch.Generator().manual_seed(0))
    # Bit for bit: each worker computes one of the two micro-batches that one process
    # computes in turn, and a + b is b + a (more micro-batches than workers would sum in
    # another order, equal up to float32 round-off).
    for k in a["params"]:
        assert not torch.equal(a["params"][k], initial[k]), k  # it trained
        torch.testing.assert_close(b["params"][k], a["params"][k], rtol=0, atol=0)
    assert [h["train_loss"] for h in b["history"]] == [h["train_loss"] for h in a["history"]]
    assert two["mean"] == single["mean"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, omniglot_small) -> Path:
    out = tmp_path_factory.mktemp("pretrained")
    result = pretrain(load_config(ROOT / CONFIG, tiny(omniglot_small, out, "pretrain.steps=3",
                                                      "eval.episodes=1")))
    return Path(result["checkpoint"])


@pytest.mark.parametrize("algorithm", ["protonet", "maml", "metasgd", "maml++"])
def test_model_pretrained_starts_the_backbone_and_nothing_else(algorithm, pretrained, tmp_path,
                                                                omniglot_small):
    extra = {"maml++": ["algorithm.per_step_bn=true", "algorithm.inner_steps=2"]}
    overrides = [f"data.dataset={omniglot_small}", f"train.output_dir={tmp_path}",
                 "model.hidden=16", f"model.pretrained={pretrained}", "data.train_ways=5",
                 f"algorithm.name={algorithm.rstrip('+')}", *extra.get(algorithm, [])]
    cfg = load_config(ROOT / "configs" / "omniglot_5w1s_protonet.yaml", overrides)
    model = build_model(cfg.model, ways=5, in_channels=1, image_size=28)
    params = initial_params(cfg, model, MetaStep.from_config(cfg.algorithm))
    saved = load_checkpoint(pretrained)["params"]
    seeded = model.init_params(torch.Generator().manual_seed(cfg.train.seed))
    for k in model.init_params():
        expected = seeded[k] if k in model.head_keys else saved[k]
        torch.testing.assert_close(params[k], expected, rtol=0, atol=0)
    if algorithm == "maml++":  # the per-step batch norms start from the pre-trained ones
        torch.testing.assert_close(params["bnstep.bn0.weight"][0], saved["bn0.weight"],
                                   rtol=0, atol=0)
    if algorithm == "metasgd":
        assert params["lr.conv0.weight"].shape == saved["conv0.weight"].shape
    # and a run starts from it
    result = train(load_config(ROOT / "configs" / "omniglot_5w1s_protonet.yaml", overrides + [
        "train.steps=1", "train.val_every=0", "eval.episodes=4", "train.progress=false",
        "tracking.enabled=false", "train.inner_loop=loop"]))
    assert result["steps"] == 1


@pytest.mark.parametrize("override, message", [
    ("model.hidden=8", "parameter 'conv0.weight' is [16, 1, 3, 3] in the checkpoint and "
                       "[8, 1, 3, 3] in this model"),
    ("model.name=resnet12", "the checkpoint has no parameter 'layer1.conv1.weight'"),
    ("model.pool=stride", "the checkpoint's model has pool='max', and this run's "
                          "pool='stride' (model.pool)"),
])
def test_model_pretrained_refuses_another_architecture_naming_it(override, message, pretrained,
                                                                 tmp_path, omniglot_small,
                                                                 capsys):
    code = main(["train", str(ROOT / "configs" / "omniglot_5w1s_protonet.yaml"),
                 f"data.dataset={omniglot_small}", f"train.output_dir={tmp_path}",
                 "model.hidden=16", f"model.pretrained={pretrained}", override,
                 "tracking.enabled=false", "train.progress=false"])
    assert code == 2
    assert message in capsys.readouterr().err


def test_the_prototype_head_evaluation_is_the_direct_computation(pretrained):
    # The pre-training's final test (one episode) against prototypes written out.
    state = load_checkpoint(pretrained)
    result = json.loads((pretrained.parents[1] / "result.json").read_text())
    cfg = load_config(pretrained.parents[1] / "config.yaml")
    model, params = model_from_spec(state["model"]), state["params"]
    episode = open_streams(cfg.data, train_seed=0, eval_seed=cfg.eval.seed).test.episode(0)
    with torch.no_grad():
        support = model.features(params, episode.support_x)  # each set's own batch norm
        query = model.features(params, episode.query_x)
    prototypes = torch.stack([support[episode.support_y == c].mean(0) for c in range(5)])
    logits = -torch.cdist(query.double(), prototypes.double()) ** 2
    assert result["episodes"] == 1
    accuracy = (logits.argmax(-1) == episode.query_y).double().mean().item()
    assert result["mean"] == pytest.approx(accuracy, abs=1e-7)  # scored in float32
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, episode.query_y).item(),
                                           rel=1e-5)


def test_a_pretrained_checkpoint_is_a_protonet_learner_and_evaluates(pretrained, capsys):
    from metadist import Learner
    from metadist.data import ClassStore

    learner = Learner.load(pretrained)
    assert learner.ways is None and learner.step.algorithm == "protonet"
    cfg = load_config(pretrained.parents[1] / "config.yaml")
    store = ClassStore(Path(cfg.data.dataset) / "test")
    images = [store.load_examples(c, [0, 1]).permute(0, 2, 3, 1).numpy() for c in range(3)]
    adapted = learner.adapt([x[0] for x in images], ["a", "b", "c"])
    assert len(adapted.predict([x[1] for x in images])) == 3
    assert main(["eval", str(pretrained), "--episodes", "1"]) == 0
    result = json.loads((pretrained.parents[1] / "result.json").read_text())
    assert f"meta-test accuracy: {result['mean']:.4f}" in capsys.readouterr().out


def test_dropblock_is_off_unless_asked_and_drops_the_expected_fraction():
    model = ResNet12(ways=5, in_channels=1, widths=(4, 4, 8, 8))
    params = model.init_params(torch.Generator().manual_seed(0))
    x = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))

    def noise(block, shape):
        return torch.rand(shape, generator=torch.Generator().manual_seed(block))

    plain = model.features(params, x)
    assert torch.equal(model.features(params, x, drop=DropBlock(0.0, 5, noise)), plain)
    assert not torch.equal(model.features(params, x, drop=DropBlock(0.3, 5, noise)), plain)
    # The fraction of units dropped: each seed (probability γ, one per position where a
    # whole block fits) zeroes a 5x5 block; a unit drops unless no seed covers it.
    rate, size, h = 0.1, 5, 20
    ones = torch.ones(64, 8, h, h)
    out = drop_block(ones, DropBlock(rate, size, noise), 3)
    gamma = rate / size**2 * h * h / (h - size + 1) ** 2
    cover = np.array([min(i, h - size) - max(0, i - size + 1) + 1 for i in range(h)])
    expected = np.mean(1 - (1 - gamma) ** np.outer(cover, cover))
    dropped = (out == 0).double().mean().item()
    assert dropped == pytest.approx(expected, abs=0.01)
    assert dropped == pytest.approx(rate, abs=0.03)
    # kept units scaled so that each example's sum is kept
    torch.testing.assert_close(out.sum(dim=(1, 2, 3)), torch.full((64,), 8.0 * h * h))


def test_the_recipe_s_dropblock_is_a_function_of_seed_and_step_whatever_the_rows():
    p = load_config(ROOT / CONFIG, ["pretrain.dropblock_rate=0.1", "model.name=resnet12",
                                    "pretrain.batch_size=8"]).pretrain
    whole = dropblock(p, 0, step=3, total=10, lo=0, hi=8)["drop"]
    again = dropblock(p, 0, step=3, total=10, lo=0, hi=8)["drop"]
    rows = dropblock(p, 0, step=3, total=10, lo=2, hi=5)["drop"]
    later = dropblock(p, 0, step=4, total=10, lo=0, hi=8)["drop"]
    assert torch.equal(whole.noise(3, (8, 4, 6, 6)), again.noise(3, (8, 4, 6, 6)))
    assert torch.equal(rows.noise(3, (3, 4, 6, 6)), whole.noise(3, (8, 4, 6, 6))[2:5])
    assert not torch.equal(later.noise(3, (8, 4, 6, 6)), whole.noise(3, (8, 4, 6, 6)))
    assert not torch.equal(whole.noise(4, (8, 4, 6, 6)), whole.noise(3, (8, 4, 6, 6)))
    assert whole.rate == pytest.approx(0.1 * 4 / 10)  # rising linearly over the run
    assert dropblock(p, 0, step=9, total=10, lo=0, hi=8)["drop"].rate == pytest.approx(0.1)
    off = load_config(ROOT / CONFIG).pretrain
    assert dropblock(off, 0, step=3, total=10, lo=0, hi=8) == {}


def test_crops_and_flips_follow_their_draws():
    images = torch.arange(2 * 3 * 6 * 6, dtype=torch.uint8).reshape(2, 3, 6, 6)
    crop = Augmentation("crop_flip", 6, padding=2)
    # no flip, offset 2 of 0..4 (the unpadded image); a flip at offset 0 (padding shows)
    out = crop.apply(images, np.array([[0.9, 0.5, 0.5], [0.1, 0.0, 0.0]]))
    assert torch.equal(out[0], images[0])
    assert torch.equal(out[1].flip(-1)[:, :2], torch.zeros(3, 2, 6, dtype=torch.uint8))
    assert torch.equal(out[1].flip(-1)[:, 2:, 2:], images[1, :, :4, :4])
    rng = np.random.default_rng(0)
    resized = Augmentation("resized_crop_flip", 6)
    draws = resized.draws(rng, 2)
    assert resized.apply(images, draws).shape == images.shape
    assert torch.equal(resized.apply(images, draws), resized.apply(images, draws))
    for row in np.random.default_rng(1).random((50, 40)):
        top, left, h, w = resized_crop_box(84, 84, row)
        assert 0 <= top and top + h <= 84 and 0 <= left and left + w <= 84 and h * w >= 1


@pytest.mark.parametrize("override, key", [
    ("pretrain.lr=-1", "pretrain.lr=-1.0 must be a finite number > 0"),
    ("pretrain.augment=rotate", "pretrain.augment='rotate' is not one of"),
    ("pretrain.dropblock_rate=0.1", "pretrain.dropblock_rate=0.1 drops blocks"),
    ("pretrain.milestones=[5,2]", "pretrain.milestones=[5, 2]"),
    ("pretrain.nesterov=true", "pretrain.nesterov=true needs momentum"),
    ("algorithm.name=maml", "algorithm.name='maml' with a learned head"),
    ("pretrain.batch_size=100000", "pretrain.batch_size=100000 is more than the 1600 images"),
    ("workers=2", "pretrain.micro_batch=0 makes 1: set pretrain.micro_batch to 32 or less"),
])
def test_config_errors_exit_2_naming_the_key(override, key, tmp_path, omniglot_small, capsys):
    overrides = tiny(omniglot_small, tmp_path, override)
    if "nesterov" in override:
        overrides.append("pretrain.momentum=0")
    assert main(["pretrain", str(ROOT / CONFIG), *overrides]) == 2
    assert key in capsys.readouterr().err


def test_a_diverging_pretraining_fails_loudly(tmp_path, omniglot_small):
    with pytest.raises(ValueError, match="the pre-training loss at step 2 is"):
        pretrain(load_config(ROOT / CONFIG, tiny(omniglot_small, tmp_path, "pretrain.lr=1e30",
                                                 "pretrain.steps=5")))
    assert not list(tmp_path.glob("*"))  # no checkpoint: nothing left behind


def test_cli_pretrain_records_the_run_in_mlflow(tmp_path, omniglot_small, capsys):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["pretrain", str(ROOT / CONFIG), *tiny(omniglot_small, tmp_path / "runs",
                                                       "pretrain.steps=2"),
                 "tracking.enabled=true", f"tracking.tracking_uri={uri}"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    client = mlflow.MlflowClient(uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "pretrain"
    assert run.data.params["pretrain.batch_size"] == "64"
    assert run.data.metrics["test_accuracy"] == pytest.approx(result["mean"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == [
        "checkpoints/final.pt"]


@pytest.mark.slow  # about 50 s, most of it Ray's start: the torchrun twin above is the default
def test_two_ray_train_workers_end_with_the_parameters_of_one(tmp_path, omniglot_small):
    import os
    import subprocess
    import sys

    overrides = tiny(omniglot_small, tmp_path / "runs", *RANDOM, "pretrain.steps=3")
    env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "OMP_NUM_THREADS": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    proc = subprocess.run([sys.executable, "-m", "metadist.cli", "pretrain", str(ROOT / CONFIG),
                           *overrides, "workers=2"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = json.loads(proc.stdout[proc.stdout.index("{"):])
    single = pretrain(load_config(ROOT / CONFIG, overrides), run_dir=tmp_path / "one")
    assert two["workers"] == 2
    a = load_checkpoint(single["checkpoint"])["params"]
    b = load_checkpoint(two["checkpoint"])["params"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    assert two["mean"] == single["mean"]


def test_only_a_pretraining_run_records_the_pretrain_section_as_params(omniglot_small,
                                                                        tmp_path):
    from metadist.tracking import run_params

    cfg = load_config(ROOT / CONFIG, tiny(omniglot_small, tmp_path))
    assert run_params(cfg, pretraining=True)["pretrain.batch_size"] == "64"
    assert not [k for k in run_params(cfg) if k.startswith(("pretrain.", "tune."))]
