"""Second-order meta-gradients in bounded memory: inner steps recomputed in the outer
backward (``train.recompute_inner``) give the meta-gradient of the kept steps, on both
paths, with learned rates and per-step batch norms, and the outer graph stops growing with
the inner steps; query blocks recomputed (``train.recompute_query``) give the same
meta-gradient for every algorithm with an outer graph and keep only the blocks' inputs;
chunks of tasks sum to the unchunked meta-gradient; the chunk chosen for
a memory budget (``train.max_memory_gb``) shrinks with the budget and a budget below one
task is refused; training with both switches is training without them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_backbones import small_resnet
from test_meta_gradients import flat, image_batch, small_conv

import metadist.training.loop
from metadist.algorithms import (
    MetaStep,
    meta_gradient,
    with_learned_rates,
    with_step_norms,
    with_step_rates,
)
from metadist.algorithms.meta import _run_tasks
from metadist.config import ConfigError, load_config
from metadist.models import Conv4
from metadist.training.checkpoint import load_checkpoint
from metadist.training.loop import train
from metadist.training.memory import (
    GB,
    MemoryBudgetError,
    chunk_for_budget,
    peak_memory,
)

ROOT = Path(__file__).resolve().parents[1]
SINUSOID = ROOT / "configs" / "sinusoid_maml.yaml"
CPU = torch.device("cpu")


def assert_same(got: dict, want: dict, rtol=1e-10, atol=1e-12) -> None:
    assert set(got) == set(want) and flat(want).norm() > 0
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol, msg=k)


# -- recomputation: the same meta-gradient -------------------------------------------------


@pytest.mark.parametrize("inner_loop", ["loop", "vmap"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("backbone", ["conv4", "resnet12"])
def test_recomputed_inner_steps_give_the_meta_gradient_of_kept_ones(backbone, steps,
                                                                    inner_loop):
    model, params = small_conv(dtype=torch.float64) if backbone == "conv4" else small_resnet()
    batch = image_batch(tasks=2, dtype=torch.float64)
    step = MetaStep("maml", inner_lr=0.3, inner_steps=steps)
    kept, kept_sums = meta_gradient(model, params, batch, step, inner_loop=inner_loop)
    got, sums = meta_gradient(model, params, batch, step, inner_loop=inner_loop, recompute=True)
    assert_same(got, kept)
    assert sums == pytest.approx(kept_sums, rel=1e-12)


def distinct(params: dict, seed: int) -> dict:
    """Learned rates and per-step batch-norm sets moved off their starting values, so that
    a step that read the wrong rate or set would show."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in params.items():
        v = v.detach()
        if k.startswith(("lr.", "lslr.")):
            v = v * (0.5 + torch.rand(v.shape, generator=g, dtype=v.dtype))
        elif k.startswith("bnstep."):
            v = v + 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype)
        out[k] = v.requires_grad_()
    return out


@pytest.mark.parametrize("inner_loop", ["loop", "vmap"])
@pytest.mark.parametrize("method", ["metasgd", "lslr", "per_step_bn", "maml++", "anil",
                                    "proto-maml", "resnet12 maml++"])
