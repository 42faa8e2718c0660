"""Offline checks of k8s/ and the Dockerfile: schemas, cross-file consistency, security.

Core objects are validated with kubernetes-validate (strict); ray.io/v1 objects with jsonschema
against the openAPIV3Schema of KubeRay's CRDs (v1.7.0, in ../shared/kuberay-crds/), made strict
the same way, because kubernetes-validate silently passes custom resources.
"""
import copy
import importlib
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = ROOT / "k8s"
CRD_DIR = ROOT.parent / "shared" / "kuberay-crds"
DOCKERFILE = ROOT / "Dockerfile"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests are meant for
# The CRDs are 40,000 lines: libyaml reads them in a second, the pure-Python loader in ten.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

CORE_KINDS = {"Namespace", "ServiceAccount", "PersistentVolumeClaim", "ConfigMap"}
RAY_KINDS = {"RayCluster", "RayJob"}
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
RBAC_KINDS = {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
# The module each RayJob's entrypoint runs.
JOB_MODULES = {"moco-convert-train": "data_prep.convert", "moco-convert-val": "data_prep.convert",
               "moco-pretrain": "moco_ray.train", "moco-sweep": "tune.sweep", "moco-lincls": "moco_ray.lincls"}
PRETRAIN_JOB, SWEEP_JOB, LINCLS_JOB = "moco-pretrain", "moco-sweep", "moco-lincls"
GPU = "nvidia.com/gpu"


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------

def load_documents():
    """(file name, object) for every non-empty YAML document of k8s/*.yaml, in apply order."""
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


@pytest.fixture(scope="module")
def docs():
    return load_documents()


@pytest.fixture(scope="module")
def objects(docs):
    return [doc for _, doc in docs]


def of_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def one(objects, kind):
    found = of_kind(objects, kind)
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


def rayjob(objects, name):
    return next(o for o in of_kind(objects, "RayJob") if o["metadata"]["name"] == name)


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pyproject_pins():
    """name -> (extras, version) of every `==` dependency in pyproject.toml."""
    pins = {}
    for dep in pyproject()["project"]["dependencies"]:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(?:\[([^\]]*)\])?==([^\s;]+)", dep.strip())
        if m:
            pins[m[1].lower()] = (m[2] or "", m[3])
    return pins


def dockerfile_lines():
    """Instructions of the Dockerfile, continuation lines joined, comments dropped."""
    text = DOCKERFILE.read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    return [ln.strip() for ln in "\n".join(lines).replace("\\\n", " ").splitlines() if ln.strip()]


def dockerfile_pins():
    pins = {}
    for line in dockerfile_lines():
        if line.startswith("RUN") and "pip install" in line:
            for m in re.finditer(r"([A-Za-z0-9_.\-]+)(?:\[([^\]]*)\])?==([^\s\"']+)", line):
                pins[m[1].lower()] = (m[2] or "", m[3])
    return pins


def dockerfile_image():
    """The image name and tag that the Dockerfile's header says to build."""
    m = re.search(r"docker build -t (\S+) \.", DOCKERFILE.read_text())
    assert m, "the Dockerfile should document its image: `docker build -t IMAGE:TAG .`"
    return m[1]


def dockerfile_user():
    users = [ln.split()[1] for ln in dockerfile_lines() if ln.startswith("USER ")]
    assert users, "the Dockerfile should end as a non-root USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and gid.isdigit(), "USER should be numeric uid:gid, so runAsNonRoot can verify it"
    return int(uid), int(gid)


def flags(entrypoint):
    """--flag value pairs of a CLI command line; repeated flags (--set) collect a list."""
    argv = shlex.split(entrypoint)
    out, i = {}, 3  # after `python -m module`
    while i < len(argv):
        key = argv[i]
        assert key.startswith("--"), f"unexpected positional argument {key!r} in {entrypoint!r}"
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value, i = argv[i + 1], i + 2
        else:
            value, i = True, i + 1
        if key == "--set":
            out.setdefault(key, []).append(value)
        else:
            out[key] = value
    return out


def settings(entrypoint):
    """The --set key=value overrides of an entrypoint, as a dict."""
    return dict(item.split("=", 1) for item in flags(entrypoint).get("--set", []))


def quantity(value):
    """A Kubernetes resource quantity as a number ("500m" -> 0.5, "2Gi" -> 2**31)."""
    suffixes = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
                "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([A-Za-z]*)", str(value))
    assert m and m[2] in suffixes, f"not a quantity: {value!r}"
    return float(m[1]) * suffixes[m[2]]


