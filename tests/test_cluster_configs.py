"""The cluster definitions in cluster/ agree with each other, with pyproject.toml, with the
configs they run and with Ray's own schema: the KubeRay manifests, the AWS cluster-launcher
config and the Dockerfile. No cluster is needed; these read the files.

Each check is a function returning the problems it finds (empty: none), so the tests can
also show that a check flags a manifest broken on purpose.
"""

from __future__ import annotations

import copy
import fnmatch
import re
import shlex
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from metadist.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER = CLUSTER / "launcher" / "aws.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

SHARED = "/mnt/shared"  # the shared volume's mount path in every pod and on every node
AUTH_SECRET = {"name": "metadist-ray-auth", "key": "auth_token"}
GPU = "nvidia.com/gpu"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# --- reading the files -------------------------------------------------------------------


def load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kuberay_documents() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in sorted(KUBERAY.glob("*.yaml")) for doc in load_documents(path)]


def the_document(kind: str) -> dict:
    found = [doc for _, doc in kuberay_documents() if doc.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in {KUBERAY}, found {len(found)}"
    return found[0]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")
    ))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_base_image(text: str) -> str:
    instructions = dockerfile_instructions(text)
    args = dict(
        rest.split("=", 1) for word, rest in instructions if word == "ARG" and "=" in rest
    )
    image = next(rest for word, rest in instructions if word == "FROM").split()[0]
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], image)


def ray_image_tag(image: str) -> tuple[str, str]:
    """``rayproject/ray:2.60.0-py311-gpu`` -> ("2.60.0", "311")."""
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d+)-(cpu|gpu|cu\d+)", image)
    assert match, f"{image!r} is not an official rayproject/ray:<version>-py<XY>-<platform> tag"
    return match.group(1), match.group(2)


def pyproject_pins() -> dict[str, str]:
    """``{"torch": "2.14.1", ...}`` for the dependencies pinned with ==."""
    pins = {}
    for dep in PYPROJECT["project"]["dependencies"]:
        name, sep, version = dep.partition("==")
        if sep:
            pins[name.strip()] = version.strip()
    return pins


def pyproject_specifier(package: str) -> SpecifierSet:
    for dep in PYPROJECT["project"]["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?(.*)", dep.replace(" ", ""))
        if match and match.group(1) == package:
            return SpecifierSet(match.group(3))
    raise KeyError(package)


# --- Kubernetes helpers --------------------------------------------------------------------

_SUFFIXES = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value) -> float:
    """A Kubernetes resource quantity as a number: "500m" -> 0.5, "16Gi" -> 17179869184."""
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    if not match or (match.group(2) and match.group(2) not in _SUFFIXES):
        raise ValueError(f"not a resource quantity: {value!r}")
    return float(match.group(1)) * _SUFFIXES.get(match.group(2), 1)


def env_of(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


def ray_containers(spec: dict) -> list[tuple[str, dict]]:
    """(where, container) for the Ray container of the head and of every worker group."""
    out = [("head", spec["headGroupSpec"]["template"]["spec"]["containers"][0])]
    for group in spec.get("workerGroupSpecs", []):
        out.append((f"worker group {group.get('groupName')!r}",
                    group["template"]["spec"]["containers"][0]))
    return out


def auth_problems(where: str, container: dict) -> list[str]:
    env = env_of(container)
    problems = []
    if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
        problems.append(f"{where}: RAY_AUTH_MODE is not 'token'")
    ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
    if ref != AUTH_SECRET:
        problems.append(f"{where}: RAY_AUTH_TOKEN does not come from secret {AUTH_SECRET}")
    return problems


def resource_problems(where: str, container: dict) -> list[str]:
    """requests == limits for every resource (Guaranteed QoS; Ray sizes itself from the
    limits, so a request below them would promise the scheduler less than Ray uses)."""
    res = container.get("resources", {})
    requests, limits = res.get("requests", {}), res.get("limits", {})
    if not limits:
        return [f"{where}: no resource limits"]
    problems = []
    for name in sorted(set(requests) | set(limits)):
        if name not in requests or name not in limits:
            problems.append(f"{where}: {name} is in only one of requests and limits")
        elif quantity(requests[name]) != quantity(limits[name]):
            problems.append(f"{where}: {name} request {requests[name]} != limit {limits[name]}")
    return problems


def shared_volume_problems(where: str, pod_spec: dict, container: dict) -> list[str]:
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in pod_spec.get("volumes", []) if "persistentVolumeClaim" in v}
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    if claims.get(mounts.get(SHARED)) != shared_claim_name():
        return [f"{where}: {SHARED} is not the {shared_claim_name()!r} claim"]
    return []


