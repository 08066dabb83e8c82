"""Meta-SGD (Li et al. 2017): a learned inner learning rate per parameter entry, trained
with the initialisation. Its meta-gradient (for the rates too) against float64 finite
differences on both inner-loop paths, its relation to MAML, the config's rules,
checkpoints, resume, the Learner and the learned-rate record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_meta_gradients import image_batch, small_conv, written_out_objective

from metadist import Learner
from metadist.algorithms import MetaStep, meta_gradient, with_learned_rates
from metadist.config import ConfigError, load_config
from metadist.training.checkpoint import load_checkpoint
from metadist.training.loop import train

ROOT = Path(__file__).resolve().parents[1]


def metasgd_objective(model, params, batch, steps):
    """Σ_tasks L_q(θ − α⊙∇L_s ...) written out with plain autograd."""
    return written_out_objective(model, params, batch, steps,
                                 lambda key, s: params["lr." + key])


@pytest.mark.parametrize("inner_loop", ["loop", "vmap"])
def test_the_meta_gradient_reaches_the_rates_as_finite_differences_say(inner_loop):
    model, params = small_conv(dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    params = with_learned_rates({k: v.detach() for k, v in params.items()}, 0.3)
    # Rates that differ entry by entry, as they do once learned.
    params = {k: (v * (0.5 + torch.rand(v.shape, generator=g, dtype=torch.float64))
                  if k.startswith("lr.") else v).requires_grad_() for k, v in params.items()}
    batch = image_batch(tasks=2, dtype=torch.float64)
    step = MetaStep("metasgd", inner_lr=0.3, inner_steps=2)
    grads, metrics = meta_gradient(model, params, batch, step, inner_loop=inner_loop)
    reference = metasgd_objective(model, params, batch, 2)
    assert metrics["loss"] == pytest.approx(reference.item(), rel=1e-6)
    written_out = torch.autograd.grad(reference, list(params.values()))
    for got, want in zip(grads.values(), written_out):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    # Small steps: a ReLU or a max-pool switches within 1e-6 of this point.
    eps = 1e-7
    for k in ("conv0.weight", "lr.conv0.weight", "lr.bn2.bias", "lr.head.weight"):
        direction = torch.randn(params[k].shape, generator=g, dtype=torch.float64)
        plus = metasgd_objective(model, {**params, k: params[k] + eps * direction}, batch, 2)
        minus = metasgd_objective(model, {**params, k: params[k] - eps * direction}, batch, 2)
        numeric = ((plus - minus) / (2 * eps)).item()
        assert (grads[k] * direction).sum().item() == pytest.approx(numeric, rel=1e-6), k


def test_with_every_rate_at_alpha_its_body_gradient_is_maml_s():
    model, params = small_conv(dtype=torch.float64)
    batch = image_batch(tasks=2, dtype=torch.float64)
    maml, _ = meta_gradient(model, params, batch, MetaStep("maml", inner_lr=0.3, inner_steps=2))
    with_rates = {k: v.detach().requires_grad_()
                  for k, v in with_learned_rates(params, 0.3).items()}
    metasgd, _ = meta_gradient(model, with_rates, batch,
                               MetaStep("metasgd", inner_lr=0.3, inner_steps=2))
    for k, g in maml.items():
        torch.testing.assert_close(metasgd[k], g, rtol=1e-10, atol=1e-12)
    # dL/dα for one α shared by all: the sum of the per-entry rates' gradients.
    assert any(metasgd["lr." + k].abs().sum() > 0 for k in maml)


@pytest.mark.parametrize("overrides, message", [
    (["algorithm.name=metasgd", "algorithm.inner_optimizer=adam", "algorithm.first_order=true"],
     "algorithm.inner_optimizer='adam' does not apply: Meta-SGD's inner step is SGD"),
    (["algorithm.name=metasgd", "algorithm.head_init=zero", "model.name=conv4",
      "data.dataset=/x"], "algorithm.head_init='zero' needs a learned head with metasgd"),
])
def test_the_config_refuses_what_meta_sgd_cannot_run(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "sinusoid_maml.yaml", overrides)
    assert message in str(err.value)


def sinusoid(out, *extra):
    return load_config(ROOT / "configs" / "sinusoid_maml.yaml", [
        "algorithm.name=metasgd", "algorithm.inner_lr=0.01", f"train.output_dir={out}",
        "train.val_every=0", "eval.episodes=50", "train.progress=false",
        "tracking.enabled=false", "train.inner_loop=loop", "train.log_every=5", *extra])


def test_meta_sgd_trains_resumes_and_adapts_at_its_learned_rates(tmp_path):
    whole = train(sinusoid(tmp_path / "a", "train.steps=40", "train.checkpoint_every=20"))
    half = Path(whole["run_dir"]) / "checkpoints" / "step-0000020.pt"
    resumed = train(sinusoid(tmp_path / "b", "train.steps=40"), resume=half)
    a, b = load_checkpoint(whole["checkpoint"]), load_checkpoint(resumed["checkpoint"])
    assert {k for k in a["params"] if k.startswith("lr.")} == {
        "lr." + k for k in a["params"] if not k.startswith("lr.")}
    for k in a["params"]:
        torch.testing.assert_close(a["params"][k], b["params"][k], rtol=0, atol=0)
    # The rates moved off their start, differently entry by entry.
    rates = a["params"]["lr.fc0.weight"]
    assert not torch.allclose(rates, torch.full_like(rates, 0.01)) and rates.std() > 0
    # The record: each parameter's mean rate at every logged step.
    history = json.loads((Path(whole["run_dir"]) / "history.json").read_text())
    logged = [h for h in history if "inner_lr/fc0.weight" in h]
    assert [h["step"] for h in logged] == list(range(5, 41, 5))
    assert logged[-1]["inner_lr/fc0.weight"] == pytest.approx(rates.mean().item())
    # The Learner adapts at those rates: the evaluation path's score on the same task.
    learner = Learner.load(whole["checkpoint"])
    x = np.linspace(-5, 5, 10)
    adapted = learner.adapt(x, np.sin(x))
    assert len(adapted.predict(x)) == 10
    with pytest.raises(ValueError, match=r"lr=0.1: this model adapts at the inner rates it "
                       r"learned \(Meta-SGD\)"):
        learner.adapt(x, np.sin(x), lr=0.1)