# ------------------------------------------------------------------------------------------------
# Walking the Ray objects
# ------------------------------------------------------------------------------------------------

def ray_cluster_specs(objects):
    """(where, RayClusterSpec) of the RayCluster and of every RayJob that brings its own cluster."""
    specs = [(f"RayCluster/{o['metadata']['name']}", o["spec"]) for o in of_kind(objects, "RayCluster")]
    for job in of_kind(objects, "RayJob"):
        if "rayClusterSpec" in job["spec"]:
            specs.append((f"RayJob/{job['metadata']['name']}", job["spec"]["rayClusterSpec"]))
    return specs


def ray_groups(objects):
    """(where, group spec, 'head' | 'worker', cluster spec) of every head and worker group."""
    for where, spec in ray_cluster_specs(objects):
        yield f"{where} head", spec["headGroupSpec"], "head", spec
        for group in spec.get("workerGroupSpecs", []):
            yield f"{where} group {group['groupName']}", group, "worker", spec


def pod_templates(objects):
    """(where, PodTemplateSpec, role) of every pod the manifests define."""
    for where, group, role, _ in ray_groups(objects):
        yield where, group["template"], role
    for job in of_kind(objects, "RayJob"):
        if "submitterPodTemplate" in job["spec"]:
            yield f"RayJob/{job['metadata']['name']} submitter", job["spec"]["submitterPodTemplate"], "submitter"


def containers(objects):
    """(where, container, pod spec) of every container and init container, plus the autoscaler
    sidecar that KubeRay builds from autoscalerOptions into an autoscaling head pod."""
    for where, template, _ in pod_templates(objects):
        pod = template["spec"]
        for c in pod.get("initContainers", []) + pod["containers"]:
            yield f"{where} {c['name']}", c, pod
    for where, spec in ray_cluster_specs(objects):
        if spec.get("enableInTreeAutoscaling"):
            options = spec.get("autoscalerOptions", {})
            sidecar = {"name": "autoscaler", **options}
            yield f"{where} autoscaler", sidecar, spec["headGroupSpec"]["template"]["spec"]


def gpu_group(objects):
    groups = [(g, spec) for _, g, role, spec in ray_groups(objects)
              if role == "worker" and GPU in g["template"]["spec"]["containers"][0]["resources"].get("limits", {})]
    assert len(groups) == 1, "expected exactly one GPU worker group"
    return groups[0]


def gpus_per_pod(group):
    return int(quantity(group["template"]["spec"]["containers"][0]["resources"]["limits"][GPU]))


def volume_of_mount(pod, mount):
    return next(v for v in pod.get("volumes", []) if v["name"] == mount["name"])


# ------------------------------------------------------------------------------------------------
# Parsing and schemas
# ------------------------------------------------------------------------------------------------

def test_every_document_parses(docs):
    files = sorted(p.name for p in K8S_DIR.glob("*.yaml"))
    assert files, "no manifests in k8s/"
    assert {name for name, _ in docs} == set(files), "a manifest file holds no object"
    seen = set()
    for name, doc in docs:
        assert isinstance(doc, dict), f"{name}: a document is not a mapping"
        for key in ("apiVersion", "kind", "metadata"):
            assert key in doc, f"{name}: {key} missing"
        ident = (doc["kind"], doc["metadata"].get("name"))
        assert ident[1], f"{name}: {doc['kind']} without a name"
        assert ident not in seen, f"{name}: {ident} defined twice"
        seen.add(ident)


def test_only_known_kinds_so_nothing_goes_unvalidated(objects):
    kinds = {o["kind"] for o in objects}
    assert not kinds & RBAC_KINDS, "the Ray pods' ServiceAccount gets no extra rights"
    known = CORE_KINDS | RAY_KINDS | {"PodMonitor"}
    assert kinds <= known, f"no validation for {kinds - known}"


def test_namespace_first_and_everything_in_it(docs):
    namespace = one([d for _, d in docs], "Namespace")
    assert docs[0][1] is namespace, "kubectl applies files in name order: the Namespace comes first"
    for name, doc in docs[1:]:
        assert doc["metadata"].get("namespace") == namespace["metadata"]["name"], \
            f"{name}: {doc['kind']}/{doc['metadata']['name']} is not in namespace {namespace['metadata']['name']}"


def k8s_errors(obj):
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{'.'.join(map(str, e.path))}: {e.message}"
    return None


