"""Multi-worker meta-training gives the single-worker result: torchrun, real gloo groups."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_torchrun, run_workers

from metadist.config import load_config
from metadist.training.checkpoint import load_checkpoint
from metadist.training.distributed import all_reduce_sum
from metadist.training.loop import train

ROOT = Path(__file__).resolve().parents[1]


def test_all_reduce_is_a_no_op_in_one_process():
    t = [torch.ones(3), torch.zeros(2, 2)]
    assert all_reduce_sum(t) is t


# Plain SGD outer steps: Adam's first steps are ~lr·sign(g), which turns float32 round-off
# in near-zero gradient entries (the order of the sums differs) into differences of 2·lr.
CASES = {
    # MAML on real Omniglot, 5 tasks over 2 workers: an uneven split (3 + 2).
    "maml": ["configs/omniglot_5w1s_maml.yaml", "algorithm.meta_batch_size=5",
             "algorithm.outer_optimizer=sgd", "algorithm.outer_lr=0.1",
             "train.steps=3", "data.queries=3", "eval.episodes=8", "eval.batch_size=4"],
    # ResNet-12 (small widths): its shortcut convolutions and 16 batch norms, all-reduced.
    # α=0.01 (MAML's miniImageNet rate): at Omniglot's 0.4 its meta-gradient is so sharp
    # that a parameter change of 1e-5 moves a task's by O(1), so the all-reduce's float32
    # round-off shows by the third step.
    "resnet12": ["configs/omniglot_5w1s_maml.yaml", "model.name=resnet12",
                 "model.widths=[4,4,8,8]", "algorithm.inner_lr=0.01",
                 "algorithm.meta_batch_size=5",
                 "algorithm.outer_optimizer=sgd", "algorithm.outer_lr=0.1",
                 "train.steps=3", "data.queries=3", "eval.episodes=8", "eval.batch_size=4"],
    # MAML++'s per-step batch norms and per-step rates are parameters, all-reduced too.
    "maml++": ["configs/omniglot_5w1s_maml.yaml", "algorithm.meta_batch_size=5",
               "algorithm.outer_optimizer=sgd", "algorithm.outer_lr=0.1",
               "algorithm.inner_steps=2", "algorithm.per_step_bn=true", "algorithm.lslr=true",
               "algorithm.msl_steps=2", "train.steps=3", "data.queries=3",
               "eval.episodes=8", "eval.batch_size=4"],
    "fomaml": ["configs/sinusoid_maml.yaml", "algorithm.name=fomaml",
               "algorithm.outer_optimizer=sgd", "algorithm.outer_lr=0.01",
               "algorithm.meta_batch_size=6", "train.steps=8", "eval.episodes=20"],
    "reptile": ["configs/sinusoid_maml.yaml", "algorithm.name=reptile",
                "algorithm.outer_optimizer=sgd", "algorithm.outer_lr=0.5",
                "algorithm.inner_steps=3", "algorithm.meta_batch_size=5", "train.steps=8",
                "eval.episodes=20"],
    # Meta-SGD: the learned rates are parameters too, all-reduced with the rest.
    "metasgd": ["configs/sinusoid_maml.yaml", "algorithm.name=metasgd",
                "algorithm.inner_lr=0.01", "algorithm.outer_optimizer=sgd",
                "algorithm.outer_lr=0.01", "algorithm.meta_batch_size=5", "train.steps=8",
                "eval.episodes=20"],
    # Nichol et al.'s inner Adam, its state carried on: the workers all-reduce it too.
    "reptile-carried": ["configs/sinusoid_maml.yaml", "algorithm.name=reptile",
                        "algorithm.outer_optimizer=sgd", "algorithm.outer_lr=0.5",
                        "algorithm.inner_steps=3", "algorithm.inner_optimizer=adam",
                        "algorithm.inner_lr=0.01", "algorithm.inner_state=carried",
                        "algorithm.meta_batch_size=5", "train.steps=8", "eval.episodes=20"],
}


@pytest.mark.parametrize("algorithm", list(CASES))
def test_two_workers_end_with_the_parameters_of_one(algorithm, tmp_path, omniglot_small):
    config, *overrides = CASES[algorithm]
    overrides = overrides + [
        f"data.dataset={omniglot_small}" if "omniglot" in config else "data.dataset=sinusoid",
        "tracking.enabled=false", "train.progress=false", "train.val_every=0",
        "train.inner_loop=loop", "train.threads=1",
    ]
    cfg = load_config(ROOT / config, overrides)
    single = train(cfg, run_dir=tmp_path / "one")
    result_two = run_workers(2, [config, *overrides], tmp_path / "two")
    one = load_checkpoint(tmp_path / "one" / "checkpoints" / "final.pt")
    two = load_checkpoint(tmp_path / "two" / "checkpoints" / "final.pt")
    assert one["step"] == two["step"]
    for k in one["params"]:
        assert not torch.equal(one["params"][k], load_initial(one, k)), k  # it trained
        torch.testing.assert_close(two["params"][k], one["params"][k], rtol=1e-4, atol=1e-5)
    losses_one = [h["train_loss"] for h in one["history"]]
    losses_two = [h["train_loss"] for h in two["history"]]
    assert losses_two == pytest.approx(losses_one, rel=1e-4)
    assert result_two["workers"] == 2
    assert result_two["loss"] == pytest.approx(single["loss"], rel=1e-4, abs=1e-6)
    if single["metric"] == "accuracy":
        # Accuracy moves in steps of one query: parameters equal to 1e-4 can still tip a
        # near-tie between two classes (which one depends on the CPU's float32 kernels).
        one_query = 1 / (single["episodes"] * cfg.data.ways * cfg.data.queries)
        assert abs(result_two["mean"] - single["mean"]) <= one_query + 1e-6
    else:
        assert result_two["mean"] == pytest.approx(single["mean"], rel=1e-4, abs=1e-6)
    if one["inner_moments"] is not None:
        for k, (_, v) in one["inner_moments"]["moments"].items():
            torch.testing.assert_close(two["inner_moments"]["moments"][k][1], v, rtol=1e-4,
                                       atol=1e-9)


def load_initial(state: dict, key: str) -> torch.Tensor:
    from metadist.algorithms import MetaStep
    from metadist.config import config_from_dict
    from metadist.models import model_from_spec
    from metadist.training.loop import initial_params

    config = config_from_dict(state["config"])
    step = MetaStep.from_config(config.algorithm)
    return initial_params(config, model_from_spec(state["model"]), step)[key]


def test_a_worker_frees_its_process_group_before_the_interpreter_exits(tmp_path):
    """A group that outlives ``main()`` is torn down during interpreter shutdown, where a
    gloo thread freeing its last collective aborts the process now and then. Freed in
    ``main()``, its threads are gone when ``main()`` returns: checked deterministically."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, sys\n"
        "import metadist.worker\n"
        "metadist.worker.main(sys.argv[1:])\n"
        "tasks = os.listdir('/proc/self/task')\n"
        "names = [open(f'/proc/self/task/{t}/comm').read().strip() for t in tasks]\n"
        "out = sys.argv[sys.argv.index('--run-dir') + 1] + '.threads.' + os.environ['RANK']\n"
        "open(out, 'w').write(' '.join(sorted(names)))\n"
    )
    run_torchrun(2, [str(probe)], [
        "configs/sinusoid_maml.yaml", "data.dataset=sinusoid", "tracking.enabled=false",
        "train.progress=false", "train.val_every=0", "train.steps=2", "eval.episodes=4",
        "train.threads=1",
    ], tmp_path / "run", timeout=300)
    for rank in (0, 1):
        # Each rank writes its own file: the ranks' stdout interleave under torchrun.
        threads = (tmp_path / f"run.threads.{rank}").read_text()
        assert "python" in threads and "gloo" not in threads, (rank, threads)


