"""MAML++'s learned per-layer, per-step inner rates (LSLR, Antoniou et al. 2019): their
meta-gradient against the objective written out and float64 finite differences on both
inner-loop paths; MAML's when every rate is α; checkpoints, resume and the record.
(Derivative-order annealing and the cosine β: tests/test_train.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_meta_gradients import image_batch, small_conv, written_out_objective

from metadist import Learner
from metadist.algorithms import MetaStep, meta_gradient, with_step_rates
from metadist.config import ConfigError, load_config
from metadist.training.checkpoint import load_checkpoint
from metadist.training.loop import train

ROOT = Path(__file__).resolve().parents[1]


def lslr_objective(model, params, batch, steps):
    return written_out_objective(model, params, batch, steps,
                                 lambda key, s: params["lslr." + key][s])


@pytest.mark.parametrize("inner_loop", ["loop", "vmap"])
def test_the_per_step_rates_get_the_meta_gradient_of_the_objective(inner_loop):
    model, params = small_conv(dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    params = with_step_rates({k: v.detach() for k, v in params.items()}, 0.3, 2)
    params = {k: (v * (0.5 + torch.rand(v.shape, generator=g, dtype=torch.float64))
                  if k.startswith("lslr.") else v).requires_grad_() for k, v in params.items()}
    batch = image_batch(tasks=2, dtype=torch.float64)
    step = MetaStep("maml", inner_lr=0.3, inner_steps=2, lslr=True)
    grads, _ = meta_gradient(model, params, batch, step, inner_loop=inner_loop)
    reference = lslr_objective(model, params, batch, 2)
    for got, want in zip(grads.values(), torch.autograd.grad(reference, list(params.values()))):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    eps = 1e-7
    for k in ("lslr.conv1.weight", "lslr.head.bias"):
        for s in range(2):
            bump = torch.zeros(2, dtype=torch.float64)
            bump[s] = eps
            plus = lslr_objective(model, {**params, k: params[k] + bump}, batch, 2)
            minus = lslr_objective(model, {**params, k: params[k] - bump}, batch, 2)
            numeric = ((plus - minus) / (2 * eps)).item()
            assert grads[k][s].item() == pytest.approx(numeric, rel=1e-5), (k, s)


def test_with_every_rate_at_alpha_the_body_gradient_is_maml_s():
    model, params = small_conv(dtype=torch.float64)
    batch = image_batch(tasks=2, dtype=torch.float64)
    maml, _ = meta_gradient(model, params, batch, MetaStep("maml", inner_lr=0.3, inner_steps=2))
    rated = {k: v.detach().requires_grad_()
             for k, v in with_step_rates(params, 0.3, 2).items()}
    lslr, _ = meta_gradient(model, rated, batch,
                            MetaStep("maml", inner_lr=0.3, inner_steps=2, lslr=True))
    for k, g in maml.items():
        torch.testing.assert_close(lslr[k], g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("overrides, message", [
    (["algorithm.lslr=true", "algorithm.name=reptile"], "algorithm.lslr=True does not apply"),
    (["algorithm.lslr=true", "algorithm.name=metasgd"], "algorithm.lslr=True does not apply"),
    (["algorithm.lslr=true", "algorithm.name=fomaml", "algorithm.inner_optimizer=adam"],
     "algorithm.lslr=True needs inner_optimizer 'sgd'"),
])
def test_the_config_refuses_lslr_where_it_does_not_apply(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "sinusoid_maml.yaml", overrides)
    assert message in str(err.value)


def test_lslr_trains_resumes_and_records_each_layer_s_rate_at_each_step(tmp_path):
    def config(out, *extra):
        return load_config(ROOT / "configs" / "sinusoid_maml.yaml", [
            "algorithm.lslr=true", "algorithm.inner_steps=2", "algorithm.inner_lr=0.01",
            f"train.output_dir={out}", "train.val_every=0", "eval.episodes=20",
            "train.progress=false", "tracking.enabled=false", "train.inner_loop=loop",
            "train.log_every=5", *extra])

    whole = train(config(tmp_path / "a", "train.steps=20", "train.checkpoint_every=10"))
    resumed = train(config(tmp_path / "b", "train.steps=20"),
                    resume=Path(whole["run_dir"]) / "checkpoints" / "step-0000010.pt")
    a, b = load_checkpoint(whole["checkpoint"]), load_checkpoint(resumed["checkpoint"])
    for k in a["params"]:
        torch.testing.assert_close(a["params"][k], b["params"][k], rtol=0, atol=0)
    rates = a["params"]["lslr.fc0.weight"]
    assert rates.shape == (2,) and not torch.allclose(rates, torch.full_like(rates, 0.01))
    history = json.loads((Path(whole["run_dir"]) / "history.json").read_text())
    assert history[-1]["inner_lr/fc0.weight/step-2"] == pytest.approx(rates[1].item())
    learner = Learner.load(whole["checkpoint"])
    assert learner.step.lslr
    with pytest.raises(ValueError, match=r"lr=0.1: .* learned \(LSLR\)"):
        learner.adapt([0.0, 1.0], [0.0, 1.0], lr=0.1)


def test_multi_step_loss_weights_anneal_to_the_last_step_alone():
    from metadist.algorithms import multi_step_weights

    assert multi_step_weights(5, 0, 100) == pytest.approx([0.2] * 5)
    middle = multi_step_weights(5, 50, 100)
    assert middle[:4] == pytest.approx([0.1] * 4) and sum(middle) == pytest.approx(1.0)
    assert multi_step_weights(5, 99, 100)[0] == pytest.approx(0.03 / 5)  # the floor
    assert multi_step_weights(5, 100, 100) is None  # the last step alone, as MAML
    assert multi_step_weights(5, 0, 0) is None and multi_step_weights(1, 0, 100) is None


@pytest.mark.parametrize("inner_loop", ["loop", "vmap"])
def test_the_multi_step_loss_is_the_weighted_sum_of_the_steps_query_losses(inner_loop):
    model, params = small_conv(dtype=torch.float64)
    batch = image_batch(tasks=2, dtype=torch.float64)
    step = MetaStep("maml", inner_lr=0.3, inner_steps=3)
    weights = [0.2, 0.3, 0.5]
    grads, metrics = meta_gradient(model, params, batch, step, inner_loop=inner_loop,
                                   step_weights=weights)
    reference = written_out_objective(model, params, batch, 3, lambda key, s: 0.3, weights)
    assert metrics["loss"] == pytest.approx(reference.item(), rel=1e-6)
    for got, want in zip(grads.values(), torch.autograd.grad(reference, list(params.values()))):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    # Every weight on the last step: MAML's meta-gradient, bit for bit.
    last, _ = meta_gradient(model, params, batch, step, inner_loop=inner_loop,
                            step_weights=[0.0, 0.0, 1.0])
    maml, _ = meta_gradient(model, params, batch, step, inner_loop=inner_loop)
    for k in maml:
        torch.testing.assert_close(last[k], maml[k], rtol=0, atol=0)


def test_every_maml_plus_plus_switch_off_is_maml_bit_for_bit(tmp_path):
    def run(name, *extra):
        return train(load_config(ROOT / "configs" / "sinusoid_maml.yaml", [
            "algorithm.inner_steps=2", "train.steps=6", f"train.output_dir={tmp_path / name}",
            "train.val_every=0", "eval.episodes=20", "train.progress=false",
            "tracking.enabled=false", "train.inner_loop=loop", *extra]))

    maml = run("maml")
    off = run("off", "algorithm.lslr=false", "algorithm.msl_steps=0",
              "algorithm.first_order_steps=0", "algorithm.outer_lr_schedule=cosine")
    a, b = load_checkpoint(maml["checkpoint"]), load_checkpoint(off["checkpoint"])
    for k in a["params"]:
        torch.testing.assert_close(a["params"][k], b["params"][k], rtol=0, atol=0)
    # With all of them on, the run is another one (and runs).
    on = run("on", "algorithm.lslr=true", "algorithm.msl_steps=4",
             "algorithm.first_order_steps=2", "algorithm.outer_lr_schedule=cosine",
             "algorithm.outer_lr_final=0.0001")
    c = load_checkpoint(on["checkpoint"])
    assert any(not torch.equal(a["params"][k], c["params"][k]) for k in a["params"])