def shared_claim_name() -> str:
    claim = the_document("PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"], "pods on many nodes mount it"
    return claim["metadata"]["name"]


def mlflow_uri() -> str:
    service = the_document("Service")
    return f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"


# --- the checks ----------------------------------------------------------------------------


def cluster_spec_problems(spec: dict) -> list[str]:
    """A RayClusterSpec (raycluster.yaml, or a RayJob's rayClusterSpec)."""
    problems = []
    if spec.get("rayVersion") != dockerfile_ray_version():
        problems.append(f"rayVersion {spec.get('rayVersion')} is not the image's Ray "
                        f"{dockerfile_ray_version()}")
    head = spec["headGroupSpec"]
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        problems.append(f"head serviceType {head['serviceType']}: reach it by port-forward")
    params = head.get("rayStartParams", {})
    if params.get("dashboard-host") in LOOPBACK or "dashboard-host" not in params:
        problems.append("head dashboard-host must be set to bind the pod IP (the head "
                        "Service, the workers and the job submitter connect there)")
    if not spec.get("workerGroupSpecs"):
        problems.append("no worker groups")

    for where, container in ray_containers(spec):
        problems += resource_problems(where, container)
        problems += auth_problems(where, container)
        if not container.get("image"):
            problems.append(f"{where}: no image")
        if env_of(container).get("MLFLOW_TRACKING_URI", {}).get("value") != mlflow_uri():
            problems.append(f"{where}: MLFLOW_TRACKING_URI is not {mlflow_uri()}")

    head_pod = head["template"]["spec"]
    head_container = head_pod["containers"][0]
    problems += shared_volume_problems("head", head_pod, head_container)
    head_limits = head_container.get("resources", {}).get("limits", {})
    if GPU in head_limits or quantity(params.get("num-gpus", 0)) != 0:
        problems.append("head asks for a GPU: training belongs on the workers")
    if "num-cpus" in params and quantity(params["num-cpus"]) > quantity(head_limits["cpu"]):
        problems.append(f"head num-cpus {params['num-cpus']} > its CPU limit")

    for group in spec.get("workerGroupSpecs", []):
        where = f"worker group {group.get('groupName')!r}"
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        problems += shared_volume_problems(where, pod, container)
        if not 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]:
            problems.append(f"{where}: needs 0 <= minReplicas <= replicas <= maxReplicas")
        limits = container.get("resources", {}).get("limits", {})
        start = group.get("rayStartParams", {})
        for param, resource in (("num-gpus", GPU), ("num-cpus", "cpu")):
            if param in start and quantity(start[param]) != quantity(limits.get(resource, 0)):
                problems.append(f"{where}: {param}={start[param]} but the {resource} limit "
                                f"is {limits.get(resource, 0)}")

    if spec.get("enableInTreeAutoscaling"):
        options = spec.get("autoscalerOptions", {})
        problems += auth_problems("autoscaler", options)
        problems += resource_problems("autoscaler", options)
    return problems


def capacity(spec: dict) -> tuple[int, float]:
    """(GPUs the cluster can have, CPUs of its smallest GPU pod)."""
    gpus, pod_cpus = 0, float("inf")
    for group in spec.get("workerGroupSpecs", []):
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        if quantity(limits.get(GPU, 0)) > 0:
            autoscaled = spec.get("enableInTreeAutoscaling")
            pods = group["maxReplicas"] if autoscaled else group["replicas"]
            gpus += int(pods * quantity(limits[GPU]))
            pod_cpus = min(pod_cpus, quantity(limits["cpu"]))
    return gpus, pod_cpus


