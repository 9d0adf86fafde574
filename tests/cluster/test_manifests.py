"""The cluster deployment: KubeRay manifests (k8s/), the Ray cluster-launcher config and the image (cluster/).

The kustomize base and every overlay are rendered with `kubectl kustomize`; every RayCluster, RayJob
and RayService is validated against the openAPIV3Schema of KubeRay v1.7.0's CRDs
(../shared/data/kuberay-crds) and walked for fields the schema does not know (the API server would
silently prune them: a typo such as `shutdownAfterJobFinish` must fail). Then what no schema knows:
the job entrypoints, presets and overrides exist and validate, the Serve import path imports, GPU
groups ask for GPUs and are big enough for the config, every pod mounts the run volume, ...
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml
from shared_data import CRD_DIR

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
TARGETS = ["base"] + sorted(f"overlays/{p.parent.name}" for p in K8S.glob("overlays/*/kustomization.yaml"))
RAY_KINDS = ("RayCluster", "RayJob", "RayService")
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}
RUN_VOLUME = "/mnt/runs"
GPU = "nvidia.com/gpu"
JOB_SCRIPT = re.compile(r"\bjobs/[\w./-]+\.py\b")

_yaml_loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~1 MB each


# ---------------------------------------------------------------------------------------------
# rendering and schemas


@cache
def render(target: str) -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (needed for `kubectl kustomize`)")
    result = subprocess.run([kubectl, "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize k8s/{target} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def one(docs, kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _openapi_to_jsonschema(node):
    """OpenAPI's `nullable: true` as JSON Schema; the x-kubernetes-* keywords are left for the walker."""
    if isinstance(node, dict):
        node = {k: _openapi_to_jsonschema(v) for k, v in node.items()}
        if node.pop("nullable", False) and isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
        return node
    if isinstance(node, list):
        return [_openapi_to_jsonschema(v) for v in node]
    return node