def test_recomputation_with_learned_rates_and_per_step_batch_norms(method, inner_loop):
    steps = 3
    model, params = small_resnet() if method.startswith("resnet12") else \
        small_conv(dtype=torch.float64)
    params = {k: v.detach() for k, v in params.items()}
    weights = None
    if method == "metasgd":
        params, step = with_learned_rates(params, 0.3), MetaStep("metasgd", 0.3, steps)
    elif method == "anil":
        step = MetaStep("anil", 0.3, steps)
    elif method == "proto-maml":
        step = MetaStep("maml", 0.3, steps, head_init="prototypes")
    else:
        lslr, bn = method != "per_step_bn", method != "lslr"
        norms = model.norm_keys if bn else ()
        params = with_step_norms(params, norms, steps)
        if lslr:
            params = with_step_rates(params, 0.3, steps,
                                     [k for k in model.init_params() if k not in norms])
        step = MetaStep("maml", 0.3, steps, lslr=lslr, per_step_bn=bn)
        if method.endswith("maml++"):
            weights = [0.2, 0.3, 0.5]  # the multi-step loss: a query loss per step
    params = distinct(params, 5)
    batch = image_batch(tasks=2, dtype=torch.float64)
    kept, _ = meta_gradient(model, params, batch, step, inner_loop=inner_loop,
                            step_weights=weights)
    got, _ = meta_gradient(model, params, batch, step, inner_loop=inner_loop,
                           step_weights=weights, recompute=True)
    assert_same(got, kept, rtol=1e-9)
    rates = [k for k in params if k.startswith(("lr.", "lslr.", "bnstep."))]
    assert all(got[k].abs().sum() > 0 for k in rates)  # the rates and sets are reached


def kept_bytes(loss: torch.Tensor) -> int:
    """The bytes of the distinct storages that the autograd graph behind ``loss`` keeps
    for its backward: what the outer graph holds between the forward and the backward."""
    seen, stack, storages = set(), [loss.grad_fn], {}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        values = [getattr(node, name) for name in dir(node) if name.startswith("_saved_")]
        if hasattr(node, "saved_tensors"):  # a custom autograd.Function's node
            values.extend(node.saved_tensors)
        for value in values:
            for t in value if isinstance(value, (tuple, list)) else [value]:
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
        stack.extend(f for f, _ in node.next_functions)
    return sum(storages.values())


@pytest.mark.parametrize("inner_loop", ["loop", "vmap"])
def test_the_outer_graph_stops_growing_with_the_inner_steps(inner_loop):
    model = Conv4(ways=5, hidden=8, image_size=42)
    params = {k: v.requires_grad_()
              for k, v in model.init_params(torch.Generator().manual_seed(0)).items()}
    batch = image_batch(tasks=1, ways=5, shots=2, queries=1, size=42)
    kept = {}
    for recompute in (False, True):
        for steps in (1, 4):
            losses, *_ = _run_tasks(model, params, *batch, MetaStep("maml", 0.01, steps),
                                    inner_loop, outer_graph=True, recompute=recompute)
            kept[recompute, steps] = kept_bytes(losses.sum())
    per_step = (kept[False, 4] - kept[False, 1]) / 3
    assert per_step > 0.5 * kept[False, 1]  # kept: each step adds about a step's graph
    # Recomputed: each step adds its parameters alone (~2.6k floats, 10 kB).
    assert kept[True, 4] - kept[True, 1] < 3 * 12_000
    assert kept[True, 4] < 0.4 * kept[False, 4]


@pytest.mark.parametrize("inner_loop", ["loop", "vmap"])
@pytest.mark.parametrize("method", ["maml", "maml, inner recomputed", "fomaml", "anil",
                                    "protonet", "metasgd", "maml++",
                                    "maml++, inner recomputed"])
@pytest.mark.parametrize("backbone", ["conv4", "resnet12"])
def test_recomputed_query_blocks_give_the_same_meta_gradient(backbone, method, inner_loop):
    model, params = small_conv(dtype=torch.float64) if backbone == "conv4" else small_resnet()
    params = {k: v.detach() for k, v in params.items()}
    weights, steps = None, 2
    if method == "metasgd":
        params, step = with_learned_rates(params, 0.3), MetaStep("metasgd", 0.3, steps)
    elif method.startswith("maml++"):
        norms = model.norm_keys
        params = with_step_rates(with_step_norms(params, norms, steps), 0.3, steps,
                                 [k for k in model.init_params() if k not in norms])
        step = MetaStep("maml", 0.3, steps, lslr=True, per_step_bn=True)
        weights = [0.4, 0.6]  # a query forward after each inner step
    else:
        step = MetaStep(method.split(",")[0], 0.3, steps)
    params = distinct(params, 3)
    batch = image_batch(tasks=2, dtype=torch.float64)
    recompute = method.endswith("recomputed")
    kept, kept_sums = meta_gradient(model, params, batch, step, inner_loop=inner_loop,
                                    step_weights=weights, recompute=recompute)
    got, sums = meta_gradient(model, params, batch, step, inner_loop=inner_loop,
                              step_weights=weights, recompute=recompute, recompute_query=True)
    assert_same(got, kept, rtol=1e-9, atol=1e-12)
    assert sums == pytest.approx(kept_sums, rel=1e-12)