def entrypoint_problems(entrypoint: str, spec: dict) -> list[str]:
    """``metadist train|tune CONFIG key=value ...`` that loads and fits the cluster."""
    words = shlex.split(entrypoint)
    if words[:1] != ["metadist"] or words[1:2] not in (["train"], ["tune"]) or len(words) < 3:
        return [f"entrypoint {entrypoint!r} is not `metadist train|tune CONFIG ...`"]
    # Jobs run in the image's working directory, which holds a copy of the repository's
    # configs/; see test_dockerfile_copies_configs_into_the_jobs_working_directory.
    config = ROOT / words[2]
    if PurePosixPath(words[2]).parts[:1] != ("configs",) or not config.is_file():
        return [f"entrypoint config {words[2]!r} is not a file in configs/"]
    try:
        cfg = load_config(config, words[3:])
    except ConfigError as err:
        return [f"entrypoint overrides do not load: {err}"]

    problems = []
    gpus, pod_cpus = capacity(spec)
    if cfg.ray.use_gpu:
        if cfg.workers > gpus:
            problems.append(f"workers={cfg.workers} with ray.use_gpu=true but the cluster "
                            f"has at most {gpus} GPUs")
        per_worker = cfg.ray.cpus_per_worker + cfg.ray.actors * cfg.ray.actor_cpus
        if per_worker > pod_cpus:
            problems.append(f"a worker and its episode actors need {per_worker} CPUs, a GPU "
                            f"pod has {pod_cpus}")
    # Every pod reads the data and writes checkpoints: those paths must be shared.
    storage = cfg.ray.storage_path or f"{cfg.train.output_dir}/ray"  # ray_train's default
    paths = {"train.output_dir": cfg.train.output_dir, "ray.storage_path": storage}
    if cfg.data.dataset != "sinusoid":
        paths["data.dataset"] = cfg.data.dataset
    for key, value in paths.items():
        value = str(value)
        object_store = re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", value) and not value.startswith(
            "file://")  # s3://, gs://: every node reaches those too
        if not (value.startswith(SHARED + "/") or object_store):
            problems.append(f"{key}={value} is not on the shared volume {SHARED}")
    return problems


def service_problems(documents: list[dict]) -> list[str]:
    """Nothing is exposed beyond the Kubernetes cluster: port-forward reaches it."""
    problems = []
    for doc in documents:
        kind, name = doc.get("kind"), doc.get("metadata", {}).get("name")
        if kind == "Service" and doc["spec"].get("type", "ClusterIP") != "ClusterIP":
            problems.append(f"Service {name} is {doc['spec']['type']}, not ClusterIP")
        if kind in ("Ingress", "Gateway", "HTTPRoute"):
            problems.append(f"{kind} {name} exposes the cluster")
    return problems


