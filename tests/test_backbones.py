"""The larger backbones: ResNet-12 (MetaOptNet / Meta-Baseline) and any torch.nn.Module
(torchvision:NAME, python:module:callable), held to the reference architecture, to float64
finite differences and to MAML written in plain PyTorch; their batch norm transductive;
a checkpoint never importing code unasked; training, resume and the Learner end to end."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_meta_gradients import image_batch, written_out_objective
from torch import nn

from metadist.algorithms import MetaStep, meta_gradient
from metadist.config import ConfigError, load_config
from metadist.models import (
    ModuleBackbone,
    ResNet12,
    model_from_spec,
    model_spec,
    param_shapes,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = "python:backbone_factories:tiny_cnn"


# -- ResNet-12 ---------------------------------------------------------------------------


class ReferenceBlock(nn.Module):
    """Meta-Baseline's ResNet-12 block (yinboc/few-shot-meta-baseline, models/resnet12.py),
    typed out as nn.Modules."""

    def __init__(self, inplanes: int, planes: int) -> None:
        super().__init__()
        self.relu = nn.LeakyReLU(0.1)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, bias=False),
                                        nn.BatchNorm2d(planes))
        self.maxpool = nn.MaxPool2d(2)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.maxpool(self.relu(out + self.downsample(x)))


class ReferenceResNet12(nn.Module):
    def __init__(self, widths, in_channels=3) -> None:
        super().__init__()
        channels = [in_channels, *widths]
        for i in range(4):
            setattr(self, f"layer{i + 1}", ReferenceBlock(channels[i], channels[i + 1]))

    def forward(self, x):
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
        return x.view(x.shape[0], x.shape[1], -1).mean(dim=2)


def test_resnet12_has_the_reference_parameters_and_output_shapes():
    model = ResNet12(ways=5)
    shapes = param_shapes(model)
    body = {k: v for k, v in shapes.items() if k not in model.head_keys}
    # 12,424,320: Meta-Baseline's resnet12-wide, and MetaOptNet's ResNet-12 (same convs
    # and batch norms; its DropBlock has no parameters).
    assert sum(math.prod(s) for s in body.values()) == 12_424_320
    assert shapes["head.weight"] == (5, 640) and shapes["head.bias"] == (5,)
    with torch.device("meta"):
        reference = ReferenceResNet12((64, 160, 320, 640))
    assert body == {k: tuple(v.shape) for k, v in reference.named_parameters()}
    params = model.init_params(torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model(params, torch.randn(2, 3, 84, 84)).shape == (2, 5)
        assert model.features(params, torch.randn(3, 3, 84, 84)).shape == (3, 640)
        assert model.features(params, torch.randn(3, 3, 28, 28)).shape == (3, 640)
    omniglot = ResNet12(ways=20, in_channels=1, widths=(8, 8, 16, 16))
    p = omniglot.init_params()
    assert omniglot(p, torch.randn(4, 1, 28, 28)).shape == (4, 20)
    assert omniglot.feature_dim == 16 and len(omniglot.norm_keys) == 32


def small_resnet(dtype=torch.float64, ways=3):
    model = ResNet12(ways=ways, in_channels=1, widths=(4, 4, 8, 8))
    params = model.init_params(torch.Generator().manual_seed(1))
    return model, {k: v.to(dtype).requires_grad_() for k, v in params.items()}


def test_resnet12_computes_the_reference_network():
    model, params = small_resnet()
    reference = ReferenceResNet12((4, 4, 8, 8), in_channels=1).double().train()
    missing, unexpected = reference.load_state_dict(
        {k: v.detach() for k, v in params.items() if k not in model.head_keys}, strict=False)
    assert not unexpected and all(k.endswith(("running_mean", "running_var",
                                              "num_batches_tracked")) for k in missing)
    x = torch.randn(6, 1, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        # train mode: the batch's statistics, as ours always are
        torch.testing.assert_close(model.features(params, x), reference(x), rtol=1e-12,
                                   atol=1e-12)
        for impl in ("native", "matmul"):
            torch.testing.assert_close(model.features(params, x, impl), reference(x),
                                       rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("inner_loop", ["loop", "vmap"])
def test_resnet12_maml_meta_gradient_matches_finite_differences(inner_loop):
    model, params = small_resnet()
    batch = image_batch(tasks=2, dtype=torch.float64)
    step = MetaStep("maml", inner_lr=0.3, inner_steps=2)
    grads, _ = meta_gradient(model, params, batch, step, inner_loop=inner_loop)

    def objective(p):
        return written_out_objective(model, p, batch, step.inner_steps,
                                     lambda key, s: step.inner_lr).item()

    eps = 1e-6
    g = torch.Generator().manual_seed(3)
    for name in ("layer1.conv1.weight", "layer2.downsample.0.weight", "layer3.bn2.weight",
                 "layer4.downsample.1.bias", "head.weight"):
        idx = tuple(torch.randint(0, s, (1,), generator=g).item() for s in params[name].shape)
        values = []
        for sign in (1, -1):
            shifted = {k: v.detach().clone() for k, v in params.items()}
            shifted[name][idx] += sign * eps
            values.append(objective({k: v.requires_grad_() for k, v in shifted.items()}))
        fd = (values[0] - values[1]) / (2 * eps)
        assert grads[name][idx].item() == pytest.approx(fd, rel=1e-5, abs=1e-8), (name, idx)


# -- any torch.nn.Module -----------------------------------------------------------------


def set_module_params(module: nn.Module, params: dict[str, torch.Tensor]) -> None:
    """Put tensors (adapted, non-leaf) in place of a module's parameters, as learn2learn
    does: the reference MAML below runs the module itself, not metadist's functional call."""
    for name, value in params.items():
        owner, _, leaf = name.rpartition(".")
        module.get_submodule(owner)._parameters[leaf] = value