@pytest.mark.parametrize("inner_loop", ["loop", "vmap"])
def test_recomputed_query_blocks_keep_only_the_blocks_inputs(inner_loop):
    model, params = small_resnet()
    batch = image_batch(tasks=1, queries=10, dtype=torch.float64)
    kept = {}
    for recompute in (False, True):
        for query in (False, True):
            losses, *_ = _run_tasks(model, params, *batch, MetaStep("maml", 0.3, 2),
                                    inner_loop, outer_graph=True, recompute=recompute,
                                    recompute_query=query)
            kept[recompute, query] = kept_bytes(losses.sum())
    # 30 query images against 3 support images: the query's graph is most of a task's.
    assert kept[False, True] < 0.45 * kept[False, False]
    # Both: the inputs of the steps and of the query's blocks' units, a fifth of the plain
    # graph (the bytes are deterministic: 19% here).
    assert kept[True, True] < 0.2 * kept[False, False]
    assert kept[True, True] < 0.3 * kept[True, False]


def test_recomputation_reruns_the_steps_under_the_forward_s_autocast():
    # The backward runs outside the autocast the forward ran in: the recomputation must
    # restore it, or it would take the steps in float32 against the forward's bf16 (4.6%
    # off in norm here; with it restored, bf16 round-off in another order, 0.07%).
    model, params = small_conv(size=28)
    batch = image_batch(tasks=2, size=28)
    step = MetaStep("maml", 0.4, 2)
    grads = {}
    for recompute in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses, *_ = _run_tasks(model, params, *batch, step, "loop", outer_graph=True,
                                    recompute=recompute)
        grads[recompute] = torch.cat([g.flatten() for g in torch.autograd.grad(
            losses.sum(), list(params.values()))])
    assert (grads[True] - grads[False]).norm() < 5e-3 * grads[False].norm()


# -- chunks of tasks -------------------------------------------------------------------------


@pytest.mark.parametrize("recompute", [False, True])
def test_chunks_of_tasks_sum_to_the_unchunked_meta_gradient(recompute):
    model, params = small_conv(dtype=torch.float64)
    batch = image_batch(tasks=5, dtype=torch.float64)
    step = MetaStep("maml", 0.3, 2)
    whole, whole_sums = meta_gradient(model, params, batch, step, inner_loop="vmap")
    loop, _ = meta_gradient(model, params, batch, step, inner_loop="loop",
                            recompute=recompute)
    assert_same(loop, whole)
    for chunk in (1, 2, 3, 4, 5, 8):  # 2, 3 and 4 leave an uneven last chunk
        got, sums = meta_gradient(model, params, batch, step, inner_loop="vmap", chunk=chunk,
                                  recompute=recompute)
        assert_same(got, whole, rtol=1e-12, atol=1e-13)
        assert sums == pytest.approx(whole_sums, rel=1e-13)


# -- measuring memory and choosing the chunk ---------------------------------------------------