def launcher_problems(config: dict) -> list[str]:
    problems = []
    head_start = " ".join(config["head_start_ray_commands"])
    words = shlex.split(head_start.replace(";", " ; "))
    if "--head" not in words:
        problems.append("head_start_ray_commands do not `ray start --head`")
    hosts = [w.split("=", 1)[1] for w in words if w.startswith("--dashboard-host=")]
    hosts += [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--dashboard-host"]
    if hosts != ["127.0.0.1"]:
        problems.append(f"the dashboard binds {hosts or 'the default'}, not 127.0.0.1 "
                        "(reach it with `ray dashboard`, an SSH tunnel)")
    docker = config.get("docker", {})
    if "--env RAY_AUTH_MODE=token" not in docker.get("run_options", []):
        problems.append("docker.run_options do not set RAY_AUTH_MODE=token")
    if config.get("file_mounts", {}).get("~/.ray/auth_token") != "~/.ray/auth_token":
        problems.append("the token ~/.ray/auth_token is not copied to the nodes")
    if ray_image_tag(docker.get("image", ""))[0] != dockerfile_ray_version():
        problems.append(f"docker.image {docker.get('image')} is not Ray "
                        f"{dockerfile_ray_version()}")

    types = config["available_node_types"]
    if types[config["head_node_type"]]["resources"].get("GPU", 0):
        problems.append("the head node type has GPUs")
    if not any(t["resources"].get("GPU", 0) >= 1 for t in types.values()):
        problems.append("no node type has a GPU")
    for remote, local in config["file_mounts"].items():
        if not local.startswith("~") and not (ROOT / local).exists():
            problems.append(f"file_mounts {remote}: {local} does not exist")
    source = config["file_mounts"].get("~/metadist")
    if source is None or not (ROOT / source / "pyproject.toml").is_file():
        problems.append("~/metadist is not mounted from the repository root")
    if not any("pip install" in c and "~/metadist" in c for c in config["setup_commands"]):
        problems.append("setup_commands do not pip install ~/metadist")
    return problems


DOCKERIGNORE = CLUSTER / "Dockerfile.dockerignore"  # BuildKit's, for cluster/Dockerfile only


def dockerfile_problems(text: str, ignore_text: str | None = None) -> list[str]:
    problems = []
    instructions = dockerfile_instructions(text)
    version, python = ray_image_tag(dockerfile_base_image(text))
    if Version(version) not in pyproject_specifier("ray"):
        problems.append(f"base image Ray {version} is outside pyproject's "
                        f"{pyproject_specifier('ray')}")
    python_version = f"{python[0]}.{python[1:]}"
    if python_version not in SpecifierSet(PYPROJECT["project"]["requires-python"]):
        problems.append(f"base image Python {python_version} is not the required "
                        f"{PYPROJECT['project']['requires-python']}")
    users = [rest for word, rest in instructions if word == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("the image runs as root")

    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    for package in ("torch", "torchvision"):
        pinned = re.findall(rf"\b{package}==([\w.+]+)", runs)
        if pinned != [pyproject_pins()[package]]:
            problems.append(f"{package} pinned {pinned}, pyproject.toml pins "
                            f"{pyproject_pins()[package]}")
    if not re.search(r"pip install [^&]*\.(\s|$)", runs):
        problems.append("the project itself is not pip-installed (pip install ... .)")
    if "metadist --help" not in runs or "metadist" not in PYPROJECT["project"]["scripts"]:
        problems.append("the build does not check that the `metadist` command works")

    ignore_text = DOCKERIGNORE.read_text() if ignore_text is None else ignore_text
    ignored = [line.strip() for line in ignore_text.splitlines()
               if line.strip() and not line.startswith("#")]
    for word, rest in instructions:
        if word != "COPY":
            continue
        sources = [s for s in rest.split() if not s.startswith("--")][:-1]
        for source in sources:
            if not (ROOT / source).exists():
                problems.append(f"COPY {source}: no such path in the repository")
            if "*" in ignored and f"!{source}" not in ignored and f"!{source}/" not in ignored:
                problems.append(f"COPY {source}: excluded by the .dockerignore")
    return problems


def dockerfile_ray_version() -> str:
    return ray_image_tag(dockerfile_base_image(DOCKERFILE.read_text()))[0]


# --- the shipped files pass ----------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_file_parses(path):
    documents = load_documents(path)
    assert documents and all(isinstance(doc, dict) for doc in documents)


def test_kuberay_manifests_have_their_kinds():
    kinds = sorted((doc["apiVersion"], doc["kind"]) for _, doc in kuberay_documents())
    assert kinds == [
        ("apps/v1", "Deployment"), ("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"),
        ("v1", "PersistentVolumeClaim"), ("v1", "Service"),
    ]


def test_raycluster_is_consistent():
    assert cluster_spec_problems(the_document("RayCluster")["spec"]) == []


def test_rayjob_cluster_is_consistent_and_shuts_down():
    spec = the_document("RayJob")["spec"]
    assert cluster_spec_problems(spec["rayClusterSpec"]) == []
    assert spec["shutdownAfterJobFinishes"] is True


def test_rayjob_entrypoint_loads_and_fits_its_cluster():
    spec = the_document("RayJob")["spec"]
    assert entrypoint_problems(spec["entrypoint"], spec["rayClusterSpec"]) == []


def test_rayjob_submitter_has_the_token():
    spec = the_document("RayJob")["spec"]
    submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
    assert auth_problems("submitter", submitter) + resource_problems("submitter", submitter) == []


def values_of(key: str, tree) -> list:
    """Every value of ``key`` anywhere in nested dicts and lists."""
    if isinstance(tree, dict):
        return [v for k, v in tree.items() if k == key] + [
            found for v in tree.values() for found in values_of(key, v)]
    if isinstance(tree, list):
        return [found for v in tree for found in values_of(key, v)]
    return []


def test_every_container_runs_this_projects_image():
    # One image everywhere (the cluster and the submitter run one Ray), tagged with the
    # project's version; its registry prefix is the team's (see cluster/README.md).
    images = {image for _, doc in kuberay_documents() for image in values_of("image", doc)}
    assert len(images) == 1, images
    name, _, tag = images.pop().rpartition(":")
    assert name.rpartition("/")[2] == "metadist" and tag == PYPROJECT["project"]["version"]


def test_mlflow_server_stays_in_the_cluster_and_on_the_shared_volume():
    deployment = the_document("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    command = " ".join(container["args"])
    assert f"sqlite:///{SHARED}/mlflow/" in command and f"{SHARED}/mlflow/artifacts" in command
    assert "--workers 1" in command and deployment["spec"]["replicas"] == 1  # one SQLite writer
    assert resource_problems("mlflow", container) + shared_volume_problems(
        "mlflow", pod, container) == []
    # The Ray pods' MLFLOW_TRACKING_URI names the service; MLflow's Host check must accept
    # that name, or every request from the pods is refused (403), and the port-forward's.
    words = shlex.split(command)
    allowed = words[words.index("--allowed-hosts") + 1].split(",")
    assert host_allowed(allowed, mlflow_uri().removeprefix("http://"))
    assert host_allowed(allowed, "mlflow.metadist.svc.cluster.local:5000")
    assert host_allowed(allowed, "127.0.0.1:5000")
    assert not host_allowed(allowed, "attacker.example:5000")


def host_allowed(allowed: list[str], host: str) -> bool:
    """MLflow's rule (mlflow.server.security_utils.is_allowed_host_header, which takes 2 s
    to import with the server): a pattern with * is an fnmatch pattern, else exact."""
    return any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed)


def test_no_service_is_exposed_beyond_the_cluster():
    assert service_problems([doc for _, doc in kuberay_documents()]) == []


def test_launcher_config_passes_rays_own_validation():
    # What `ray up` does before it starts anything: fill in the provider's defaults and
    # validate against ray/autoscaler/ray-schema.json plus the cross-field checks.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load_documents(LAUNCHER)[0]))


def test_launcher_config_is_consistent():
    assert launcher_problems(load_documents(LAUNCHER)[0]) == []


def test_dockerfile_matches_pyproject():
    assert dockerfile_problems(DOCKERFILE.read_text()) == []


def test_dockerfile_copies_configs_into_the_jobs_working_directory():
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    workdir = [rest for word, rest in instructions if word == "WORKDIR"][-1]
    copies = [rest.split() for word, rest in instructions if word == "COPY"]
    assert any(c[-2:] == ["configs", "./configs"] for c in copies), "RayJob runs configs/..."
    assert workdir == "/home/ray/metadist"


# --- the checks catch what they are for -----------------------------------------------------


def _worker(spec):
    return spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


BROKEN_CLUSTERS = {
    "gpu only in limits": (lambda s: _worker(s)["resources"]["requests"].pop(GPU), GPU),
    "cpu request below limit": (
        lambda s: _worker(s)["resources"]["requests"].update(cpu="2"), "cpu request 2"),
    "num-gpus disagrees with the limit": (
        lambda s: s["workerGroupSpecs"][0]["rayStartParams"].update({"num-gpus": "2"}),
        "num-gpus=2"),
    "num-cpus disagrees with the limit": (
        lambda s: s["workerGroupSpecs"][0]["rayStartParams"].update({"num-cpus": "8"}),
        "num-cpus=8"),
    "worker without the token": (
        lambda s: _worker(s).update(env=[e for e in _worker(s)["env"]
                                         if e["name"] != "RAY_AUTH_TOKEN"]), "RAY_AUTH_TOKEN"),
    "dashboard on loopback": (
        lambda s: s["headGroupSpec"]["rayStartParams"].update({"dashboard-host": "127.0.0.1"}),
        "dashboard-host"),
    "head service exposed": (
        lambda s: s["headGroupSpec"].update(serviceType="LoadBalancer"), "LoadBalancer"),
    "shared volume missing on a worker": (
        lambda s: _worker(s).update(volumeMounts=[]), "/mnt/shared"),
    "replicas above maxReplicas": (
        lambda s: s["workerGroupSpecs"][0].update(replicas=9), "maxReplicas"),
    "another Ray version": (lambda s: s.update(rayVersion="2.50.0"), "rayVersion 2.50.0"),
}


@pytest.mark.parametrize("name", sorted(BROKEN_CLUSTERS))
def test_cluster_check_flags(name):
    spec = copy.deepcopy(the_document("RayJob")["spec"]["rayClusterSpec"])
    breaker, message = BROKEN_CLUSTERS[name]
    breaker(spec)
    assert any(message in problem for problem in cluster_spec_problems(spec))


def test_autoscaler_without_the_token_is_flagged():
    spec = copy.deepcopy(the_document("RayCluster")["spec"])
    spec["autoscalerOptions"]["env"] = []
    assert any(p.startswith("autoscaler: RAY_AUTH") for p in cluster_spec_problems(spec))


@pytest.mark.parametrize(
    "change, message",
    [
        (("workers=2", "workers=3"), "at most 2 GPUs"),
        (("ray.cpus_per_worker=4", "ray.cpus_per_worker=6"), "6.5 CPUs"),
        (("data.dataset=/mnt/shared/data/omniglot", "data.dataset=data/omniglot"),
         "data.dataset=data/omniglot is not on the shared volume"),
        (("data.dataset=/mnt/shared/data/omniglot", "data.dataset=file:///data/omniglot"),
         "data.dataset=file:///data/omniglot is not on the shared volume"),
        (("ray.storage_path=/mnt/shared/ray", "ray.storage_path=/tmp/ray"),
         "ray.storage_path=/tmp/ray is not on the shared volume"),
        (("ray.use_gpu=true", "ray.use_gpus=true"), "use_gpus"),
        (("omniglot_5w1s_maml.yaml", "omniglot_5w1s_mamI.yaml"), "not a file in configs/"),
        (("metadist train", "python -m metadist train"), "is not `metadist"),
    ],
)
def test_entrypoint_check_flags(change, message):
    spec = the_document("RayJob")["spec"]
    entrypoint = spec["entrypoint"].replace(*change)
    assert entrypoint != spec["entrypoint"]
    assert any(message in p for p in entrypoint_problems(entrypoint, spec["rayClusterSpec"]))


def test_exposed_service_is_flagged():
    service = copy.deepcopy(the_document("Service"))
    service["spec"]["type"] = "NodePort"
    assert service_problems([service]) == ["Service mlflow is NodePort, not ClusterIP"]


@pytest.mark.parametrize(
    "change, message",
    [
        ("--dashboard-host=127.0.0.1", "binds ['0.0.0.0']"),
        ("--env RAY_AUTH_MODE=token", "RAY_AUTH_MODE=token"),
        ("rayproject/ray:2.60.0-py311-gpu", "is not Ray"),
    ],
)
def test_launcher_check_flags(change, message):
    text = LAUNCHER.read_text()
    replacement = {"--dashboard-host=127.0.0.1": "--dashboard-host=0.0.0.0",
                   "--env RAY_AUTH_MODE=token": "--env RAY_AUTH_MODE=disabled",
                   "rayproject/ray:2.60.0-py311-gpu": "rayproject/ray:2.59.0-py311-gpu"}[change]
    assert change in text
    config = yaml.safe_load(text.replace(change, replacement))
    assert any(message in p for p in launcher_problems(config))


@pytest.mark.parametrize(
    "change, message",
    [
        ("torch==2.14.1", "torch pinned ['2.14.0']"),
        ("USER ray", "runs as root"),
        ("COPY --chown=ray:users configs ./configs", "COPY conf: no such path"),
        ("rayproject/ray:2.60.0-py311-gpu", "Python 3.12"),
    ],
)
def test_dockerfile_check_flags(change, message):
    text = DOCKERFILE.read_text()
    replacement = {"torch==2.14.1": "torch==2.14.0",
                   "USER ray": "USER root",
                   "COPY --chown=ray:users configs ./configs":
                       "COPY --chown=ray:users conf ./configs",
                   "rayproject/ray:2.60.0-py311-gpu": "rayproject/ray:2.60.0-py312-gpu"}[change]
    assert change in text
    assert any(message in p for p in dockerfile_problems(text.replace(change, replacement)))


def test_dockerignore_that_drops_a_copied_path_is_flagged():
    ignore_text = DOCKERIGNORE.read_text()
    assert "!configs/" in ignore_text
    problems = dockerfile_problems(DOCKERFILE.read_text(), ignore_text.replace("!configs/", ""))
    assert problems == ["COPY configs: excluded by the .dockerignore"]


def test_quantities():
    assert quantity("500m") == 0.5 and quantity("6") == 6 and quantity(1) == 1
    assert quantity("24Gi") == 24 * 2**30 and quantity("1k") == 1000
    with pytest.raises(ValueError, match="'2 GB'"):
        quantity("2 GB")
