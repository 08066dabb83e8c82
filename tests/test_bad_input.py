"""Bad input, as a new user or an attacker gives it, through the command and the Learner.

Every case asserts: exit status 2 (or, for the Python API, the exception type), a message
that names the culprit (the key, file, flag or value), no Python traceback, nothing
partial left behind (no run directory, no converted dataset), and for the security cases
that no code ran and no secret shows in any output.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from metadist.cli import main
from metadist.config import load_config
from metadist.training.checkpoint import FORMAT, load_checkpoint
from metadist.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
SINUSOID = str(ROOT / "configs" / "sinusoid_maml.yaml")
SECRET = "s3cr3t-Tok3n"


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out + out.err


def assert_refused(code: int, output: str, *culprits: str) -> None:
    assert code == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    for culprit in culprits:
        assert culprit in output, f"{culprit!r} not named in: {output[-2000:]}"
    assert SECRET not in output


# -- train: config values (the run must not start: no run directory) ------------------------

OVERRIDES = [
    ("algorithm.name=mamal", "algorithm.name='mamal' is not one of"),
    ("algorithm.inner_lr=nan", "algorithm.inner_lr=nan must be a finite number > 0"),
    ("algorithm.inner_lr=inf", "algorithm.inner_lr=inf must be a finite number > 0"),
    ("algorithm.inner_lr=-0.1", "algorithm.inner_lr=-0.1 must be a finite number > 0"),
    ("algorithm.inner_lr=0", "algorithm.inner_lr=0.0 must be a finite number > 0"),
    ("algorithm.inner_lr=fast", "algorithm.inner_lr"),
    ("algorithm.outer_lr=nan", "algorithm.outer_lr=nan must be a finite number > 0"),
    ("algorithm.outer_lr=inf", "algorithm.outer_lr=inf must be a finite number > 0"),
    ("algorithm.outer_lr=0", "algorithm.outer_lr=0.0 must be a finite number > 0"),
    ("algorithm.outer_lr=-1", "algorithm.outer_lr=-1.0 must be a finite number > 0"),
    ("algorithm.inner_steps=0", "algorithm.inner_steps=0 must be >= 1"),
    ("algorithm.first_order_steps=-1", "algorithm.first_order_steps=-1 must be >= 0"),
    ("algorithm.msl_steps=-1", "algorithm.msl_steps=-1 must be >= 0"),
    ("algorithm.per_step_bn=true", "algorithm.per_step_bn=true keeps batch-norm weights"),
    ("algorithm.per_step_bn=maybe", "algorithm.per_step_bn"),
    ("algorithm.outer_lr_schedule=step", "algorithm.outer_lr_schedule='step' is not one of"),
    ("algorithm.head_init=prototypes", "algorithm.head_init='prototypes' builds each task's"),
    ("algorithm.inner_steps=-3", "algorithm.inner_steps=-3 must be >= 1"),
    ("algorithm.test_inner_steps=0", "algorithm.test_inner_steps=0 must be >= 1"),
    ("algorithm.inner_batch=-1", "algorithm.inner_batch=-1 must be >= 0"),
    ("algorithm.test_inner_batch=-1", "algorithm.test_inner_batch=-1 must be >= 0"),
    ("algorithm.meta_batch_size=0", "algorithm.meta_batch_size=0 must be >= 1"),
    ("algorithm.inner_optimizer=rmsprop", "algorithm.inner_optimizer='rmsprop' is not one of"),
    ("algorithm.inner_optimizer=adam", "inner_optimizer='adam' needs a first-order algorithm"),
    ("algorithm.inner_state=shared", "algorithm.inner_state='shared' is not one of"),
    ("algorithm.inner_state=carried", "algorithm.inner_state='carried' carries the inner"),
    ("algorithm.inner_betas=[0.9]", "algorithm.inner_betas=[0.9] must be two values"),
    ("algorithm.inner_betas=[1.0,0.5]", "algorithm.inner_betas=[1.0, 0.5] must be two values"),
    ("algorithm.inner_betas=[-0.1,0.5]", "algorithm.inner_betas=[-0.1, 0.5] must be two"),
    ("algorithm.outer_optimizer=lamb", "algorithm.outer_optimizer='lamb' is not one of"),
    ("algorithm.outer_lr_final=1.0", "algorithm.outer_lr_final=1.0 must lie in"),
    ("algorithm.outer_lr_final=-0.5", "algorithm.outer_lr_final=-0.5 must lie in"),
    ("algorithm.outer_lr_final=nan", "algorithm.outer_lr_final=nan must lie in"),
    ("data.ways=0", "data.ways=0 must be >= 1"),
    ("data.shots=0", "data.shots=0 must be >= 1"),
    ("data.queries=0", "data.queries=0 must be >= 1"),
    ("data.train_shots=0", "data.train_shots=0 must be >= 1"),
    ("data.train_queries=0", "data.train_queries=0 must be >= 1"),
    ("data.decode_cache_max_gb=0", "data.decode_cache_max_gb=0.0 must be > 0"),
    ("data.decode_cache_max_gb=2", "data.decode_cache is not set"),
    ("data.ways=2.5", "data.ways"),
    ("train.steps=-1", "train.steps=-1 must be >= 0"),
    ("train.steps=many", "train.steps"),
    ("train.log_every=0", "train.log_every=0 must be >= 1"),
    ("train.val_every=-1", "train.val_every=-1 must be >= 0"),
    ("train.val_episodes=0", "train.val_episodes=0 must be >= 1"),
    ("train.checkpoint_every=-1", "train.checkpoint_every=-1 must be >= 0"),
    ("train.threads=-1", "train.threads=-1 must be >= 0"),
    ("train.chunk=-1", "train.chunk=-1 must be >= 0"),
    ("train.max_memory_gb=0", "train.max_memory_gb=0.0 must be a finite number > 0"),
    ("train.max_memory_gb=-4", "train.max_memory_gb=-4.0 must be a finite number > 0"),
    ("train.max_memory_gb=nan", "train.max_memory_gb=nan must be a finite number > 0"),
    ("train.max_memory_gb=lots", "train.max_memory_gb"),
    ("train.max_memory_gb=0.000000001", "train.max_memory_gb=1e-09 is below what one task's "
                                        "meta-gradient needs: measured"),
    ("train.recompute_inner=maybe", "train.recompute_inner"),
    ("train.inner_loop=fast", "train.inner_loop='fast' is not one of"),
    ("train.precision=fp16", "train.precision='fp16' is not one of"),
    ("train.device=tpu", "train.device='tpu'"),
    ("train.device=cuda:7", "train.device='cuda:7'"),
    ("eval.episodes=0", "eval.episodes=0 must be >= 1"),
    ("eval.batch_size=0", "eval.batch_size=0 must be >= 1"),
    ("workers=0", "workers=0 must be >= 1"),
    ("ray.prefetch=0", "ray.prefetch=0 must be >= 1"),
    ("ray.actors=-1", "ray.actors=-1 must be >= 0"),
    ("ray.actor_cpus=0", "ray.actor_cpus=0.0 must be a finite number > 0"),
    ("ray.cpus_per_worker=-1", "ray.cpus_per_worker=-1.0 must be a finite number >= 0"),
    ("ray.max_failures=-1", "ray.max_failures=-1 must be >= 0"),
    ("tune.num_samples=0", "tune.num_samples=0 must be >= 1"),
    ("tune.max_concurrent=-1", "tune.max_concurrent=-1 must be >= 0"),
    ("tune.reduction_factor=1", "tune.reduction_factor=1 must be >= 2"),
    ("tune.search=grid", "tune.search='grid' is not one of"),
    ("tune.scheduler=pbt", "tune.scheduler='pbt' is not one of"),
    ("tune.cpus_per_trial=0", "tune.cpus_per_trial=0.0 must be a finite number > 0"),
    ("model.name=resnet", "model.name='resnet' is not one of"),
    ("model.name=keras:resnet50", "model.name='keras:resnet50' is not one of"),
    ("model.name=torchvision:resnet999", "model.name='torchvision:resnet999': 'resnet999' is "
                                         "not one of torchvision's"),
    ("model.name=python:os", "model.name='python:os': 'python:os' is not of the form "
                             "python:package.module:callable"),
    ("model.name=python:1bad.module:make", "model.name='python:1bad.module:make'"),
    ("model.widths=[64,160,320]", "model.widths=[64, 160, 320] must be 4 positive integers"),
    ("model.widths=[64,0,320,640]", "model.widths=[64, 0, 320, 640] must be 4 positive"),
    ("model.widths=wide", "model.widths"),
    ("model.pool=avg", "model.pool='avg' is not one of"),
    ("model.readout=attn", "model.readout='attn' is not one of"),
    ("nope=1", "nope"),
    ("algorithm.nope=1", "nope"),
    ("train.steps", "'train.steps' is not of the form key=value"),
    (f"tracking.token={SECRET}", "token"),  # an unknown key: named, its value not shown
    ("data.dataset=/nonexistent/omniglot", "/nonexistent/omniglot"),
    ("resume=/nonexistent/final.pt", "/nonexistent/final.pt"),
    ("tracking.run_name=${oc.env:HOME}", "tracking.run_name uses a resolver"),
    ("data.dataset=${oc.env:HOME}", "data.dataset uses a resolver"),
    ("tracking.experiment=${oc.decode:'1'}", "tracking.experiment uses a resolver"),
    (f"tracking.tracking_uri=http://alice:{SECRET}@127.0.0.1:1",
     "tracking.tracking_uri=http://127.0.0.1:1...: the URI carries credentials"),
    (f"data.dataset=s3://bucket/omniglot?secret_key={SECRET}",
     "data.dataset=s3://bucket/omniglot...: the URI carries credentials"),
    (f"ray.address=ray://alice:{SECRET}@head:10001",
     "ray.address=ray://head:10001...: the URI carries credentials"),
    ("tracking.tracking_uri=http://127.0.0.1:1", "MLflow tracking server http://127.0.0.1:1 is "
                                                 "unreachable"),
]


@pytest.mark.parametrize("override, culprit", OVERRIDES, ids=[o for o, _ in OVERRIDES])
def test_train_refuses_a_bad_value_before_anything_runs(override, culprit, tmp_path, capsys,
                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, output = run(["train", SINUSOID, "train.val_every=0", "train.steps=3",
                        f"train.output_dir={tmp_path / 'runs'}", override], capsys)
    assert_refused(code, output, culprit)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt"))
    assert not (tmp_path / "mlflow.db").exists() or "tracking_uri" not in override


# -- train: config files -----------------------------------------------------------------------

FILES = {
    "unparsable": ("name: [x\n", "not a readable YAML file"),
    "python-object": ("a: !!python/object/apply:os.system ['touch {marker}']\n",
                      "could not determine a constructor"),
    "python-name": ("a: !!python/name:os.system\n", "could not determine a constructor"),
    "a-list": ("- a\n- b\n", "a config is a mapping of keys, not a ListConfig"),
    "a-scalar": ("42\n", "a config is a mapping of keys, not int"),
    "binary": ("\xff\xfe\x00\x01", "not a readable YAML file"),
    "unknown-key": ("name: x\ntrain:\n  stepz: 3\n", "stepz"),
    "wrong-type": ("name: x\ntrain:\n  steps: lots\n", "train.steps"),
    "env-resolver": ("name: x\ntracking:\n  run_name: ${oc.env:HOME}\n",
                     "tracking.run_name uses a resolver"),
    "credentials": (f"name: x\ntracking:\n  tracking_uri: http://a:{SECRET}@h:5000\n",
                    "the URI carries credentials"),
}


@pytest.mark.parametrize("case", list(FILES))
def test_train_refuses_a_bad_config_file(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text, culprit = FILES[case]
    marker = tmp_path / "code-ran"
    path = tmp_path / f"{case}.yaml"
    path.write_bytes(text.replace("{marker}", str(marker)).encode("latin-1"))
    code, output = run(["train", str(path), f"train.output_dir={tmp_path / 'runs'}"], capsys)
    assert_refused(code, output, str(path), culprit)
    assert not marker.exists() and not (tmp_path / "runs").exists()


def test_a_minimal_config_says_what_it_lacks(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "minimal.yaml").write_text("name: minimal\n")
    code, output = run(["train", "minimal.yaml", "train.steps=2"], capsys)
    assert_refused(code, output, "model.name='conv4' does not fit data.dataset='sinusoid'",
                   "take model.name=mlp")
    code, output = run(["train", "minimal.yaml", "train.steps=2", "model.name=mlp",
                        "train.val_every=0", "eval.episodes=5", "tracking.enabled=false",
                        "train.inner_loop=loop"], capsys)
    assert code == 0, output[-3000:]  # with the one key it lacks, it runs


@pytest.mark.parametrize("case", ["missing", "directory"])
def test_train_refuses_a_config_that_is_not_a_file(case, tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    if case == "directory":
        path.mkdir()
    code, output = run(["train", str(path)], capsys)
    assert_refused(code, output, "cfg.yaml")


# -- eval: checkpoints -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ckpt")
    cfg = load_config(SINUSOID, [f"train.output_dir={tmp}", "train.steps=2", "train.val_every=0",
                                 "eval.episodes=5", "tracking.enabled=false",
                                 "train.inner_loop=loop"])
    return Path(train(cfg)["checkpoint"])


def spoiled(state: dict, case: str) -> object:
    state = dict(state)
    params = dict(state["params"])
    key = next(iter(params))
    if case.startswith("no-"):
        state.pop(case[3:])
    elif case == "int-params":
        state["params"] = {k: v.to(torch.int64) for k, v in params.items()}
    elif case == "wrong-shape":
        params[key] = torch.zeros(3, 3)
        state["params"] = params
    elif case == "extra-param":
        params["evil"] = torch.zeros(1)
        state["params"] = params
    elif case == "missing-param":
        params.pop(key)
        state["params"] = params
    elif case == "params-not-a-dict":
        state["params"] = [torch.zeros(1)]
    elif case == "huge-model":
        state["model"] = {"kind": "mlp", "kwargs": {**state["model"]["kwargs"],
                                                    "hidden": [10**6, 10**6]}}
    elif case == "unknown-model":
        state["model"] = {"kind": "resnet999", "kwargs": {}}
    elif case == "bogus-model-kwargs":
        state["model"] = {"kind": "mlp", "kwargs": {"bogus": 1}}
    elif case == "model-not-a-dict":
        state["model"] = "mlp"
    elif case == "bad-config":
        state["config"] = {**state["config"], "algorithm": {"name": "mamal"}}
    elif case == "config-resolver":
        state["config"] = {**state["config"], "tracking": {"run_name": "${oc.env:HOME}"}}
    elif case == "nan-params":
        state["params"] = {k: torch.full_like(v, float("nan")) for k, v in params.items()}
    elif case == "not-a-dict":
        return [1, 2, 3]
    elif case == "wrong-format":
        state["format"] = "something-else/9"
    return state


CHECKPOINTS = {
    "no-config": "no ['config']", "no-model": "no ['model']", "no-params": "no ['params']",
    "no-step": "no ['step']", "int-params": "are not floating point",
    "wrong-shape": "wrong shape", "extra-param": "unexpected ['evil']",
    "missing-param": "parameters do not match", "params-not-a-dict": "parameters must be",
    "huge-model": "parameters, more than", "unknown-model": "model spec",
    "bogus-model-kwargs": "unexpected keyword argument 'bogus'",
    "model-not-a-dict": "model spec 'mlp'", "bad-config": "algorithm.name='mamal'",
    "config-resolver": "tracking.run_name uses a resolver",
    "nan-params": "the mse over 5 episodes is nan", "not-a-dict": "not a metadist checkpoint",
    "wrong-format": "not a metadist checkpoint",
}


@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_eval_refuses_a_spoiled_checkpoint(case, checkpoint, tmp_path, capsys):
    path = tmp_path / f"{case}.pt"
    torch.save(spoiled(load_checkpoint(checkpoint), case), path)
    code, output = run(["eval", str(path), "--episodes", "5"], capsys)
    assert_refused(code, output, str(path) if case != "nan-params" else "", CHECKPOINTS[case])


def test_eval_refuses_a_pickle_that_would_run_code(tmp_path, capsys):
    marker = tmp_path / "code-ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "evil": Evil()}, path)
    code, output = run(["eval", str(path)], capsys)
    assert_refused(code, output, str(path), "not a loadable metadist checkpoint")
    assert not marker.exists()


@pytest.mark.parametrize("what, content", [
    ("missing", None), ("directory", "dir"), ("text", b"hello"), ("empty", b""),
    ("zip-of-junk", b"PK\x03\x04junk"),
])
def test_eval_refuses_a_file_that_is_not_a_checkpoint(what, content, tmp_path, capsys):
    path = tmp_path / "x.pt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    code, output = run(["eval", str(path)], capsys)
    assert_refused(code, output, str(path))


@pytest.mark.parametrize("flags, culprit", [
    (["--episodes", "0"], "episodes must be an integer >= 1, got 0"),
    (["--episodes", "-5"], "episodes must be an integer >= 1, got -5"),
    (["--queries", "0"], "queries must be an integer >= 1"),
    (["--queries", "-2"], "queries must be an integer >= 1"),
    (["--ways", "1"], "ways must be an integer >= 2"),
    (["--shots", "0"], "shots must be an integer >= 1"),
    (["--ways", "3"], "ways=3: "),  # a regression model: no classes
    (["--inner-steps", "0"], "algorithm.test_inner_steps=0 must be >= 1"),
    (["--dataset", "/nonexistent/data"], "/nonexistent/data"),
])
def test_eval_refuses_bad_flags(flags, culprit, checkpoint, capsys):
    code, output = run(["eval", str(checkpoint), *flags], capsys)
    assert_refused(code, output, culprit)


# -- data convert ---------------------------------------------------------------------------


def image_bytes(value: int = 0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def image_tree(root: Path, classes: int = 6, per_class: int = 3) -> Path:
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            (root / f"c{c}" / f"{i}.png").write_bytes(image_bytes(c * 10 + i))
    return root


def imagefolder_case(case: str, tmp_path: Path) -> tuple[list[str], str]:
    src = tmp_path / "src"
    out = tmp_path / "out"
    if case == "missing-src":
        return ["imagefolder", str(src), str(out)], str(src)
    if case == "src-is-a-file":
        src.write_text("x")
        return ["imagefolder", str(src), str(out)], str(src)
    if case == "no-classes":
        src.mkdir()
        return ["imagefolder", str(src), str(out)], "no class folders"
    image_tree(src)
    if case == "class-without-images":
        (src / "empty").mkdir()
        (src / "empty" / "notes.txt").write_text("x")
        return ["imagefolder", str(src), str(out)], str(src / "empty")
    if case == "class-alias-symlink":
        (src / "alias").symlink_to(src / "c0")
        return ["imagefolder", str(src), str(out)], str(src / "alias")
    if case == "class-loops-to-the-tree":
        (src / "loop").symlink_to(src)
        return ["imagefolder", str(src), str(out)], str(src / "loop")
    if case == "file-symlink-outside":
        outside = tmp_path / "secret.png"
        outside.write_bytes(image_bytes(255))
        (src / "c1" / "leak.png").symlink_to(outside)
        return ["imagefolder", str(src), str(out)], str(src / "c1" / "leak.png")
    if case == "dir-symlink-inside-class":
        (src / "c2" / "more").symlink_to(src / "c3")
        return ["imagefolder", str(src), str(out)], str(src / "c2" / "more")
    if case == "corrupt-image":
        (src / "c4" / "bad.png").write_bytes(b"\x89PNG not really")
        return ["imagefolder", str(src), str(out)], "bad.png"
    if case == "out-inside-src":
        return ["imagefolder", str(src), str(src / "c0" / "out")], "must not lie inside"
    if case == "out-exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        return ["imagefolder", str(src), str(out)], str(out)
    if case == "out-under-a-file":
        (tmp_path / "afile").write_text("x")
        return ["imagefolder", str(src), str(tmp_path / "afile" / "out")], "is a file, not a"
    if case == "out-not-writable":
        return ["imagefolder", str(src), "/proc/metadist-out"], "cannot write in /proc"
    if case == "val-fraction-too-big":
        return ["imagefolder", str(src), str(out), "--val-fraction", "1.5"], "1.5"
    if case == "negative-test-fraction":
        return ["imagefolder", str(src), str(out), "--test-fraction", "-0.1"], "-0.1"
    raise AssertionError(case)


IMAGEFOLDER = ["missing-src", "src-is-a-file", "no-classes", "class-without-images",
               "class-alias-symlink", "class-loops-to-the-tree", "file-symlink-outside",
               "dir-symlink-inside-class", "corrupt-image", "out-inside-src", "out-exists",
               "out-under-a-file", "out-not-writable",
               "val-fraction-too-big", "negative-test-fraction"]


@pytest.mark.parametrize("case", IMAGEFOLDER)
def test_convert_imagefolder_refuses(case, tmp_path, capsys):
    argv, culprit = imagefolder_case(case, tmp_path)
    code, output = run(["data", "convert", *argv], capsys)
    assert_refused(code, output, culprit)
    out = Path(argv[2])
    if case == "out-exists":
        assert (out / "keep.txt").read_text() == "mine"
    else:
        assert not out.exists() or not any(out.rglob("*.parquet"))


def omniglot_zip(path: Path, member_size: int | None = None) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        if member_size is None:
            z.writestr("images_background/Alpha/character01/0101_01.png", image_bytes())
        else:
            z.writestr("images_background/Alpha/character01/0101_01.png",
                       b"\x00" * member_size)
    return path


@pytest.mark.parametrize("case", ["missing-release", "not-a-zip", "zip-bomb-member",
                                  "empty-zip-folder"])
def test_convert_omniglot_refuses(case, tmp_path, capsys, monkeypatch):
    src = tmp_path / "omniglot"
    out = tmp_path / "out"
    culprit = str(src)
    if case == "not-a-zip":
        src.mkdir()
        (src / "images_background.zip").write_bytes(b"not a zip")
        (src / "images_evaluation.zip").write_bytes(b"not a zip")
        culprit = "images_background.zip"
    elif case == "zip-bomb-member":
        from metadist.data.ingest import sources

        monkeypatch.setattr(sources, "MAX_MEMBER_BYTES", 1024)  # a 1 KiB cap, 2 KiB member
        src.mkdir()
        omniglot_zip(src / "images_background.zip", member_size=2048)
        omniglot_zip(src / "images_evaluation.zip")
        culprit = "declares 2,048 bytes uncompressed"
    elif case == "empty-zip-folder":
        src.mkdir()
    code, output = run(["data", "convert", "omniglot", str(src), str(out)], capsys)
    assert_refused(code, output, culprit)
    assert not out.exists() or not any(out.rglob("*.parquet"))


# -- a manifest from elsewhere ---------------------------------------------------------------


@pytest.mark.parametrize("edit, culprit", [
    (lambda m: m["preprocessing"].update(image_size=100_000),
     "expected an integer <= 1024, got 100000"),
    (lambda m: m["preprocessing"].update(image_size=0), "expected an integer >= 1, got 0"),
    (lambda m: m["preprocessing"].update(channels=4), "expected 1 or 3, got 4"),
    (lambda m: m["preprocessing"].update(std=[0.0]), "expected positive values"),
    (lambda m: m.update(classes="all"), "classes"),
    (lambda m: m["classes"][0].update(shard="../../etc/passwd"), "shard"),
    ("directory", "a directory, not a JSON file"),
    ("not-json", "not valid JSON"),
])
def test_training_refuses_a_tampered_manifest(edit, culprit, tmp_path, capsys):
    from metadist.data.ingest import convert_imagefolder

    data = convert_imagefolder(image_tree(tmp_path / "src", classes=10), tmp_path / "data",
                               val_fraction=0.2, test_fraction=0.2)
    manifest_path = data / "train" / "manifest.json"
    if edit == "directory":
        manifest_path.unlink()
        manifest_path.mkdir()
    elif edit == "not-json":
        manifest_path.write_text("{not json")
    else:
        manifest = json.loads(manifest_path.read_text())
        edit(manifest)
        manifest_path.write_text(json.dumps(manifest))
    code, output = run(["train", str(ROOT / "configs" / "omniglot_5w1s_maml.yaml"),
                        f"data.dataset={data}", "data.ways=2", "data.queries=1",
                        "tracking.enabled=false", f"train.output_dir={tmp_path / 'runs'}"],
                       capsys)
    assert_refused(code, output, str(manifest_path), culprit)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt"))


def test_a_feature_row_model_on_an_image_dataset_is_refused(tmp_path, capsys):
    from metadist.data.ingest import convert_imagefolder

    data = convert_imagefolder(image_tree(tmp_path / "src", classes=10), tmp_path / "data",
                               val_fraction=0.2, test_fraction=0.2)
    code, output = run(["train", SINUSOID, f"data.dataset={data}", "data.ways=2",
                        "data.shots=1", "data.queries=1", "tracking.enabled=false",
                        f"train.output_dir={tmp_path / 'runs'}"], capsys)
    assert_refused(code, output, "model.name='mlp' takes feature rows",
                   "use model.name=conv4")
    assert not any((tmp_path / "runs").rglob("*.pt"))


def test_a_config_image_size_beyond_the_bound_is_refused(tmp_path, capsys):
    from metadist.data.ingest import convert_imagefolder

    data = convert_imagefolder(image_tree(tmp_path / "src", classes=10), tmp_path / "data",
                               val_fraction=0.2, test_fraction=0.2)
    code, output = run(["train", str(ROOT / "configs" / "omniglot_5w1s_maml.yaml"),
                        f"data.dataset={data}", "data.ways=2", "data.queries=1",
                        "data.image_size=100000", "tracking.enabled=false",
                        f"train.output_dir={tmp_path / 'runs'}"], capsys)
    assert_refused(code, output, "image_size must be an integer in [1, 1024], got 100000")


# -- the Learner API -------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, culprit", [
    ({"steps": 0}, ValueError, "steps=0 must be >= 1"),
    ({"steps": -1}, ValueError, "steps=-1 must be >= 1"),
    ({"lr": float("nan")}, ValueError, "lr=nan must be a finite number > 0"),
    ({"lr": float("inf")}, ValueError, "lr=inf must be a finite number > 0"),
    ({"lr": 0.0}, ValueError, "lr=0.0 must be a finite number > 0"),
    ({"lr": -1.0}, ValueError, "lr=-1.0 must be a finite number > 0"),
])
def test_learner_adapt_refuses(kwargs, error, culprit, checkpoint):
    from metadist import Learner

    learner = Learner.load(checkpoint)
    x = np.linspace(-5, 5, 10)
    with pytest.raises(error, match=culprit.replace("[", r"\[")):
        learner.adapt(x, np.sin(x), **kwargs)


@pytest.mark.parametrize("what", ["missing", "text", "directory"])
def test_learner_load_refuses_what_is_not_a_checkpoint(what, tmp_path):
    from metadist import Learner

    path = tmp_path / "x.pt"
    if what == "text":
        path.write_text("hello")
    elif what == "directory":
        path.mkdir()
    with pytest.raises((ValueError, FileNotFoundError), match=str(path)):
        Learner.load(path)


# -- submit, jobs and cluster without a cluster ---------------------------------------------


@pytest.mark.parametrize("argv, culprit", [
    (["submit", SINUSOID, "--mlflow-uri", f"http://alice:{SECRET}@127.0.0.1:1"],
     "--mlflow-uri http://127.0.0.1:1...: the URI carries credentials"),
    (["submit", SINUSOID, "algorithm.name=mamal", "--address", "http://127.0.0.1:1"],
     "algorithm.name='mamal' is not one of"),
    (["submit", SINUSOID, "--address", "http://127.0.0.1:1", "--env", "NOEQUALS"],
     "--env 'NOEQUALS' is not of the form KEY=VALUE"),
    (["submit", "/nonexistent.yaml", "--address", "http://127.0.0.1:1"], "/nonexistent.yaml"),
    (["submit", SINUSOID, "--address", "http://127.0.0.1:1", "--working-dir", "/nonexistent"],
     "--working-dir /nonexistent: no such directory"),
    (["submit", SINUSOID, "--address", "http://127.0.0.1:1", "--working-dir", "/usr/share"],
     f"config {SINUSOID} is outside /usr/share, the directory shipped"),
    (["jobs", "--address", "http://127.0.0.1:1", "--token-file", "/nonexistent-token",
      "list"], "/nonexistent-token"),
    (["jobs", "--address", "http://127.0.0.1:1", "list"], "http://127.0.0.1:1"),
])
def test_submit_and_jobs_refuse_before_the_network(argv, culprit, tmp_path, capsys,
                                                   monkeypatch):
    monkeypatch.setenv("METADIST_CLUSTER_STATE", str(tmp_path / "none.json"))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "x")
    code, output = run(argv, capsys)
    assert_refused(code, output, culprit)


@pytest.mark.parametrize("state, culprit", [
    (None, "no local cluster recorded in"),
    ("not json", "not a metadist cluster state file"),
    ('{"address": 1}', "not a metadist cluster state file"),
])
def test_cluster_commands_refuse_a_missing_or_corrupt_state(state, culprit, tmp_path, capsys):
    path = tmp_path / "state.json"
    if state is not None:
        path.write_text(state)
    code, output = run(["cluster", "down", "--state", str(path)], capsys)
    assert_refused(code, output, str(path), culprit)


def test_cluster_up_refuses_no_worker_nodes(tmp_path, capsys):
    code, output = run(["cluster", "up", "--local", "--nodes", "0", "--state",
                        str(tmp_path / "s.json")], capsys)
    assert_refused(code, output, "--nodes=0")
