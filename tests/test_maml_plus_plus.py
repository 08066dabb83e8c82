"""MAML++ (Antoniou et al. 2019): the learned per-layer, per-step inner rates (LSLR) and
the per-step batch-norm weights and biases: their meta-gradients against the objective
written out and float64 finite differences on both inner-loop paths; MAML's when every
rate is α; checkpoints, resume and the record; the multi-step loss; every switch off is
MAML. (Derivative-order annealing and the cosine β: tests/test_train.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_meta_gradients import image_batch, small_conv, written_out_objective

from metadist import Learner
from metadist.algorithms import MetaStep, adapt, meta_gradient, with_step_norms, with_step_rates
from metadist.algorithms.inner_loop import task_loss
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


def per_step_bn_objective(model, params, batch, steps, rate, weights=None):
    """Σ over tasks of the query loss after ``steps`` inner SGD steps, written out with
    MAML++'s per-step batch norm as their code indexes it: the forward passes of step s
    (the support loss, and the query loss after the update) take batch-norm set s, the
    model's own at s = 0 and row s - 1 of ``bnstep.*`` after; the sets are not adapted."""
    rows = {k[len("bnstep."):]: v for k, v in params.items() if k.startswith("bnstep.")}

    def norms(s):
        return {k: params[k] if s == 0 else v[s - 1] for k, v in rows.items()}

    body = [k for k in params if not k.startswith("bnstep.") and k not in rows]
    total = 0.0
    for t in range(batch.support_x.shape[0]):
        p = {k: params[k] for k in body}
        for s in range(steps):
            g = torch.autograd.grad(
                task_loss(model, {**p, **norms(s)}, batch.support_x[t], batch.support_y[t]),
                list(p.values()), create_graph=True)
            p = {k: v - rate * gi for (k, v), gi in zip(p.items(), g)}
            if weights is not None:
                total = total + weights[s] * task_loss(model, {**p, **norms(s)},
                                                       batch.query_x[t], batch.query_y[t])
        if weights is None:
            total = total + task_loss(model, {**p, **norms(steps - 1)}, batch.query_x[t],
                                      batch.query_y[t])
    return total


@pytest.mark.parametrize("weights", [None, [0.2, 0.3, 0.5]])
@pytest.mark.parametrize("inner_loop", ["loop", "vmap"])
def test_per_step_batch_norms_get_the_meta_gradient_of_the_objective(inner_loop, weights):
    model, params = small_conv(dtype=torch.float64)
    params = with_step_norms(params, model.norm_keys, 3)
    # Distinct sets, so that a forward pass that took the wrong step's set shows.
    g = torch.Generator().manual_seed(5)
    params = {k: (v + 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype)
                  if k.startswith("bnstep.") else v).detach().requires_grad_()
              for k, v in params.items()}
    assert params["bnstep.bn1.weight"].shape == (2, 4)
    batch = image_batch(tasks=2, dtype=torch.float64)
    step = MetaStep("maml", inner_lr=0.3, inner_steps=3, per_step_bn=True)
    grads, metrics = meta_gradient(model, params, batch, step, inner_loop=inner_loop,
                                   step_weights=weights)
    reference = per_step_bn_objective(model, params, batch, 3, 0.3, weights)
    assert metrics["loss"] == pytest.approx(reference.item(), rel=1e-6)
    want = dict(zip(params, torch.autograd.grad(reference, list(params.values()))))
    for k in params:
        torch.testing.assert_close(grads[k], want[k], rtol=1e-9, atol=1e-12)
    assert grads["bnstep.bn0.bias"][1].abs().sum() > 0  # the last set is reached
    # And the written-out objective itself, against float64 finite differences.
    k, idx, eps = "bnstep.bn2.weight", (1, 3), 1e-6
    bump = torch.zeros_like(params[k])
    bump[idx] = eps
    with torch.enable_grad():
        plus = per_step_bn_objective(model, {**params, k: params[k] + bump}, batch, 3, 0.3,
                                     weights)
        minus = per_step_bn_objective(model, {**params, k: params[k] - bump}, batch, 3, 0.3,
                                      weights)
    fd = (plus - minus).item() / (2 * eps)
    assert grads[k][idx].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_per_step_batch_norms_adapt_at_the_last_step_s_set_and_past_it():
    # Testing with more inner steps than training had: the steps past the last set keep it.
    model, params = small_conv(dtype=torch.float64)
    params = with_step_norms(params, model.norm_keys, 2)
    params = {k: v + 1.0 if k.startswith("bnstep.") else v for k, v in params.items()}
    batch = image_batch(tasks=1, dtype=torch.float64)
    for steps in (2, 4):
        step = MetaStep("maml", inner_lr=0.3, inner_steps=steps, per_step_bn=True)
        adapted = adapt(model, params, batch.support_x[0], batch.support_y[0],
                        **step.adapt_options(params))
        torch.testing.assert_close(adapted["bn1.weight"], params["bnstep.bn1.weight"][0])
        assert not torch.equal(adapted["conv1.weight"], params["conv1.weight"])


def test_per_step_batch_norms_train_resume_and_adapt_through_the_learner(tmp_path,
                                                                        omniglot_small):
    def config(out, *extra):
        return load_config(ROOT / "configs" / "omniglot_5w1s_maml.yaml", [
            f"data.dataset={omniglot_small}", "model.hidden=8", "algorithm.inner_steps=2",
            "algorithm.test_inner_steps=3", "algorithm.per_step_bn=true",
            "algorithm.lslr=true", "algorithm.meta_batch_size=2", "data.queries=2",
            f"train.output_dir={out}", "train.val_every=0", "eval.episodes=4",
            "train.progress=false", "tracking.enabled=false", "train.inner_loop=loop",
            "train.threads=1", *extra])

    whole = train(config(tmp_path / "a", "train.steps=4", "train.checkpoint_every=2"))
    resumed = train(config(tmp_path / "b", "train.steps=4"),
                    resume=Path(whole["run_dir"]) / "checkpoints" / "step-0000002.pt")
    a, b = load_checkpoint(whole["checkpoint"]), load_checkpoint(resumed["checkpoint"])
    for k in a["params"]:
        torch.testing.assert_close(a["params"][k], b["params"][k], rtol=0, atol=0)
    rows = a["params"]["bnstep.bn3.weight"]
    assert rows.shape == (1, 8) and not torch.equal(rows[0], a["params"]["bn3.weight"])
    # The inner loop does not adapt them, so LSLR has no rate for them.
    assert "lslr.bn3.weight" not in a["params"] and "lslr.conv3.weight" in a["params"]
    learner = Learner.load(whole["checkpoint"])
    assert learner.step.per_step_bn
    images = torch.rand(5, 1, 28, 28)
    adapted = learner.adapt(images, list(range(5)))
    torch.testing.assert_close(adapted.params["bn3.weight"], rows[0].to(torch.float32))
    assert len(adapted.predict(images)) == 5


@pytest.mark.parametrize("overrides, message", [
    (["algorithm.per_step_bn=true", "algorithm.name=anil"],
     "algorithm.per_step_bn=True does not apply to 'anil'"),
    (["algorithm.per_step_bn=true", "algorithm.name=protonet"],
     "algorithm.per_step_bn=True does not apply to 'protonet'"),
    (["algorithm.per_step_bn=true"], "model.name='mlp' has no batch norm"),
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
    off = run("off", "algorithm.lslr=false", "algorithm.msl_steps=0", "algorithm.per_step_bn=false",
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