def test_core_objects_validate_against_kubernetes_schemas(objects):
    core = [o for o in objects if o["kind"] in CORE_KINDS]
    assert {o["kind"] for o in core} == CORE_KINDS
    errors = {f"{o['kind']}/{o['metadata']['name']}": k8s_errors(o) for o in core}
    assert not {k: v for k, v in errors.items() if v}, errors


def test_pod_templates_validate_as_core_pod_templates(objects):
    """The pod templates inside the Ray objects, as v1 PodTemplates: catches a misspelled field
    in a container or volume that the CRD check would also catch, with Kubernetes' own schema."""
    errors = {}
    for where, template, _ in pod_templates(objects):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"},
                   "template": template}
        errors[where] = k8s_errors(wrapped)
    assert errors and not {k: v for k, v in errors.items() if v}, errors


def _strict(schema):
    """The schema with additionalProperties: false wherever it lists properties and does not
    preserve unknown fields: the API server would prune a misspelled field silently."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(out["additionalProperties"])
    if "items" in out:
        out["items"] = _strict(out["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [_strict(s) for s in out[key]]
    return out


@pytest.fixture(scope="module")
def crd_validators():
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (the shared/ folder beside the repository)")
    validators = {}
    for kind, filename in CRD_FILES.items():
        crd = yaml.load((CRD_DIR / filename).read_text(), Loader=SAFE_LOADER)
        assert crd["spec"]["names"]["kind"] == kind and crd["spec"]["group"] == "ray.io"
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        validators[kind] = jsonschema.Draft202012Validator(_strict(version["schema"]["openAPIV3Schema"]))
    return validators


def crd_errors(validators, obj):
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validators[obj["kind"]].iter_errors(obj)]


def test_ray_objects_validate_against_kuberay_crds(objects, crd_validators):
    ray = [o for o in objects if o["kind"] in RAY_KINDS]
    assert {o["kind"] for o in ray} == RAY_KINDS
    for o in ray:
        assert o["apiVersion"] == "ray.io/v1"
        errors = crd_errors(crd_validators, o)
        assert not errors, f"{o['kind']}/{o['metadata']['name']}: {errors}"


def test_crd_validation_catches_misspelled_fields(objects, crd_validators):
    cluster = copy.deepcopy(one(objects, "RayCluster"))
    cluster["spec"]["headGroupSpec"]["rayStartParam"] = {}
    cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["securityContex"] = {}
    errors = crd_errors(crd_validators, cluster)
    assert any("rayStartParam" in e for e in errors) and any("securityContex" in e for e in errors), errors


# ------------------------------------------------------------------------------------------------
# The entrypoints against the real CLIs
# ------------------------------------------------------------------------------------------------

def _rayjobs_for_parametrize():
    try:
        return sorted(d["metadata"]["name"] for _, d in load_documents() if d.get("kind") == "RayJob")
    except Exception:  # a broken manifest fails test_every_document_parses instead
        return []


def test_every_job_runs_its_module(objects):
    jobs = {j["metadata"]["name"]: j["spec"]["entrypoint"] for j in of_kind(objects, "RayJob")}
    assert set(jobs) == set(JOB_MODULES)
    for name, entrypoint in jobs.items():
        # KubeRay pastes the entrypoint into the submitter's bash command line (`ray job submit
        # ... -- ENTRYPOINT ; ...`): anything the shell would interpret would run in the submitter.
        assert not set(entrypoint) & set(";&|<>$`()\\\n'\""), f"{name}: not one plain command"
        assert shlex.split(entrypoint)[:3] == ["python", "-m", JOB_MODULES[name]], name


@pytest.mark.parametrize("job", _rayjobs_for_parametrize())
def test_entrypoint_parses_with_the_real_cli(objects, job):
    argv = shlex.split(rayjob(objects, job)["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"]
    module = importlib.import_module(argv[2])
    try:
        module.build_parser().parse_args(argv[3:])
    except SystemExit as e:
        pytest.fail(f"{job}: python -m {argv[2]} rejects its arguments (exit {e.code}): {argv[3:]}")


def test_training_jobs_read_the_same_data_with_valid_config_keys(objects):
    from moco_ray import config as C

    overrides = {}
    for name in (PRETRAIN_JOB, SWEEP_JOB):
        f = flags(rayjob(objects, name)["spec"]["entrypoint"])
        cfg = C.load(f["--config"], f.get("--set", []))  # raises ConfigError on an unknown key
        assert cfg.data and cfg.knn_data, f"{name}: data and knn_data (the kNN monitor's split)"
        overrides[name] = settings(rayjob(objects, name)["spec"]["entrypoint"])
    assert overrides[PRETRAIN_JOB] == overrides[SWEEP_JOB]


# ImageNet as the pretraining job reads it, and ResNet-50's feature width (the kNN features).
IMAGENET_TRAIN, IMAGENET_VAL, IMAGENET_CLASSES, RESNET50_FEATURES = 1_281_167, 50_000, 1000, 2048


def test_pretrain_knn_monitor_costs_a_fraction_of_an_epoch_and_little_memory(objects):
    from moco_ray import config as C
    from moco_ray import knn

    f = flags(rayjob(objects, PRETRAIN_JOB)["spec"]["entrypoint"])
    cfg = C.load(f["--config"], f.get("--set", []))
    assert cfg.knn_data.endswith("/val") and cfg.knn_every >= 1, "the kNN monitor runs on the val split"
    assert cfg.epochs % cfg.knn_every == 0, "the kNN curve has evenly spaced points"
    bank = min(cfg.knn_bank_per_class * IMAGENET_CLASSES, IMAGENET_TRAIN) if cfg.knn_bank_per_class \
        else IMAGENET_TRAIN
    assert bank <= 0.1 * IMAGENET_TRAIN, f"a {bank}-image bank costs more than a tenth of an epoch"
    workers = int(str(f["--num-workers"]).split(":")[0])     # the fewest the job runs on
    peak = knn.peak_bytes(bank, IMAGENET_VAL, workers, RESNET50_FEATURES, IMAGENET_CLASSES, cfg.knn_k,
                          cfg.knn_chunk)
    assert peak < 1 << 30, f"the kNN monitor needs {peak / 2**30:.1f} GiB per GPU"


def test_lincls_job_evaluates_the_pretraining_run_on_its_data(objects):
    """The linear evaluation reads the pretraining job's run, the same splits (train for the
    classifier, the kNN monitor's val split for top-1), on the same cluster and workers, with the
    paper's protocol, and starts only once the pretraining has written its end record."""
    from moco_ray import config as C

    job, pretrain = rayjob(objects, LINCLS_JOB)["spec"], rayjob(objects, PRETRAIN_JOB)["spec"]
    f, sets = flags(job["entrypoint"]), settings(job["entrypoint"])
    pf, ps = flags(pretrain["entrypoint"]), settings(pretrain["entrypoint"])
    cfg = C.load(f["--config"], f.get("--set", []), C.LinclsConfig)   # unknown keys raise
    assert (cfg.epochs, cfg.lr, cfg.lr_steps, cfg.weight_decay, cfg.crop_min) == (100, 30.0, (60, 80), 0.0, 0.08)
    assert f["--pretrained"] == f"{pf['--storage-path']}/{pf['--name']}"
    assert f["--storage-path"] == pf["--storage-path"] and f["--name"] != pf["--name"]
    assert (sets["data"], sets["val_data"]) == (ps["data"], ps["knn_data"])
    assert (f["--use-gpu"], f["--num-workers"]) == (pf["--use-gpu"], pf["--num-workers"])
    assert job["clusterSelector"] == pretrain["clusterSelector"] and "rayClusterSpec" not in job
    inits = job["submitterPodTemplate"]["spec"].get("initContainers", [])
    command = " ".join(" ".join(c.get("command", []) + c.get("args", [])) for c in inits)
    assert f"{f['--pretrained']}/metrics.jsonl" in command and '"event": "end"' in command
    assert f"{sets['val_data']}/manifest.parquet" in command