def plain_pytorch_maml(module: nn.Module, theta: dict[str, torch.Tensor], batch, lr: float,
                       steps: int, first_order: bool) -> dict[str, torch.Tensor]:
    """MAML's meta-gradient (sum over tasks) of ``module`` + a linear head, in train mode
    (batch statistics), with torch.autograd alone."""
    total = 0.0

    def logits(p, x):
        set_module_params(module, {k: v for k, v in p.items() if not k.startswith("head.")})
        return module(x) @ p["head.weight"].t() + p["head.bias"]

    for t in range(batch.support_x.shape[0]):
        fast = dict(theta)
        for _ in range(steps):
            loss = F.cross_entropy(logits(fast, batch.support_x[t]), batch.support_y[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {k: v - lr * (g.detach() if first_order else g)
                    for (k, v), g in zip(fast.items(), grads)}
        total = total + F.cross_entropy(logits(fast, batch.query_x[t]), batch.query_y[t])
    return dict(zip(theta, torch.autograd.grad(total, list(theta.values()))))


def reference_module(source: str) -> nn.Module:
    """The backbone built without metadist: the user's factory, or torchvision's model with
    its classifier dropped; batch norm as the module has it, run in train mode."""
    if source == TINY:
        from backbone_factories import tiny_cnn

        return tiny_cnn().double().train()
    import torchvision

    module = torchvision.models.resnet18(weights=None)
    module.fc = nn.Identity()
    return module.double().train()


@pytest.mark.parametrize("source, algorithm, inner_loop", [
    (TINY, "maml", "loop"), (TINY, "fomaml", "vmap"), ("torchvision:resnet18", "maml", "loop"),
])
def test_a_module_backbone_gives_plain_pytorch_s_meta_gradient(source, algorithm, inner_loop):
    channels = 1 if source == TINY else 3
    model = ModuleBackbone(source, ways=3, in_channels=channels, image_size=16)
    params = {k: v.double().requires_grad_()
              for k, v in model.init_params(torch.Generator().manual_seed(0)).items()}
    batch = image_batch(tasks=2, dtype=torch.float64)
    if channels == 3:
        batch = type(batch)(batch.support_x.expand(-1, -1, 3, -1, -1).contiguous(),
                            batch.support_y, batch.query_x.expand(-1, -1, 3, -1, -1)
                            .contiguous(), batch.query_y)
    step = MetaStep(algorithm, inner_lr=0.1, inner_steps=2)
    got, _ = meta_gradient(model, params, batch, step, inner_loop=inner_loop)
    theta = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    want = plain_pytorch_maml(reference_module(source), theta, batch, 0.1, 2,
                              first_order=algorithm == "fomaml")
    assert set(got) == set(want) and all(want[k].norm() > 0 for k in ("head.weight",))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-12, msg=k)


@pytest.mark.parametrize("source", [TINY, "torchvision:resnet18"])
def test_module_batch_norm_is_transductive_and_stateless(source):
    model = ModuleBackbone(source, ways=3, in_channels=1, image_size=16)
    module = model.module
    assert list(module.named_buffers()) == []
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(not m.track_running_stats and m.running_mean is None for m in norms)
    assert set(model.norm_keys) == {f"{k}.{p}" for k, m in module.named_modules()
                                    if isinstance(m, nn.BatchNorm2d) for p in ("weight", "bias")}
    params = model.init_params(torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in params.items()}
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        evaluated = model(params, x)
        module.train()
        try:
            trained = model(params, x)
        finally:
            module.eval()
        # A batch's own statistics: a query's scores depend on the batch it comes in.
        alone = model(params, x[:2])
    torch.testing.assert_close(trained, evaluated, rtol=0, atol=0)
    assert not torch.allclose(alone, evaluated[:2])
    assert all(torch.equal(params[k], before[k]) for k in params)


def test_init_params_are_seeded_and_leave_the_global_generator_alone():
    model = ModuleBackbone(TINY, ways=3, in_channels=1, image_size=16)
    state = torch.get_rng_state()
    a = model.init_params(torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)
    b = model.init_params(torch.Generator().manual_seed(5))
    c = model.init_params(torch.Generator().manual_seed(6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["body.0.weight"], c["body.0.weight"])
    assert list(a) == [*(k for k, _ in model.module.named_parameters()), "head.weight",
                       "head.bias"]


@pytest.mark.parametrize("source, message", [
    ("python:backbone_factories:with_a_buffer", "keeps buffers ['scale']"),
    ("python:backbone_factories:not_a_module", "returned a int, not a torch.nn.Module"),
    ("python:backbone_factories:image_map", "yields shape [2, 2, 14, 14], not [N, D]"),
    ("python:backbone_factories:nothing_here", "'backbone_factories' has no 'nothing_here'"),
    ("python:no_such_package_xyz:f", "cannot import 'no_such_package_xyz'"),
    ("python:os", "is not of the form python:package.module:callable"),
    ("torchvision:resnet999", "'resnet999' is not one of torchvision's"),
    ("torchvision:swin_t", "keeps buffers ['features.1.0.attn.relative_position_index'"),
    ("torchvision:squeezenet1_1", "has no nn.Linear classifier to replace"),
    ("torchvision:vit_b_16", "does not take 3x16x16 images"),
])
def test_a_backbone_that_cannot_be_one_is_refused_by_name(source, message):
    with pytest.raises(ValueError) as err:
        ModuleBackbone(source, ways=3, in_channels=1, image_size=16)
    assert message in str(err.value)


def test_second_order_vmap_is_the_loop_for_a_module_backbone(tmp_path, omniglot_small):
    model = ModuleBackbone(TINY, ways=3, in_channels=1, image_size=16)
    params = model.init_params()
    with pytest.raises(ValueError, match="use train.inner_loop=loop"):
        meta_gradient(model, params, image_batch(tasks=2), MetaStep("maml", 0.1, 1),
                      inner_loop="vmap")
    with pytest.raises(ConfigError, match="train.inner_loop='vmap' runs second-order 'maml'"):
        load_config(ROOT / "configs" / "omniglot_5w1s_maml.yaml",
                    [f"model.name={TINY}", "train.inner_loop=vmap"])
    from metadist.training.loop import train

    result = train(load_config(ROOT / "configs" / "omniglot_5w1s_maml.yaml", [
        f"data.dataset={omniglot_small}", f"model.name={TINY}", "train.inner_loop=auto",
        "train.steps=1", "algorithm.meta_batch_size=2", "data.queries=2", "train.val_every=0",
        "eval.episodes=2", "train.progress=false", "tracking.enabled=false",
        f"train.output_dir={tmp_path}", "train.threads=1"]))
    assert result["inner_loop"] == "loop"


# -- checkpoints never import code unasked -----------------------------------------------


EVIL = "import pathlib, os\npathlib.Path(os.environ['EVIL_MARKER']).touch()\n" \
       "from backbone_factories import tiny_cnn as factory\n"


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """An importable module that leaves a marker file when imported."""
    (tmp_path / "evil_backbone_xyz.py").write_text(EVIL)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("EVIL_MARKER", str(tmp_path / "imported"))
    monkeypatch.delenv("METADIST_TRUST_CODE", raising=False)
    yield tmp_path / "imported"
    sys.modules.pop("evil_backbone_xyz", None)


def test_a_checkpoint_s_python_factory_is_imported_only_on_request(evil_module, monkeypatch):
    spec = {"kind": "module", "kwargs": {"source": "python:evil_backbone_xyz:factory",
                                         "ways": 3, "in_channels": 1, "image_size": 16}}
    for system in ({"kind": "module", "kwargs": {"source": "python:os:system", "ways": 3}},
                   spec):
        with pytest.raises(ValueError, match="set METADIST_TRUST_CODE=1"):
            model_from_spec(system)
    assert not evil_module.exists() and "evil_backbone_xyz" not in sys.modules
    assert model_from_spec(spec, trust_code=True).feature_dim == 6
    assert evil_module.exists()
    monkeypatch.setenv("METADIST_TRUST_CODE", "1")
    assert model_spec(model_from_spec(spec)) == spec
    with pytest.raises(ValueError, match="set METADIST_TRUST_CODE=1"):
        model_from_spec(spec, trust_code=False)


def test_a_checkpoint_s_torchvision_name_must_be_one_of_torchvision_s():
    bad = {"kind": "module", "kwargs": {"source": "torchvision:resnet999", "ways": 3}}
    with pytest.raises(ValueError, match="'resnet999' is not one of torchvision's"):
        model_from_spec(bad)
    bad["kwargs"]["source"] = "torchvision:os.system"
    with pytest.raises(ValueError, match="'os.system' is not one of torchvision's"):
        model_from_spec(bad)
    good = {"kind": "module", "kwargs": {"source": "torchvision:resnet18", "ways": 3,
                                         "in_channels": 3, "image_size": 32}}
    assert model_spec(model_from_spec(good)) == good


# -- end to end ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet12_runs(tmp_path_factory, omniglot_small):
    """``metadist train`` of a small ResNet-12: 2 steps straight, and 1 + a resume."""
    from metadist.cli import main

    tmp = tmp_path_factory.mktemp("resnet12")
    common = [str(ROOT / "configs" / "omniglot_5w1s_maml.yaml"),
              f"data.dataset={omniglot_small}", "model.name=resnet12", "model.widths=[8,8,16,16]",
              "algorithm.meta_batch_size=2", "data.queries=2", "train.val_every=0",
              "eval.episodes=4", "train.progress=false", "tracking.enabled=false",
              "train.inner_loop=vmap", "train.threads=1", "train.checkpoint_every=1"]
    runs = {}
    for name, extra in (("whole", ["train.steps=2"]), ("half", ["train.steps=1"])):
        assert main(["train", *common, f"train.output_dir={tmp / name}", *extra]) == 0
        runs[name] = next((tmp / name).glob("*/checkpoints"))
    half = runs["half"] / "final.pt"
    assert main(["train", *common, f"train.output_dir={tmp / 'resumed'}", "train.steps=2",
                 f"resume={half}"]) == 0
    runs["resumed"] = next((tmp / "resumed").glob("*/checkpoints"))
    return runs


def test_resnet12_trains_checkpoints_and_resumes_to_the_same_parameters(resnet12_runs):
    from metadist.training.checkpoint import load_checkpoint

    whole = load_checkpoint(resnet12_runs["whole"] / "final.pt")
    resumed = load_checkpoint(resnet12_runs["resumed"] / "final.pt")
    first = load_checkpoint(resnet12_runs["whole"] / "step-0000001.pt")
    assert whole["model"] == {"kind": "resnet12", "kwargs": {
        "ways": 5, "in_channels": 1, "widths": [8, 8, 16, 16]}}
    assert set(whole["params"]) == set(param_shapes(model_from_spec(whole["model"])))
    assert not torch.equal(whole["params"]["layer1.conv1.weight"],
                           first["params"]["layer1.conv1.weight"])  # it trained
    for k in whole["params"]:
        torch.testing.assert_close(resumed["params"][k], whole["params"][k], rtol=0, atol=0)
    assert [h["train_loss"] for h in resumed["history"]] == \
        [h["train_loss"] for h in whole["history"]]


def test_the_learner_adapts_a_trained_resnet12(resnet12_runs):
    from metadist import Learner

    learner = Learner.load(resnet12_runs["whole"] / "final.pt")
    assert isinstance(learner.model, ResNet12)
    images = torch.rand(5, 1, 28, 28)
    adapted = learner.adapt(images, list("abcde"))
    assert len(adapted.predict(images)) == 5


def test_eval_refuses_a_checkpoint_naming_code_without_the_opt_in(resnet12_runs, evil_module,
                                                                  tmp_path, capsys):
    from metadist.cli import main
    from metadist.training.checkpoint import load_checkpoint

    state = load_checkpoint(resnet12_runs["whole"] / "final.pt")
    state["model"] = {"kind": "module", "kwargs": {
        "source": "python:evil_backbone_xyz:factory", "ways": 5, "in_channels": 1,
        "image_size": 28}}
    path = tmp_path / "evil.pt"
    torch.save(state, path)
    assert main(["eval", str(path), "--episodes", "2"]) == 2
    err = capsys.readouterr().err
    assert "METADIST_TRUST_CODE=1" in err and str(path) in err and "Traceback" not in err
    assert not evil_module.exists()


@pytest.mark.parametrize("kind", ["resnet12", "module"])
@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "anil", "reptile", "metasgd",
                                       "protonet", "maml++"])
