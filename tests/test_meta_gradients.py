"""Correctness of the meta-gradients: against finite differences, closed forms, the
first-order/second-order decomposition, and between the loop and the vmap paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metadist.algorithms import CarriedMoments, MetaStep, adapted_scores, meta_gradient
from metadist.algorithms.inner_loop import minibatch_order, task_loss
from metadist.data.episodes import MetaBatch
from metadist.models import MLP, Conv4


def image_batch(tasks=3, ways=3, shots=1, queries=2, size=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return MetaBatch(
        torch.randn(tasks, ways * shots, 1, size, size, generator=g, dtype=dtype),
        torch.arange(ways).repeat(shots).expand(tasks, -1).clone(),
        torch.randn(tasks, ways * queries, 1, size, size, generator=g, dtype=dtype),
        torch.arange(ways).repeat(queries).expand(tasks, -1).clone(),
    )


def small_conv(pool="max", dtype=torch.float32, ways=3, size=16):
    model = Conv4(ways=ways, hidden=4, image_size=size, pool=pool)
    params = model.init_params(torch.Generator().manual_seed(1))
    return model, {k: v.to(dtype).requires_grad_() for k, v in params.items()}


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads.values()])


def outer_loss(model, params, batch, step):
    """The meta-objective as a plain function of the parameters (sum over tasks)."""
    return written_out_objective(model, params, batch, step.inner_steps,
                                 lambda key, s: step.inner_lr)


def written_out_objective(model, params, batch, steps, rate, weights=None):
    """Σ over tasks of the query loss after ``steps`` inner SGD steps at ``rate(key, s)``,
    with plain autograd: the reference the algorithms' meta-gradients are held to.
    Learned rates (``lr.``/``lslr.`` entries) are read through ``rate``, not adapted.
    ``weights``: the query loss after every step, weighted (MAML++'s multi-step loss)."""
    body = [k for k in params if not k.startswith(("lr.", "lslr."))]
    total = 0.0
    for t in range(batch.support_x.shape[0]):
        p = {k: params[k] for k in body}
        for s in range(steps):
            g = torch.autograd.grad(
                task_loss(model, p, batch.support_x[t], batch.support_y[t]),
                list(p.values()), create_graph=True,
            )
            p = {k: v - rate(k, s) * gi for (k, v), gi in zip(p.items(), g)}
            if weights is not None:
                total = total + weights[s] * task_loss(model, p, batch.query_x[t],
                                                       batch.query_y[t])
        if weights is None:
            total = total + task_loss(model, p, batch.query_x[t], batch.query_y[t])
    return total


@pytest.mark.parametrize("pool", ["max", "stride"])
@pytest.mark.parametrize("inner_loop", ["loop", "vmap"])
def test_maml_meta_gradient_matches_finite_differences(pool, inner_loop):
    torch.manual_seed(0)
    model, params = small_conv(pool, torch.float64)
    batch = image_batch(tasks=2, dtype=torch.float64)
    step = MetaStep("maml", inner_lr=0.3, inner_steps=2)
    grads, _ = meta_gradient(model, params, batch, step, inner_loop=inner_loop)
    eps = 1e-6
    g = torch.Generator().manual_seed(3)
    for name in ("conv0.weight", "conv2.weight", "bn1.weight", "bn3.bias", "head.weight"):
        for _ in range(2):
            idx = tuple(torch.randint(0, s, (1,), generator=g).item() for s in params[name].shape)
            values = []
            for sign in (1, -1):
                shifted = {k: v.detach().clone() for k, v in params.items()}
                shifted[name][idx] += sign * eps
                with torch.enable_grad():
                    shifted = {k: v.requires_grad_() for k, v in shifted.items()}
                    values.append(outer_loss(model, shifted, batch, step).item())
            fd = (values[0] - values[1]) / (2 * eps)
            assert grads[name][idx].item() == pytest.approx(fd, rel=1e-5, abs=1e-8), (name, idx)


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "anil", "reptile"])
@pytest.mark.parametrize("pool", ["max", "stride"])
def test_vmap_and_loop_give_the_same_meta_gradient(algorithm, pool):
    # 28x28 keeps >= 2x2 maps in the last block, so the support set's batch-norm statistics
    # are not taken over 3 numbers (ill-conditioned, amplifies float32 round-off).
    model, params = small_conv(pool, size=28)
    batch = image_batch(tasks=5, size=28)
    step = MetaStep(algorithm, inner_lr=0.4, inner_steps=2)
    ref, ref_metrics = meta_gradient(model, params, batch, step, inner_loop="loop")
    for chunk in (0, 2):
        got, metrics = meta_gradient(model, params, batch, step, inner_loop="vmap", chunk=chunk)
        assert flat(ref).norm() > 0
        torch.testing.assert_close(flat(got), flat(ref), rtol=1e-4, atol=1e-5)
        assert metrics["loss"] == pytest.approx(ref_metrics["loss"], rel=1e-5)
        assert metrics["accuracy"] == pytest.approx(ref_metrics["accuracy"])