def test_peak_memory_sees_an_allocation(monkeypatch):
    def allocate():
        x = torch.ones(25_000_000)  # 100 MB, touched
        time.sleep(0.05)
        return x.sum().item()

    out, peak, what = peak_memory(allocate, CPU)
    assert out == 25_000_000 and what == "peak RSS growth"
    assert 0.9e8 < peak < 1.5e8
    import metadist.training.memory as memory

    monkeypatch.setattr(memory, "_reset_high_water_mark", lambda: False)
    out, peak, what = peak_memory(allocate, CPU)
    assert what == "peak RSS growth (sampled every 1 ms)" and 0.9e8 < peak < 1.5e8


def test_a_smaller_budget_takes_smaller_chunks_and_one_below_a_task_is_refused():
    one = int(0.3 * GB)
    chunks = [chunk_for_budget(budget, one, tasks=8) for budget in (100.0, 2.0, 1.0, 0.61, 0.3)]
    assert chunks == [8, 6, 3, 2, 1]  # at most the worker's share; floor(budget / one)
    with pytest.raises(MemoryBudgetError) as refused:
        chunk_for_budget(0.25, one, tasks=8, what="peak RSS growth")
    message = str(refused.value)
    assert "train.max_memory_gb=0.25 is below" in message
    assert "measured 0.3 GB per task (peak RSS growth)" in message
    assert "train.recompute_inner=true" in message and "train.recompute_query=true" in message


MEASURE_ONE_AND_THREE = """
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
from test_meta_gradients import image_batch
from metadist.algorithms import MetaStep, meta_gradient
from metadist.models import Conv4
from metadist.training.loop import one_task_peak
from metadist.training.memory import peak_memory

torch.set_num_threads(1)
cpu = torch.device("cpu")
model = Conv4(ways=5, hidden=8, image_size=84)
params = {k: v.requires_grad_()
          for k, v in model.init_params(torch.Generator().manual_seed(0)).items()}
batch = image_batch(tasks=3, ways=5, queries=1, size=84)
step = MetaStep("maml", 0.01, 2)
need, what = one_task_peak(model, params, batch, step, "vmap", None, False, cpu)
_, three, _ = peak_memory(lambda: meta_gradient(model, params, batch, step,
                                                inner_loop="vmap", chunk=3), cpu)
print(json.dumps([need, three, what]))
"""


def test_the_chunk_chosen_from_one_measured_task_fits_its_budget():
    # Measured in a fresh process, as a run measures at its start: the RSS of a long-lived
    # test process carries the heap that earlier tests fragmented. glibc's mmap threshold
    # fixed, so that a freed tensor leaves the RSS (as benchmarks/second_order_memory.py).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", MEASURE_ONE_AND_THREE, str(Path(__file__).parent)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    need, three, what = json.loads(out.stdout.strip().splitlines()[-1])
    assert what == "peak RSS growth" and need > 1e7  # tens of MB: activations, not noise
    assert chunk_for_budget(3.2 * need / GB, need, 3) == 3
    assert chunk_for_budget(1.5 * need / GB, need, 3) == 1
    with pytest.raises(MemoryBudgetError, match=f"measured {need / GB:.3g} GB per task"):
        chunk_for_budget(0.5 * need / GB, need, 3, what)
    # c tasks take at most c times one task's peak (the rule's promise), measured.
    assert three <= 3 * need * 1.1, (three / need)


# -- training with the switches ------------------------------------------------------------


def sinusoid(tmp_path, *overrides):
    return load_config(SINUSOID, [
        f"train.output_dir={tmp_path / 'runs'}", "train.progress=false", "tracking.enabled=false",
        "train.val_every=0", "eval.episodes=20", "algorithm.meta_batch_size=5",
        "algorithm.inner_steps=2", "train.inner_loop=vmap", *overrides,
    ])


@pytest.fixture
def one_task_takes(monkeypatch):
    """Make every memory measurement of the trainer answer ``gb`` (deterministic chunks)."""
    def take(gb: float) -> None:
        def measured(fn, device):
            return fn(), int(gb * GB), "measured (test)"

        monkeypatch.setattr(metadist.training.loop, "peak_memory", measured)
    return take