def test_every_algorithm_runs_on_the_new_models_on_both_paths(kind, algorithm):
    from metadist.algorithms import with_learned_rates, with_step_norms

    if kind == "resnet12":
        model, params = small_resnet()
    else:
        model = ModuleBackbone(TINY, ways=3, in_channels=1, image_size=16)
        params = {k: v.double().requires_grad_()
                  for k, v in model.init_params(torch.Generator().manual_seed(0)).items()}
    name = "maml" if algorithm == "maml++" else algorithm
    step = MetaStep(name, inner_lr=0.1, inner_steps=2, per_step_bn=algorithm == "maml++")
    if algorithm == "metasgd":
        params = with_learned_rates(params, 0.1)
    if algorithm == "maml++":
        params = with_step_norms(params, model.norm_keys, 2)
    params = {k: v.detach().requires_grad_() for k, v in params.items()}
    batch = image_batch(tasks=3, dtype=torch.float64)
    ref, _ = meta_gradient(model, params, batch, step, inner_loop="loop")
    assert all(v.isfinite().all() for v in ref.values())
    assert torch.cat([v.flatten() for v in ref.values()]).norm() > 0
    if kind == "module" and not step.is_first_order:
        return  # the loop alone (second order under vmap takes the im2col layers)
    got, _ = meta_gradient(model, params, batch, step, inner_loop="vmap", chunk=2)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-12, msg=k)