@pytest.mark.parametrize("impl", ["native", "matmul"])
def test_batch_norm_under_bf16_autocast_computes_in_the_parameters_precision(impl):
    from metadist.models import layers

    g = torch.Generator().manual_seed(0)
    x = (3 + torch.randn(4, 5, 6, 6, generator=g)).to(torch.bfloat16)  # a conv's bf16 output
    weight, bias = torch.rand(5, generator=g), torch.randn(5, generator=g)
    if impl == "matmul":
        x = x.permute(0, 2, 3, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layers.batch_norm(x, weight, bias, impl)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, layers.batch_norm(x.float(), weight, bias, impl))


@pytest.mark.parametrize("algorithm", ["maml", "reptile"])
def test_vmap_runs_under_bf16_autocast(algorithm):
    # vmap's batch-norm backward used to reject the bf16 activations autocast hands it
    # next to float32 weights ("expected scalar type BFloat16 but found Float").
    model, params = small_conv(size=28)
    batch = image_batch(tasks=2, size=28)
    step = MetaStep(algorithm, inner_lr=0.4, inner_steps=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = meta_gradient(model, params, batch, step, inner_loop="vmap")
    assert all(v.dtype == torch.float32 and v.isfinite().all() for v in got.values())
    assert flat(got).norm() > 0


def test_vmap_equals_the_loop_in_float64_through_five_second_order_steps():
    # miniImageNet MAML's shape (max-pool, flatten readout, 5 inner steps, α=0.01), scaled
    # down. In float32 the two paths differ by ~6e-4 there (benchmarks/results/
    # gpu_throughput_cpu_smoke.md), as does the float32 loop from the float64 one; in
    # float64 any difference left would be an error of the vmap path, not round-off.
    model = Conv4(ways=5, hidden=4, image_size=42, pool="max", readout="flatten")
    params = {k: v.double().requires_grad_()
              for k, v in model.init_params(torch.Generator().manual_seed(1)).items()}
    batch = image_batch(tasks=2, ways=5, shots=1, queries=3, size=42, dtype=torch.float64)
    step = MetaStep("maml", inner_lr=0.01, inner_steps=5)
    ref, _ = meta_gradient(model, params, batch, step, inner_loop="loop")
    got, _ = meta_gradient(model, params, batch, step, inner_loop="vmap")
    assert flat(ref).norm() > 0
    torch.testing.assert_close(flat(got), flat(ref), rtol=1e-11, atol=1e-13)


def test_vmap_and_loop_agree_on_sinusoid_mlp():
    from metadist.data.sinusoid import SinusoidTasks

    model = MLP()
    params = {k: v.requires_grad_() for k, v in model.init_params().items()}
    batch = SinusoidTasks(shots=10, queries=10, seed=0).meta_batch(0, 6)
    for algorithm in ("maml", "fomaml", "reptile"):
        step = MetaStep(algorithm, inner_lr=0.01, inner_steps=3)
        ref, _ = meta_gradient(model, params, batch, step, inner_loop="loop")
        got, _ = meta_gradient(model, params, batch, step, inner_loop="vmap")
        torch.testing.assert_close(flat(got), flat(ref), rtol=1e-4, atol=1e-6)


def test_first_order_maml_is_maml_minus_the_second_order_term():
    # One inner step: ∇θ L_q(θ - α∇L_s(θ)) = (I - α H_s(θ)) ∇L_q(φ), and FOMAML keeps ∇L_q(φ).
    model, params = small_conv("stride", torch.float64)
    batch = image_batch(tasks=1, dtype=torch.float64)
    alpha = 0.3
    maml, _ = meta_gradient(model, params, batch, MetaStep("maml", alpha, 1))
    fomaml, _ = meta_gradient(model, params, batch, MetaStep("fomaml", alpha, 1))
    sx, sy, qx, qy = (t[0] for t in batch)

    def support_grad(p):
        return torch.func.grad(lambda q: task_loss(model, q, sx, sy))(p)

    theta = {k: v.detach() for k, v in params.items()}
    phi = {k: theta[k] - alpha * g for k, g in support_grad(theta).items()}
    v = torch.func.grad(lambda q: task_loss(model, q, qx, qy))(phi)
    _, hvp = torch.func.jvp(support_grad, (theta,), (v,))
    second_order = {k: -alpha * hvp[k] for k in theta}
    assert flat(second_order).norm() > 1e-6 * flat(maml).norm()  # the term is not negligible
    torch.testing.assert_close(flat(fomaml), flat(v))
    torch.testing.assert_close(
        flat(maml), flat(fomaml) + flat(second_order), rtol=1e-7, atol=1e-10
    )


def test_maml_closed_form_for_linear_regression():
    # f(x) = w·x + b, squared loss; one inner step has a closed-form meta-gradient.
    torch.manual_seed(0)
    d, n, m, alpha = 4, 6, 5, 0.05
    model = MLP(in_features=d, hidden=(), out_features=1)
    params = {k: v.double().requires_grad_() for k, v in model.init_params().items()}
    xs, xq = torch.randn(1, n, d, dtype=torch.float64), torch.randn(1, m, d, dtype=torch.float64)
    ys, yq = torch.randn(1, n, 1, dtype=torch.float64), torch.randn(1, m, 1, dtype=torch.float64)
    batch = MetaBatch(xs, ys, xq, yq)
    grads, _ = meta_gradient(model, params, batch, MetaStep("maml", alpha, 1))

    def aug(x):
        return torch.cat([x[0], torch.ones(x.shape[1], 1, dtype=x.dtype)], dim=1)

    xa, qa = aug(xs), aug(xq)
    theta = torch.cat([params["head.weight"].detach().flatten(), params["head.bias"].detach()])
    a = 2.0 / n * xa.T @ xa
    phi = theta - alpha * (a @ theta - 2.0 / n * xa.T @ ys[0, :, 0])
    expected = (torch.eye(d + 1, dtype=torch.float64) - alpha * a).T @ (
        2.0 / m * qa.T @ (qa @ phi - yq[0, :, 0])
    )
    got = torch.cat([grads["head.weight"].flatten(), grads["head.bias"]])
    torch.testing.assert_close(got, expected)


def test_reptile_outer_step_is_beta_times_phi_minus_theta():
    model, params = small_conv("stride")
    batch = image_batch(tasks=3)
    alpha, beta, steps = 0.1, 0.5, 3
    grads, _ = meta_gradient(model, params, batch, MetaStep("reptile", alpha, steps))
    # φ of each task by an independent plain-SGD loop over a module-free copy.
    phis = []
    for t in range(3):
        p = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        opt = torch.optim.SGD(p.values(), lr=alpha)
        for _ in range(steps):
            opt.zero_grad()
            task_loss(model, p, batch.support_x[t], batch.support_y[t]).backward()
            opt.step()
        phis.append({k: v.detach() for k, v in p.items()})
    theta = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    opt = torch.optim.SGD(theta.values(), lr=beta)
    for k, v in theta.items():
        v.grad = grads[k] / 3
    opt.step()
    for k in theta:
        mean_phi = sum(phi[k] for phi in phis) / 3
        expected = params[k].detach() + beta * (mean_phi - params[k].detach())
        torch.testing.assert_close(theta[k].detach(), expected, rtol=1e-5, atol=1e-6)


def test_anil_adapts_only_the_head():
    model, params = small_conv("stride")
    batch = image_batch(tasks=2)
    step = MetaStep("anil", 0.4, 2)
    from metadist.algorithms.meta import _run_tasks

    _, _, adapted, _ = _run_tasks(model, params, *batch, step, "loop", outer_graph=False)
    for k in params:
        changed = not torch.equal(adapted[k][0], params[k].detach())
        assert changed == (k in model.head_keys), k


def test_adapted_scores_are_the_same_on_both_paths():
    model, params = small_conv("max")
    batch = image_batch(tasks=4, queries=5)
    step = MetaStep("maml", 0.4, 3)
    loss_a, acc_a = adapted_scores(model, params, batch, step, inner_loop="loop")
    loss_b, acc_b = adapted_scores(model, params, batch, step, inner_loop="vmap", chunk=3)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc_a, acc_b)