def test_training_with_both_switches_is_training_without_them(tmp_path, one_task_takes,
                                                               capsys):
    one_task_takes(0.1)
    switches = ["train.recompute_inner=true", "train.max_memory_gb=0.25",
                "train.checkpoint_every=1"]
    plain = train(sinusoid(tmp_path / "plain", "train.steps=2"))
    both = train(sinusoid(tmp_path / "both", "train.steps=2", *switches))
    assert plain["chunk"] == 0 and both["chunk"] == 2  # 2 + 2 + 1 of 5 tasks
    assert "memory (train.max_memory_gb=0.25, one task's meta-gradient, measured (test), " \
           "inner steps recomputed): vmap 0.1 GB -> 2 of 5 tasks at a time" \
        in "".join(capsys.readouterr())
    a, b = (load_checkpoint(r["checkpoint"]) for r in (plain, both))
    for k in a["params"]:
        torch.testing.assert_close(b["params"][k], a["params"][k], rtol=1e-5, atol=1e-7)
    assert [h["train_loss"] for h in b["history"]] == pytest.approx(
        [h["train_loss"] for h in a["history"]], rel=1e-5)
    # Resume: one step, then the second from its checkpoint, is the two steps straight.
    first = Path(both["run_dir"]) / "checkpoints" / "step-0000001.pt"
    resumed = train(sinusoid(tmp_path / "resumed", "train.steps=2", *switches), resume=first)
    c = load_checkpoint(resumed["checkpoint"])
    for k in b["params"]:
        torch.testing.assert_close(c["params"][k], b["params"][k], rtol=0, atol=0)
    assert [h["train_loss"] for h in c["history"]] == [h["train_loss"] for h in b["history"]]


def test_a_budget_measures_each_path_that_auto_may_take(tmp_path, capsys):
    result = train(sinusoid(tmp_path, "train.steps=1", "train.inner_loop=auto",
                            "train.max_memory_gb=50"))
    err = "".join(capsys.readouterr())
    assert "memory (train.max_memory_gb=50, one task's meta-gradient, peak RSS growth): " \
           "loop " in err and "-> 1 of 5 tasks at a time; vmap " in err
    assert "-> 5 of 5 tasks at a time" in err and "inner loop: loop" in err
    assert result["chunk"] == (5 if result["inner_loop"] == "vmap" else 1)


def test_a_budget_below_one_task_is_refused_before_training(tmp_path, one_task_takes):
    one_task_takes(2.0)
    with pytest.raises(MemoryBudgetError) as refused:
        train(sinusoid(tmp_path, "train.steps=2", "train.max_memory_gb=1.5"))
    assert "train.max_memory_gb=1.5 is below what one task's meta-gradient needs: " \
           "measured 2 GB per task (measured (test))" in str(refused.value)
    assert not list(tmp_path.glob("runs/*"))  # the run directory is discarded