@cache
def crd_schema(kind: str, version: str) -> dict:
    path = CRD_DIR / CRD_FILES[kind]
    if not path.exists():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR}")
    crd = yaml.load(path.read_text(), Loader=_yaml_loader)
    assert crd["spec"]["names"]["kind"] == kind
    versions = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    assert version in versions, f"{kind} {version} is not served by the CRD (served: {sorted(versions)})"
    return _openapi_to_jsonschema(versions[version]["schema"]["openAPIV3Schema"])


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Paths in `value` that `schema` does not declare: the fields the API server prunes silently."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, dict):
        declared = dict(schema.get("properties", {}))
        for branch in schema.get("allOf", []) + schema.get("anyOf", []) + schema.get("oneOf", []):
            declared.update(branch.get("properties", {}))
        extra = schema.get("additionalProperties")
        found = []
        for key, item in value.items():
            if path == "" and key == "metadata":
                continue  # ObjectMeta: validated by the API server itself, not by the CRD schema
            if key in declared:
                found += unknown_fields(item, declared[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(item, extra, f"{path}.{key}")
            elif extra is not True:
                found.append(f"{path}.{key}")
        return found
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [f for i, item in enumerate(value) for f in unknown_fields(item, schema["items"], f"{path}[{i}]")]
    return []


def schema_problems(doc: dict) -> list[str]:
    group, _, version = doc["apiVersion"].partition("/")
    if group != "ray.io":
        return [f"apiVersion {doc['apiVersion']!r} is not ray.io/<version>"]
    schema = crd_schema(doc["kind"], version)
    validator = jsonschema.Draft4Validator(schema)  # OpenAPI 3.0 schemas follow draft 4's semantics
    problems = [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in validator.iter_errors(doc)]
    problems += [f"{field}: unknown field" for field in unknown_fields(doc, schema)]
    return problems


# ---------------------------------------------------------------------------------------------
# helpers over the rendered resources


def cluster_specs(docs) -> dict[str, dict]:
    """Every Ray cluster spec in a rendering, by where it lives."""
    return {"RayCluster": one(docs, "RayCluster")["spec"],
            "RayJob.rayClusterSpec": one(docs, "RayJob")["spec"]["rayClusterSpec"],
            "RayService.rayClusterConfig": one(docs, "RayService")["spec"]["rayClusterConfig"]}


def pod_specs(spec: dict) -> dict[str, dict]:
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    pods.update({g["groupName"]: g["template"]["spec"] for g in spec.get("workerGroupSpecs", [])})
    return pods


def gpus(group: dict) -> int:
    container = group["template"]["spec"]["containers"][0]
    return int(container.get("resources", {}).get("limits", {}).get(GPU, 0))


def gpu_capacity(spec: dict, bound: str = "maxReplicas") -> int:
    return sum(gpus(g) * g.get(bound, 0) for g in spec.get("workerGroupSpecs", []))


def all_containers(node):
    """Every container and init container anywhere in a document (pod templates, submitter, ...)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from all_containers(value)
    elif isinstance(node, list):
        for value in node:
            yield from all_containers(value)


def strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def parse_job_command(command: str) -> dict:
    """`python jobs/x.py [RUN] --config C --run-dir D k=v ...` → its parts."""
    argv = shlex.split(command)
    assert argv[0] in ("python", "python3"), f"entrypoint should run python: {command!r}"
    parsed = {"script": argv[1], "config": None, "run_dir": None, "overrides": [], "positional": []}
    rest = iter(argv[2:])
    for arg in rest:
        if arg in ("--config", "-c"):
            parsed["config"] = next(rest)
        elif arg == "--run-dir":
            parsed["run_dir"] = next(rest)
        elif arg.startswith("-"):
            continue
        elif "=" in arg:
            parsed["overrides"].append(arg)
        else:
            parsed["positional"].append(arg)
    return parsed


def job_config(docs):
    from selma.config import load_config

    job = parse_job_command(one(docs, "RayJob")["spec"]["entrypoint"])
    return job, load_config(job["config"], job["overrides"])


def serve_config(docs) -> dict:
    return yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])


def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def ray_version() -> str:
    """The Ray release the project pins (ray[...]>=2.60,<2.61 → 2.60.0)."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(r"ray\b", d))
    low = re.search(r">=\s*([\d.]+)", spec) or re.search(r"==\s*([\d.]+)", spec)
    parts = (low.group(1).split(".") + ["0", "0"])[:3]
    return ".".join(parts)


def dockerfile_workdir() -> str:
    return re.search(r"^WORKDIR (\S+)", (REPO / "cluster" / "Dockerfile").read_text(), re.M).group(1)


def check_importable(import_path: str) -> None:
    module_name, _, attr = import_path.partition(":")
    assert attr, f"import_path {import_path!r} is not module:attribute"
    source = REPO.joinpath(*module_name.split("."))
    assert source.with_suffix(".py").is_file() or (source / "__init__.py").is_file(), \
        f"{module_name} is not a module of this repository"
    assert callable(getattr(importlib.import_module(module_name), attr, None)), f"{import_path} is not callable"


# ---------------------------------------------------------------------------------------------
# KubeRay manifests


@pytest.mark.parametrize("target", TARGETS)
def test_renders_the_selma_resources(target):
    docs = render(target)
    for kind in (*RAY_KINDS, "PersistentVolumeClaim", "ConfigMap"):
        one(docs, kind)
    claim = one(docs, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "every pod of every cluster mounts the run volume"
    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    assert len(namespaces) == 1, f"resources spread over namespaces {namespaces}"


@pytest.mark.parametrize("target", TARGETS)
def test_ray_resources_match_the_kuberay_crds(target):
    problems = {f"{d['kind']}/{d['metadata']['name']}": schema_problems(d) for d in render(target) if d["kind"] in RAY_KINDS}
    assert problems and not any(problems.values()), json.dumps(problems, indent=1)


def _rename(key, new):
    def change(doc):
        doc["spec"][new] = doc["spec"].pop(key)
    return change


def _set(path, value):
    def change(doc):
        node = doc
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
    return change


BROKEN = {
    "typo at the top": ("RayJob", _rename("shutdownAfterJobFinishes", "shutdownAfterJobFinish")),
    "typo in a worker group": ("RayCluster", _set(["spec", "workerGroupSpecs", 0, "maxReplica"], 3)),
    "typo in a pod template": ("RayService", _set(["spec", "rayClusterConfig", "headGroupSpec", "template", "spec",
                                                   "containers", 0, "volumeMount"], [])),
    "wrong type": ("RayCluster", _set(["spec", "workerGroupSpecs", 0, "replicas"], "two")),
    "not in the enum": ("RayJob", _set(["spec", "rayClusterSpec", "autoscalerOptions", "upscalingMode"], "Fast")),
    "bad quantity": ("RayCluster", _set(["spec", "headGroupSpec", "template", "spec", "containers", 0, "resources",
                                         "limits", "memory"], "16 GB")),
    "missing required": ("RayService", lambda doc: doc["spec"].pop("rayClusterConfig")),
    "rayStartParams not strings": ("RayCluster", _set(["spec", "headGroupSpec", "rayStartParams", "num-cpus"], 0)),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_schema_check_catches_broken_manifests(case):
    kind, change = BROKEN[case]
    doc = copy.deepcopy(one(render("base"), kind))
    assert schema_problems(doc) == []
    change(doc)
    assert schema_problems(doc), f"{case}: a broken {kind} passed the check"


@pytest.mark.parametrize("target", TARGETS)
def test_job_entrypoints_exist_and_their_configs_validate(target):
    from selma.core.config import preset_names

    docs = render(target)
    named = {m for d in docs for s in strings(d) for m in JOB_SCRIPT.findall(s)}
    assert named, "no manifest runs a jobs/ entrypoint"
    missing = sorted(script for script in named if not (REPO / script).is_file())
    assert not missing, f"manifests name entrypoints that are not in the repository: {missing}"

    job, config = job_config(docs)  # load_config validates the preset and every override
    assert job["script"] == "jobs/pipeline.py"
    assert job["config"] in preset_names() or (REPO / job["config"]).is_file(), f"unknown --config {job['config']!r}"
    assert job["run_dir"] and (job["run_dir"].startswith(f"{RUN_VOLUME}/") or job["run_dir"].startswith("s3://")), \
        f"the run dir must be on the shared volume or S3, got {job['run_dir']!r}"


@pytest.mark.parametrize("target", TARGETS)
def test_rayjob_cleans_up_after_itself(target):
    spec = one(render(target), "RayJob")["spec"]
    assert spec.get("shutdownAfterJobFinishes") is True
    assert isinstance(spec.get("ttlSecondsAfterFinished"), int) and spec["ttlSecondsAfterFinished"] >= 0
    assert "rayClusterSpec" in spec and "clusterSelector" not in spec, "shutdownAfterJobFinishes needs a cluster of its own"
    assert spec.get("submissionMode", "K8sJobMode") in {"K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode"}
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
    assert isinstance(runtime_env, dict), "runtimeEnvYAML must be a mapping"
    if "working_dir" in runtime_env:  # a path in the image: where cluster/Dockerfile puts the repository
        assert runtime_env["working_dir"] == dockerfile_workdir()


@pytest.mark.parametrize("target", TARGETS)
def test_rayservice_serves_the_pipelines_run(target):
    from selma.config import build_config
    from selma.core.config import apply_override, load_raw, parse_override

    docs = render(target)
    service = one(docs, "RayService")["spec"]
    assert service.get("upgradeStrategy", {}).get("type") in UPGRADE_TYPES
    if service["upgradeStrategy"]["type"] == "NewClusterWithIncrementalUpgrade":
        assert service["upgradeStrategy"].get("clusterUpgradeOptions"), "incremental upgrades need clusterUpgradeOptions"

    apps = serve_config(docs)["applications"]
    assert [a["name"] for a in apps] == ["selma"]
    app = apps[0]
    assert app["import_path"] == "selma.serve.run:app_builder"
    check_importable(app["import_path"])

    job, _ = job_config(docs)
    args = dict(app["args"])
    run_dir = args.pop("run_dir")
    assert run_dir == job["run_dir"], "the RayService serves another run than the RayJob writes"
    assert run_dir.startswith(f"{RUN_VOLUME}/"), "selma's Serve app reads a local run directory (the shared volume)"
    waits = [c for c in service["rayClusterConfig"]["headGroupSpec"]["template"]["spec"].get("initContainers", [])
             if c["name"] == "wait-for-run"]
    assert [c["args"] for c in waits] == [[run_dir]], "the head's init container waits for another run"

    # The app's args are overrides on the run's config: the job's preset and overrides.
    data = load_raw(job["config"])
    for text in job["overrides"]:
        apply_override(data, *parse_override(text))
    for key, value in args.items():
        apply_override(data, key.split("."), value)
    serve = build_config(data).serve

    capacity = gpu_capacity(service["rayClusterConfig"])
    replicas = serve.autoscaling.max_replicas if serve.autoscaling else serve.resources.workers
    gpus = serve.resources.gpus
    assert replicas * gpus <= capacity, f"{replicas} replicas × {gpus} GPU > {capacity} GPUs"
    assert (gpus > 0) == (capacity > 0), "serve.resources.gpus and the GPU group disagree"


def test_serve_configs_mirror_cluster_serve_yaml():
    reference = yaml.safe_load((REPO / "cluster" / "serve.yaml").read_text())
    check_importable(reference["applications"][0]["import_path"])
    for target in TARGETS:
        config = serve_config(render(target))
        assert {k: v for k, v in config.items() if k != "applications"} == \
            {k: v for k, v in reference.items() if k != "applications"}, target
        for app, ref in zip(config["applications"], reference["applications"], strict=True):
            assert {k: v for k, v in app.items() if k != "args"} == {k: v for k, v in ref.items() if k != "args"}, target
    # The sd2 overlay is the run cluster/serve.yaml names.
    if "overlays/sd2" in TARGETS:
        assert serve_config(render("overlays/sd2")) == reference


def _requires_a_key(app: dict, where: str) -> str:
    """The variable a Serve app's args name as serve.api_key_env (they must: it listens on 0.0.0.0)."""
    args = app["args"]
    variable = args.get("serve.api_key_env")
    assert variable, f"{where}: the Serve app names no serve.api_key_env"
    assert not args.get("serve.allow_unauthenticated"), f"{where}: serves without authentication"
    return variable


def test_cluster_serve_yaml_requires_an_api_key():
    from selma.serve.app import is_loopback

    reference = yaml.safe_load((REPO / "cluster" / "serve.yaml").read_text())
    assert not is_loopback(reference["http_options"]["host"]), "then no key would be needed"
    _requires_a_key(reference["applications"][0], "cluster/serve.yaml")


@pytest.mark.parametrize("target", TARGETS)
def test_rayservice_requires_an_api_key_from_a_secret(target):
    """serveConfigV2 names serve.api_key_env, and every Ray container of the RayService (the app is
    built in a Ray task, on the head or a worker) gets that variable from a required Secret key."""
    docs = render(target)
    [app] = serve_config(docs)["applications"]
    variable = _requires_a_key(app, f"{target} serveConfigV2")
    for pod, spec in pod_specs(one(docs, "RayService")["spec"]["rayClusterConfig"]).items():
        for container in spec["containers"]:
            where = f"{target}: RayService {pod}/{container['name']}"
            env = {e["name"]: e for e in container.get("env", [])}
            assert variable in env, f"{where} does not get {variable}"
            ref = env[variable].get("valueFrom", {}).get("secretKeyRef")
            assert ref and ref.get("name") and ref.get("key"), f"{where}: {variable} is not read from a Secret"
            assert not ref.get("optional"), f"{where}: an optional Secret lets the pod start without a key"


@pytest.mark.parametrize("target", TARGETS)
def test_cluster_shapes(target):
    docs = render(target)
    volume_claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    config_maps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    for where, spec in cluster_specs(docs).items():
        assert spec.get("rayVersion") == ray_version(), where
        assert spec.get("enableInTreeAutoscaling") is True, where
        head = spec["headGroupSpec"]
        assert head["rayStartParams"].get("num-cpus") == "0", f"{where}: tasks and actors must not land on the head"
        assert GPU not in json.dumps(head), f"{where}: the head asks for a GPU"
        for group in spec.get("workerGroupSpecs", []):
            name = f"{where}/{group['groupName']}"
            assert group.get("minReplicas", 0) <= group.get("replicas", 0) <= group["maxReplicas"], name
            resources = group["template"]["spec"]["containers"][0]["resources"]
            if "gpu" in group["groupName"]:
                assert gpus(group) >= 1, f"{name} does not request {GPU}"
                assert resources["requests"].get(GPU) == resources["limits"][GPU], f"{name}: GPU requests ≠ limits"
                assert group["minReplicas"] < group["maxReplicas"], f"{name} cannot autoscale"
                tolerated = {t.get("key") for t in group["template"]["spec"].get("tolerations", [])}
                assert GPU in tolerated, f"{name} does not tolerate the {GPU} taint"
            else:
                assert gpus(group) == 0, f"{name} requests GPUs but is not a gpu group"
        for pod, pod_spec in pod_specs(spec).items():
            for container in pod_spec["containers"]:
                mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
                assert RUN_VOLUME in mounts, f"{where}/{pod}/{container['name']} does not mount {RUN_VOLUME}"
                volume = next(v for v in pod_spec["volumes"] if v["name"] == mounts[RUN_VOLUME])
                assert volume["persistentVolumeClaim"]["claimName"] in volume_claims, f"{where}/{pod}: unknown claim"
                refs = {e["configMapRef"]["name"] for e in container.get("envFrom", []) if "configMapRef" in e}
                assert refs and refs <= config_maps, f"{where}/{pod}: envFrom names ConfigMaps {refs - config_maps}"


@pytest.mark.parametrize("target", TARGETS)
def test_pipeline_fits_its_gpu_groups(target):
    docs = render(target)
    _, config = job_config(docs)
    spec = one(docs, "RayJob")["spec"]["rayClusterSpec"]
    capacity = gpu_capacity(spec)
    needs = {
        "prompts": config.prompts.resources.total()["GPU"] if config.prompts.backend in ("vllm", "transformers") else 0,
        "images": config.images.resources.total()["GPU"],
        "train (one expert)": config.train.resources.total()["GPU"],
    }
    if config.train.max_concurrent_experts:
        needs["train (all experts at once)"] = config.train.max_concurrent_experts * config.train.resources.total()["GPU"]
    too_big = {stage: n for stage, n in needs.items() if n > capacity}
    assert not too_big, f"stages need more GPUs than the gpu groups hold ({capacity}): {too_big}"
    if capacity == 0:
        return
    # The train stage sizes itself from the GPUs present when it starts (a resumed run may start
    # there on a fresh cluster), so the GPU groups keep at least one expert's worth.
    if config.train.resources.gpus:
        assert gpu_capacity(spec, "minReplicas") >= config.train.resources.total()["GPU"]
        assert config.train.max_concurrent_experts, "without it the autoscaled cluster trains one expert at a time"


@pytest.mark.parametrize("target", TARGETS)
def test_one_image_tagged_with_the_project_version(target):
    images = {c["image"] for d in render(target) for c in all_containers(d)}
    assert len(images) == 1, f"containers use different images: {images}"
    assert images.pop().rpartition(":")[2] == project_version()


def test_secret_example_matches_the_pods():
    secret = yaml.safe_load((K8S / "base" / "secret.example.yaml").read_text())
    assert secret["kind"] == "Secret"
    refs = {e["secretRef"]["name"] for d in render("base") for c in all_containers(d)
            for e in c.get("envFrom", []) if "secretRef" in e}
    assert refs == {secret["metadata"]["name"]}
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    assert "secret.example.yaml" not in kustomization["resources"], "apply -k would overwrite real credentials"


# ---------------------------------------------------------------------------------------------
# cluster/: the cluster-launcher config, the image, the walk-through


def test_cluster_launcher_yaml():
    config = yaml.safe_load((REPO / "cluster" / "cluster.yaml").read_text())
    ray_spec = importlib.util.find_spec("ray")
    schema_path = Path(ray_spec.submodule_search_locations[0]) / "autoscaler" / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema_path.read_text()))

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "tasks and actors must not land on the head"
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types and all(t["max_workers"] >= 1 for t in gpu_types.values())
    assert sum(t.get("max_workers", 0) for name, t in types.items() if name != config["head_node_type"]) \
        <= config["max_workers"]
    assert config["docker"]["image"].rpartition(":")[2] == project_version()


def test_dockerfile():
    text = (REPO / "cluster" / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    base = re.search(r"^FROM (\S+)", text, re.M).group(1).replace("${RAY_VERSION}", args["RAY_VERSION"])
    assert base == f"rayproject/ray:{ray_version()}-py311-gpu"
    installs = [m.start() for m in re.finditer(r"pip install", text)]
    torch_first = text.index('pip install "torch==${TORCH_VERSION}"')
    project = text.index('".[vllm,deepspeed,eval]"')
    assert installs[0] == torch_first < project, "torch must be installed, pinned, before the project"
    workdir = dockerfile_workdir()
    assert re.search(r"^COPY .*\bjobs/ jobs/", text, re.M), "jobs/ must land in the working directory"
    assert workdir.startswith("/home/ray/"), "the image's ray user must own the working directory"


@pytest.mark.parametrize("doc", ["cluster/README.md", "k8s/README.md"])
def test_walkthroughs_name_existing_entrypoints_and_presets(doc):
    from selma.core.config import preset_names

    path = REPO / doc
    if not path.exists():
        pytest.skip(f"{doc} does not exist")
    text = path.read_text()
    missing = sorted({s for s in JOB_SCRIPT.findall(text) if not (REPO / s).is_file()})
    assert not missing, f"{doc} names entrypoints that are not in the repository: {missing}"
    presets = set(re.findall(r"--config[ =]([\w-]+)(?![\w./-])", text))
    assert presets <= set(preset_names()), f"{doc} names unknown presets {presets - set(preset_names())}"
    for directory in re.findall(r"kubectl (?:(?:apply|delete) -k|kustomize) (k8s/\S+)", text):
        assert (REPO / directory / "kustomization.yaml").is_file(), f"{doc}: no kustomization in {directory}"