# ------------------------------------------------------------------------------------------------
# Cross-file consistency
# ------------------------------------------------------------------------------------------------

CONVERT_JOBS = [name for name, module in JOB_MODULES.items() if module == "data_prep.convert"]


@pytest.mark.parametrize("job", CONVERT_JOBS)
def test_convert_job_writes_its_shards_on_an_autoscaled_cpu_group(objects, job):
    """Every shard is a Ray task of --cpus-per-shard CPUs: the head offers none (it runs the driver
    only), one CPU worker group starts at 0 pods and grows until every shard's task runs at once,
    and the in-tree autoscaler removes idle pods again."""
    spec = rayjob(objects, job)["spec"]
    f, cluster = flags(spec["entrypoint"]), spec["rayClusterSpec"]
    assert f.get("--address") == "auto" and "--workers" not in f, job
    cpus, shards = int(f["--cpus-per-shard"]), int(f["--shards"])
    assert cluster["enableInTreeAutoscaling"] is True, job
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] <= 300, job
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", f"{job}: the head would take shard tasks"
    (group,) = cluster["workerGroupSpecs"]
    resources = group["template"]["spec"]["containers"][0]["resources"]
    assert GPU not in resources["limits"] and resources["requests"]["cpu"] == resources["limits"]["cpu"], job
    pod_cpus = int(quantity(resources["limits"]["cpu"]))
    assert int(group["rayStartParams"].get("num-cpus", pod_cpus)) == pod_cpus, job
    assert group["minReplicas"] == group["replicas"] == 0, f"{job}: CPU pods before there is work"
    assert cpus <= pod_cpus and pod_cpus % cpus == 0, f"{job}: a shard's task must fit one pod exactly"
    assert group["maxReplicas"] * (pod_cpus // cpus) == shards, \
        f"{job}: {group['maxReplicas']} pods run {group['maxReplicas'] * (pod_cpus // cpus)} of {shards} shards at once"


def test_pvc_name_and_mount_path_match_everywhere(objects):
    pvc = one(objects, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "storage_path must be shared by all nodes"
    claim = pvc["metadata"]["name"]
    mount_paths = set()
    for where, template, role in pod_templates(objects):
        pod = template["spec"]
        claims = [v for v in pod.get("volumes", []) if "persistentVolumeClaim" in v]
        for v in claims:
            assert v["persistentVolumeClaim"]["claimName"] == claim, f"{where}: volume {v['name']}"
        if role in ("head", "worker"):
            assert claims, f"{where}: the Ray pods need the datasets and checkpoints"
        for c in pod.get("initContainers", []) + pod["containers"]:
            for m in c.get("volumeMounts", []):
                if m["name"] in {v["name"] for v in claims}:
                    mount_paths.add(m["mountPath"])
    assert len(mount_paths) == 1, f"the PVC is mounted at different paths: {mount_paths}"
    root = mount_paths.pop()

    under = lambda p: Path(p).is_relative_to(root)  # noqa: E731
    pretrain = rayjob(objects, PRETRAIN_JOB)["spec"]["entrypoint"]
    sweep = rayjob(objects, SWEEP_JOB)["spec"]["entrypoint"]
    paths = [flags(pretrain)["--storage-path"], *settings(pretrain).values(),
             flags(sweep)["--storage-path"], *settings(sweep).values()]
    converted = set()
    for job in of_kind(objects, "RayJob"):
        f = flags(job["spec"]["entrypoint"])
        if "--src" in f:
            paths += [f["--src"], f["--out"]]
            converted.add(f["--out"])
    assert all(under(p) for p in paths), f"paths outside the PVC ({root}): {paths}"
    assert converted == {settings(pretrain)["data"], settings(pretrain)["knn_data"]}, \
        "the conversion jobs should write exactly the splits that training reads"


def test_jobs_wait_for_the_data_they_read(objects):
    for name in (PRETRAIN_JOB, SWEEP_JOB):
        job = rayjob(objects, name)["spec"]
        inits = job["submitterPodTemplate"]["spec"].get("initContainers", [])
        command = " ".join(" ".join(c.get("command", []) + c.get("args", [])) for c in inits)
        for split in ("data", "knn_data"):
            path = settings(job["entrypoint"])[split]
            assert f"{path}/manifest.parquet" in command, f"{name} does not wait for {split}"


def test_image_matches_the_dockerfile(objects):
    image = dockerfile_image()
    name, _, tag = image.rpartition(":")
    assert name and tag == pyproject()["project"]["version"], f"{image}: tag is not the project version"
    label = re.search(r'org\.opencontainers\.image\.version="([^"]+)"', DOCKERFILE.read_text())
    assert label and label[1] == tag
    used = {c["image"] for _, c, _ in containers(objects) if "image" in c}
    assert used == {image}, f"manifests name {used}, the Dockerfile builds {image}"


def test_clusters_run_the_pinned_ray_version(objects):
    extras, ray_version = pyproject_pins()["ray"]
    assert set(extras.split(",")) >= {"default", "train", "tune"}
    for where, spec in ray_cluster_specs(objects):
        assert spec.get("rayVersion") == ray_version, f"{where}: rayVersion {spec.get('rayVersion')} != {ray_version}"


def test_dockerfile_pins_equal_pyproject():
    project, image = pyproject_pins(), dockerfile_pins()
    for package in ("torch", "torchvision", "ray", "ffcv"):
        assert package in project, f"pyproject.toml no longer pins {package}"
    assert image == project, f"Dockerfile pins {image} != pyproject.toml pins {project}"


def test_dockerfile_python_and_system_packages():
    lines = dockerfile_lines()
    base = next(ln.split()[1] for ln in lines if ln.startswith("FROM "))
    m = re.fullmatch(r"python:(\d+\.\d+)(?:[.\-].*)?", base)
    assert m and m[1] == "3.11", f"base image {base}: the project is built and tested on Python 3.11"
    assert SpecifierSet(pyproject()["project"]["requires-python"]).contains(f"{m[1]}.0")
    apt = " ".join(ln for ln in lines if "apt-get install" in ln).split()
    for package in ("pkg-config", "libopencv-dev", "libturbojpeg0-dev", "build-essential", "wget"):
        assert package in apt, f"the Dockerfile does not install {package}"
    assert any(re.search(r"pip install (\S+ )*\.$", ln) for ln in lines), "the project itself is not installed"


def test_metrics_ports_match_config_and_podmonitor(objects):
    from moco_ray import config as C

    metrics_port = C.preset("moco-v2").metrics_port
    assert "metrics_port" not in settings(rayjob(objects, PRETRAIN_JOB)["spec"]["entrypoint"])
    group, _ = gpu_group(objects)
    ports = {p["containerPort"]: p["name"] for p in group["template"]["spec"]["containers"][0]["ports"]}
    train_ports = {metrics_port + r for r in range(gpus_per_pod(group))}
    assert train_ports <= set(ports), f"worker pods need ports {sorted(train_ports)} (metrics_port + local rank)"

    # Ray's own metrics export port, on every Ray pod.
    for where, g, _, _ in ray_groups(objects):
        export = int(g["rayStartParams"]["metrics-export-port"])
        named = {p["name"]: p["containerPort"] for p in g["template"]["spec"]["containers"][0].get("ports", [])}
        assert named.get("metrics") == export == 8080, where

    monitor = one(objects, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    cluster = one(objects, "RayCluster")
    assert monitor["spec"]["selector"] == {"matchLabels": {"ray.io/cluster": cluster["metadata"]["name"]}}
    assert set(monitor["spec"]) <= {"selector", "namespaceSelector", "podMetricsEndpoints", "podTargetLabels",
                                    "jobLabel"}
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    known = {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels", "relabelings", "metricRelabelings"}
    for e in endpoints:
        assert set(e) <= known, f"PodMonitor endpoint with unknown fields {set(e) - known}"
    scraped = {e["port"] for e in endpoints}
    wanted = {"metrics"} | {name for name in ports.values() if name.startswith("train-metrics-")}
    assert scraped == wanted, f"PodMonitor scrapes {scraped}, the pods declare {wanted}"
    # every local rank of an 8-GPU node is scraped, whatever the pod's GPU count
    assert {metrics_port + r for r in range(8)} <= set(ports), "worker pods need ports 9400..9407"
    head_ports = {p["name"] for p in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert "metrics" in head_ports


def test_gpu_worker_group_matches_the_elastic_jobs(objects):
    """The job's MIN:MAX workers are one per GPU: MIN = minReplicas * GPUs per pod and
    MAX = maxReplicas * GPUs per pod, so maxReplicas * GPUs per pod >= MAX always holds."""
    group, spec = gpu_group(objects)
    gpus = gpus_per_pod(group)
    pretrain = flags(rayjob(objects, PRETRAIN_JOB)["spec"]["entrypoint"])
    lo, hi = (int(x) for x in pretrain["--num-workers"].split(":"))
    assert group["minReplicas"] * gpus == lo and group["maxReplicas"] * gpus == hi, \
        f"--num-workers {lo}:{hi} vs {group['minReplicas']}..{group['maxReplicas']} pods x {gpus} GPUs"
    assert group["maxReplicas"] * gpus >= hi
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert spec["enableInTreeAutoscaling"] is True

    sweep = flags(rayjob(objects, SWEEP_JOB)["spec"]["entrypoint"])
    # Not "auto": with the GPU pods scaled down, the cluster would show no GPU at the start.
    assert pretrain["--use-gpu"] == sweep["--use-gpu"] == "true"
    assert int(sweep["--workers-per-trial"]) * int(sweep["--max-concurrent"]) <= group["maxReplicas"] * gpus

    cluster_name = one(objects, "RayCluster")["metadata"]["name"]
    for name in (PRETRAIN_JOB, SWEEP_JOB):
        job = rayjob(objects, name)["spec"]
        assert job["clusterSelector"] == {"ray.io/cluster": cluster_name}
        assert "rayClusterSpec" not in job


def test_gpu_worker_pods(objects):
    group, _ = gpu_group(objects)
    pod = group["template"]["spec"]
    ray = pod["containers"][0]
    assert ray["resources"]["requests"][GPU] == ray["resources"]["limits"][GPU]
    assert any(t.get("key") == GPU and t.get("operator") == "Exists" for t in pod.get("tolerations", []))
    assert pod.get("terminationGracePeriodSeconds", 30) >= 120, "too short to finish a checkpoint"


def test_shm_is_a_memory_volume_that_holds_the_object_store(objects):
    for where, group, _, _ in ray_groups(objects):
        pod = group["template"]["spec"]
        ray = pod["containers"][0]
        mount = next((m for m in ray["volumeMounts"] if m["mountPath"] == "/dev/shm"), None)
        assert mount, f"{where}: no /dev/shm volume"
        shm = volume_of_mount(pod, mount)["emptyDir"]
        assert shm.get("medium") == "Memory" and "sizeLimit" in shm, where
        assert quantity(shm["sizeLimit"]) <= quantity(ray["resources"]["limits"]["memory"]), where
        store = group["rayStartParams"].get("object-store-memory")
        assert store and int(store) < quantity(shm["sizeLimit"]), f"{where}: object store does not fit /dev/shm"


def test_head_is_cpu_only_with_its_ports(objects):
    for where, group, role, _ in ray_groups(objects):
        if role != "head":
            continue
        assert group["rayStartParams"].get("num-gpus") == "0", where
        ray = group["template"]["spec"]["containers"][0]
        assert GPU not in ray["resources"].get("limits", {}), where
        ports = {p["name"]: p["containerPort"] for p in ray["ports"]}
        assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080}, where


def test_probes_are_left_to_kuberay(objects):
    for where, c, _ in containers(objects):
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            assert probe not in c, f"{where}: {probe} (KubeRay injects its own)"


# ------------------------------------------------------------------------------------------------
# Security
# ------------------------------------------------------------------------------------------------

def test_no_container_is_privileged_or_root(objects):
    uid, gid = dockerfile_user()
    assert uid != 0 and gid != 0
    checked = 0
    for where, c, pod in containers(objects):
        effective = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
        assert effective.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
        assert effective.get("runAsUser") == uid and effective.get("runAsGroup") == gid, \
            f"{where}: runs as {effective.get('runAsUser')}:{effective.get('runAsGroup')}, the image as {uid}:{gid}"
        sc = c.get("securityContext", {})
        assert sc.get("privileged", False) is False, f"{where}: privileged"
        assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
        assert sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc["capabilities"].get("add"), where
        assert sc.get("readOnlyRootFilesystem") is True, f"{where}: writable root filesystem"
        checked += 1
    assert checked >= 10


def test_ray_containers_write_only_to_empty_dirs(objects):
    """With a read-only root, everything Ray writes (session dir, spilling, caches) must land on
    a mounted volume: /tmp and the home directory are emptyDirs in every Ray container."""
    for where, c, pod in containers(objects):
        if c in pod.get("initContainers", []):
            continue
        mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
        for path in ("/tmp", "/home/ray"):
            assert path in mounts, f"{where}: {path} is not mounted"
            assert "emptyDir" in volume_of_mount(pod, mounts[path]), f"{where}: {path} is not an emptyDir"


def test_pods_meet_the_restricted_pod_security_standard(objects):
    namespace = one(objects, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    uid, gid = dockerfile_user()
    for where, template, _ in pod_templates(objects):
        pod = template["spec"]
        sc = pod.get("securityContext", {})
        assert sc.get("seccompProfile") == {"type": "RuntimeDefault"}, where
        assert sc.get("runAsNonRoot") is True and sc.get("runAsUser") == uid, where
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where
        allowed = {"name", "emptyDir", "persistentVolumeClaim", "configMap", "secret", "projected"}
        for v in pod.get("volumes", []):
            assert set(v) <= allowed, f"{where}: volume {v['name']} of a type restricted pods may not use"
            if "persistentVolumeClaim" in v and not v["persistentVolumeClaim"].get("readOnly"):
                assert sc.get("fsGroup") == gid, f"{where}: the shared volume needs fsGroup {gid}"


def test_every_container_has_requests_and_limits(objects):
    for where, c, _ in containers(objects):
        resources = c.get("resources", {})
        for kind in ("cpu", "memory"):
            request = resources.get("requests", {}).get(kind)
            limit = resources.get("limits", {}).get(kind)
            assert request is not None and limit is not None, f"{where}: {kind} request and limit"
            assert quantity(request) <= quantity(limit), f"{where}: {kind} request above its limit"


def test_training_jobs_can_be_retried_blindly(objects):
    """Every submission of a training job continues its run (--resume auto), so its submitter is
    retried (submitterConfig.backoffLimit). Never spec.backoffLimit: with clusterSelector a RayJob
    retry deletes the shared RayCluster (kuberay#4516), and newer operators reject the pair."""
    jobs = [j for j in objects if j["kind"] == "RayJob"
            and JOB_MODULES.get(j["metadata"]["name"]) in ("moco_ray.train", "tune.sweep", "moco_ray.lincls")]
    assert {j["metadata"]["name"] for j in jobs} >= {PRETRAIN_JOB, SWEEP_JOB}
    for job in jobs:
        name, spec = job["metadata"]["name"], job["spec"]
        assert flags(spec["entrypoint"]).get("--resume") == "auto", f"{name}: a resubmission must continue the run"
        assert spec.get("submitterConfig", {}).get("backoffLimit", 0) >= 1, f"{name}: no submitter retries"
        assert spec.get("clusterSelector") and not spec.get("backoffLimit"), \
            f"{name}: spec.backoffLimit with clusterSelector would delete the shared RayCluster"
    text = "\n".join(p.read_text() for p in K8S_DIR.glob("*-rayjob-*.yaml"))
    assert "add --resume" not in text, "a comment still asks for a hand edit of the entrypoint"


def test_every_container_runs_as_a_high_uid(objects):
    """uid and gid >= 10000 in the image and in every container, the autoscaler sidecar included
    (checkov CKV_K8S_40: no clash with the users of the host)."""
    uid, gid = dockerfile_user()
    assert uid >= 10000 and gid >= 10000, f"the image runs as {uid}:{gid}"
    for where, c, pod in containers(objects):
        effective = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
        assert effective["runAsUser"] >= 10000 and effective["runAsGroup"] >= 10000, where
        assert pod.get("securityContext", {}).get("fsGroup", 10000) >= 10000, where


def test_autoscaling_head_says_why_it_keeps_its_token():
    head = (K8S_DIR / "20-raycluster.yaml").read_text().split("headGroupSpec:")[1].split("containers:")[0]
    assert "automountServiceAccountToken" in head and "token" in head and "autoscaler" in head


def test_service_account_has_no_rights_and_no_token(objects):
    account = one(objects, "ServiceAccount")
    assert account.get("automountServiceAccountToken") is False
    autoscaling = {f"{where} head" for where, spec in ray_cluster_specs(objects) if spec.get("enableInTreeAutoscaling")}
    for where, template, role in pod_templates(objects):
        pod = template["spec"]
        autoscaling_head = role == "head" and where in autoscaling
        if autoscaling_head:
            # KubeRay runs it under its own autoscaler ServiceAccount, with the autoscaler's Role.
            assert "serviceAccountName" not in pod, where
            continue
        assert pod.get("serviceAccountName") == account["metadata"]["name"], where
        assert pod.get("automountServiceAccountToken") is False, where


def test_the_v3_alternative_of_the_pretraining_job_is_a_valid_run(objects):
    """The commented MoCo v3 alternative in 50-rayjob-pretrain.yaml: the job's entrypoint with the
    alternative's flags in place of its own parses with the real CLI and validates at its workers."""
    from moco_ray import config as C, launch
    from moco_ray.train import build_parser

    text = (K8S_DIR / "50-rayjob-pretrain.yaml").read_text()
    alternative = shlex.split(re.search(r"^# v3-alternative: (.*)$", text, re.M).group(1))
    argv = shlex.split(rayjob(objects, PRETRAIN_JOB)["spec"]["entrypoint"])[3:]
    for flag, value in zip(alternative[::2], alternative[1::2]):
        argv[argv.index(flag) + 1] = value
    args = build_parser().parse_args(argv)
    cfg = C.load(args.config, args.set)
    assert cfg.method == "v3" and args.name == "moco-v3-r50-imagenet"
    workers = launch.parse_workers(args.num_workers)
    low, high = workers if isinstance(workers, tuple) else (workers, workers)
    # the cluster's data paths do not exist here: everything else is checked
    C.validate(C.apply_overrides(cfg, {"data": "", "knn_data": ""}), max_workers=high, min_workers=low)