@pytest.mark.parametrize("overrides, message", [
    (["train.chunk=2", "train.max_memory_gb=4"],
     "train.chunk=2 and train.max_memory_gb=4.0 both set the tasks per chunk"),
    (["train.max_memory_gb=0"], "train.max_memory_gb=0.0 must be a finite number > 0"),
    (["train.recompute_inner=true", "algorithm.name=fomaml"],
     "train.recompute_inner=true recomputes second-order inner steps, and algorithm.name="
     "'fomaml' takes first-order ones"),
    (["train.recompute_inner=true", "algorithm.first_order=true"],
     "and algorithm.first_order=true takes first-order ones"),
    (["train.recompute_inner=true", "algorithm.name=reptile", "algorithm.outer_optimizer=sgd"],
     "algorithm.name='reptile' takes first-order ones"),
    (["train.recompute_query=true"],
     "train.recompute_query=true recomputes a model's blocks, and model.name='mlp' has none"),
])
def test_memory_switches_that_cannot_apply_are_refused(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        sinusoid(tmp_path, *overrides)


def test_recomputing_query_blocks_is_refused_for_reptile(tmp_path, omniglot_small):
    with pytest.raises(ConfigError, match=re.escape(
            "algorithm.name='reptile' takes no outer backward: drop train.recompute_query")):
        load_config(ROOT / "configs" / "omniglot_5w1s_reptile.yaml",
                    [f"data.dataset={omniglot_small}", "train.recompute_query=true"])


def test_a_resnet12_trains_the_same_with_every_block_and_step_recomputed(tmp_path,
                                                                         omniglot_small):
    def run(name, *switches):
        return train(load_config(ROOT / "configs" / "omniglot_5w1s_maml.yaml", [
            f"data.dataset={omniglot_small}", "model.name=resnet12",
            "model.widths=[4,4,8,8]", "algorithm.meta_batch_size=2", "data.queries=2",
            "algorithm.inner_steps=2", "train.steps=2", "train.val_every=0",
            "eval.episodes=2", "train.progress=false", "tracking.enabled=false",
            "train.inner_loop=loop", "train.threads=1", f"train.output_dir={tmp_path / name}",
            *switches]))

    plain = run("plain")
    both = run("both", "train.recompute_inner=true", "train.recompute_query=true")
    a, b = (load_checkpoint(r["checkpoint"]) for r in (plain, both))
    assert b["config"]["train"]["recompute_query"] is True
    for k in a["params"]:
        torch.testing.assert_close(b["params"][k], a["params"][k], rtol=1e-5, atol=1e-7)
    assert [h["train_loss"] for h in b["history"]] == pytest.approx(
        [h["train_loss"] for h in a["history"]], rel=1e-6)


def test_recomputation_with_first_order_steps_first_is_annealed_maml(tmp_path):
    # MAML++'s derivative-order annealing: the first-order steps have nothing to recompute.
    common = ["train.steps=3", "algorithm.first_order_steps=2", "train.inner_loop=loop"]
    a = train(sinusoid(tmp_path / "a", *common))
    b = train(sinusoid(tmp_path / "b", *common, "train.recompute_inner=true"))
    pa, pb = (load_checkpoint(r["checkpoint"])["params"] for r in (a, b))
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=0, atol=0)


def test_two_workers_agree_on_the_chunk_and_on_a_refusal(tmp_path):
    """Rank 0 measures; every rank runs the chunk it found, or every rank stops (a rank
    that stopped alone would leave the other waiting in the next all-reduce)."""
    from conftest import run_torchrun, run_workers

    common = ["configs/sinusoid_maml.yaml", "tracking.enabled=false", "train.progress=false",
              "train.val_every=0", "eval.episodes=20", "algorithm.meta_batch_size=5",
              "algorithm.inner_steps=2", "algorithm.outer_optimizer=sgd",
              "algorithm.outer_lr=0.01", "train.steps=3", "train.threads=1"]
    one = train(load_config(ROOT / common[0], [*common[1:], "train.inner_loop=loop"]),
                run_dir=tmp_path / "one")
    two = run_workers(2, [*common, "train.inner_loop=vmap", "train.recompute_inner=true",
                          "train.max_memory_gb=50"], tmp_path / "two")
    assert two["workers"] == 2 and two["chunk"] == 3  # the larger share, 3 + 2
    a, b = (load_checkpoint(Path(r["checkpoint"])) for r in (one, two))
    for k in a["params"]:
        torch.testing.assert_close(b["params"][k], a["params"][k], rtol=1e-5, atol=1e-7)
    refused = run_torchrun(2, ["-m", "metadist.worker"],
                           [*common, "train.max_memory_gb=0.000000001"], tmp_path / "refused",
                           timeout=300, check=False)
    assert refused.returncode != 0
    assert refused.stderr.count("train.max_memory_gb=1e-09 is below what one task's") >= 2