def test_a_sigterm_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """torchrun ranks see a preemption's SIGTERM at different moments, or (here) only one
    of them does; a rank that stopped alone would leave the others waiting in the
    all-reduce. The stop travels in the step's all-reduce: every rank ends after step 4,
    rank 0 writes its checkpoint, and all exit with SIGTERM's status."""
    import signal

    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, signal, sys\n"
        "import metadist.training.loop, metadist.worker\n"
        "real, calls = metadist.training.loop.meta_gradient, []\n"
        "def meta_gradient(*args, **kwargs):\n"
        "    calls.append(1)\n"
        "    if os.environ['RANK'] == '1' and len(calls) == 4:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(*args, **kwargs)\n"
        "metadist.training.loop.meta_gradient = meta_gradient\n"
        "out = sys.argv[sys.argv.index('--run-dir') + 1] + '.exit.' + os.environ['RANK']\n"
        "try:\n"
        "    metadist.worker.main(sys.argv[1:])\n"
        "    code = 0\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "open(out, 'w').write(f'{code} {len(calls)}')\n"
        "sys.exit(code)\n"
    )
    run_dir = tmp_path / "run"
    out = run_torchrun(2, [str(probe)], [
        "configs/sinusoid_maml.yaml", "tracking.enabled=false", "train.progress=false",
        "train.val_every=0", "train.steps=1000", "train.checkpoint_every=0",
        "train.inner_loop=loop", "train.threads=1",
    ], run_dir, timeout=300, check=False)
    assert out.returncode != 0
    for rank in (0, 1):
        assert (tmp_path / f"run.exit.{rank}").read_text() == f"{128 + signal.SIGTERM} 4", \
            out.stderr[-3000:]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-0000004.pt"]
    assert load_checkpoint(run_dir / "checkpoints" / "step-0000004.pt")["step"] == 4