def test_unknown_algorithm_is_rejected():
    with pytest.raises(ValueError, match="algorithm='mamal' is not one of"):
        MetaStep("mamal")


def test_minibatch_order_passes_over_every_row_in_fresh_orders():
    order = minibatch_order(6, 4, 5, np.random.default_rng(0))  # 20 rows: 3 passes and 2
    assert order.shape == (5, 4)
    rows = order.flatten()
    passes = [rows[i * 6:(i + 1) * 6] for i in range(3)]
    for p in passes:
        assert sorted(p.tolist()) == list(range(6))
    assert not all(torch.equal(passes[0], p) for p in passes[1:])


def test_task_minibatches_do_not_depend_on_how_the_tasks_are_split():
    step = MetaStep("reptile", 0.1, 5, inner_batch=4)
    whole = step.minibatches(10, 3, range(8))
    assert whole.shape == (8, 5, 4)
    torch.testing.assert_close(step.minibatches(10, 3, range(3, 6)), whole[3:6])
    assert not torch.equal(whole[0], whole[1])
    assert step.minibatches(4, 3, range(2)) is None  # a batch of the whole support set
    assert MetaStep("reptile", 0.1, 5).minibatches(10, 3, range(2)) is None


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_minibatched_inner_loop_matches_torch_optim(optimizer):
    model, params = small_conv("stride")
    batch = image_batch(tasks=2, ways=3, shots=4)  # 12 support rows per task
    lr, steps = 0.01, 4
    step = MetaStep("reptile", lr, steps, inner_batch=5, inner_optimizer=optimizer)
    order = step.minibatches(12, 0, range(2))
    grads, _ = meta_gradient(model, params, batch, step, order=order)
    expected = {k: torch.zeros_like(v) for k, v in params.items()}
    for t in range(2):
        p = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        opt = (torch.optim.Adam(p.values(), lr=lr, betas=(0.0, 0.999)) if optimizer == "adam"
               else torch.optim.SGD(p.values(), lr=lr))
        for s in range(steps):
            opt.zero_grad()
            rows = order[t, s]
            task_loss(model, p, batch.support_x[t][rows], batch.support_y[t][rows]).backward()
            opt.step()
        for k in p:
            expected[k] += params[k].detach() - p[k].detach()
    for k in params:
        torch.testing.assert_close(grads[k], expected[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("algorithm", ["reptile", "fomaml"])
def test_vmap_and_loop_agree_with_inner_minibatches_and_adam(algorithm):
    model, params = small_conv("max")
    batch = image_batch(tasks=4, ways=3, shots=3)
    step = MetaStep(algorithm, 0.01, 3, inner_batch=4, inner_optimizer="adam")
    order = step.minibatches(9, 1, range(4))
    a, ma = meta_gradient(model, params, batch, step, inner_loop="loop", order=order)
    b, mb = meta_gradient(model, params, batch, step, inner_loop="vmap", chunk=3, order=order)
    torch.testing.assert_close(flat(a), flat(b), rtol=1e-4, atol=1e-6)
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-5)


@pytest.mark.parametrize("inner_loop", ["loop", "vmap"])
def test_carried_inner_adam_matches_torch_optim_run_on_from_the_state(inner_loop):
    """Every task of a meta-batch continues one torch.optim.Adam from the carried state (its
    moments and step count); the state then moves to the mean of the tasks' end states."""
    model, params = small_conv("stride")
    lr, steps, tasks = 0.01, 3, 3
    step = MetaStep("reptile", lr, steps, inner_batch=5, inner_optimizer="adam",
                    inner_state="carried")
    carried = CarriedMoments()
    first = image_batch(tasks=tasks, ways=3, shots=4, seed=1)
    meta_gradient(model, params, first, step, order=step.minibatches(12, 0, range(tasks)),
                  carried=carried)
    carried.advance(carried.pending_tensors(), tasks, steps)
    assert carried.step == steps and set(carried.moments) == set(params)
    start = CarriedMoments(carried.step, dict(carried.moments))

    batch = image_batch(tasks=tasks, ways=3, shots=4, seed=2)
    order = step.minibatches(12, 1, range(tasks))
    grads, _ = meta_gradient(model, params, batch, step, inner_loop=inner_loop, chunk=2,
                             order=order, carried=carried)
    expected = {k: torch.zeros_like(v) for k, v in params.items()}
    end_v = {k: torch.zeros_like(v) for k, v in params.items()}
    for t in range(tasks):
        p = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        opt = torch.optim.Adam(p.values(), lr=lr, betas=(0.0, 0.999))
        for k, leaf in p.items():
            m, v = start.moments[k]
            opt.state[leaf] = {"step": torch.tensor(float(start.step)),
                               "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
        for s in range(steps):
            opt.zero_grad()
            rows = order[t, s]
            task_loss(model, p, batch.support_x[t][rows], batch.support_y[t][rows]).backward()
            opt.step()
        for k, leaf in p.items():
            expected[k] += params[k].detach() - leaf.detach()
            end_v[k] += opt.state[leaf]["exp_avg_sq"]
    fresh, _ = meta_gradient(model, params, batch, step, order=order)
    assert not torch.allclose(flat(fresh), flat(expected), rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(flat(grads), flat(expected), rtol=1e-4, atol=1e-6)
    carried.advance(carried.pending_tensors(), tasks, steps)
    assert carried.step == 2 * steps
    for k in params:
        torch.testing.assert_close(carried.moments[k][1], end_v[k] / tasks, rtol=1e-4,
                                   atol=1e-9)


def test_evaluation_starts_from_the_carried_state_and_leaves_it():
    model, params = small_conv("stride")
    step = MetaStep("reptile", 0.01, 3, inner_optimizer="adam", inner_state="carried")
    batch = image_batch(tasks=2, ways=3, shots=2)
    carried = CarriedMoments()
    meta_gradient(model, params, batch, step, carried=carried)
    carried.advance(carried.pending_tensors(), 2, 3)
    before = {k: (m.clone(), v.clone()) for k, (m, v) in carried.moments.items()}
    fresh = adapted_scores(model, params, batch, step)[0]
    warm = adapted_scores(model, params, batch, step, carried=carried)[0]
    assert not torch.allclose(fresh, warm)
    assert carried.step == 3 and not carried.pending
    for k, (m, v) in carried.moments.items():
        assert torch.equal(m, before[k][0]) and torch.equal(v, before[k][1])


def test_carried_inner_state_needs_adam():
    with pytest.raises(ValueError, match="needs inner_optimizer 'adam'"):
        MetaStep("reptile", inner_state="carried")
    with pytest.raises(ValueError, match="inner_state='shared' is not one of"):
        MetaStep("reptile", inner_optimizer="adam", inner_state="shared")


def test_inner_adam_needs_a_first_order_algorithm():
    with pytest.raises(ValueError, match="needs a first-order algorithm"):
        MetaStep("maml", inner_optimizer="adam")
    MetaStep("maml", inner_optimizer="adam", first_order=True)
