"""cluster/ without a cluster: the manifests validate against the KubeRay v1.7.0 CRDs and Kubernetes' own
schemas (unknown keys too), agree with each other and with the job config, clean up after themselves, name the
identity and the metrics endpoint they rely on, and every command and path they name exists. The Dockerfile's
side: tests/test_cluster_image.py; exit codes through the schedulers: tests/test_cluster_exit.py."""

from __future__ import annotations

import functools
import gzip
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from omnilmm_ray.cli import parse_args
from omnilmm_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CRDS = Path(__file__).parent / "k8s" / "kuberay-v1.7.0"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests are for (CronJob timeZone is GA since 1.27)


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


@functools.cache
def _crd_schema(kind: str) -> dict:
    """Read once per process (no test changes it), with libyaml's parser where PyYAML has it: the pure-Python
    one takes seconds for a CRD."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(gzip.decompress((CRDS / f"ray.io_{kind.lower()}s.yaml.gz").read_bytes()), Loader=loader)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


def _unknown_keys(obj, schema: dict, where: str = "") -> list[str]:
    """Keys the API server would prune silently: CRD schemas do not set additionalProperties."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(obj, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for k, v in obj.items():
            if props is not None and k in props:
                found += _unknown_keys(v, props[k], f"{where}.{k}")
            elif isinstance(extra, dict):
                found += _unknown_keys(v, extra, f"{where}.{k}")
            elif props is not None:
                found.append(f"{where}.{k}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(obj):
            found += _unknown_keys(v, schema["items"], f"{where}[{i}]")
    return found


def _check_crd(doc: dict, schema: dict) -> None:
    jsonschema.validate(doc, schema)
    assert _unknown_keys(doc, schema) == []
    assert set(doc["metadata"]) <= {"name", "generateName", "labels", "annotations"}


def _rayjob_specs() -> list[tuple[str, dict]]:
    (job,) = _docs("rayjob.yaml")
    (cron,) = _docs("raycronjob.yaml")
    return [("rayjob.yaml", job["spec"]), ("raycronjob.yaml", cron["spec"]["jobTemplate"])]


def test_kuberay_manifests_validate_against_the_crds():
    (job,) = _docs("rayjob.yaml")
    (cron,) = _docs("raycronjob.yaml")
    assert (job["kind"], cron["kind"]) == ("RayJob", "RayCronJob")
    _check_crd(job, _crd_schema("RayJob"))
    _check_crd(cron, _crd_schema("RayCronJob"))
    # the cluster part, also as the RayCluster CRD sees it
    cluster = _crd_schema("RayCluster")["properties"]["spec"]
    jsonschema.validate(job["spec"]["rayClusterSpec"], cluster)
    assert _unknown_keys(job["spec"]["rayClusterSpec"], cluster) == []


def test_the_unknown_key_check_catches_a_misplaced_field():
    (job,) = _docs("rayjob.yaml")
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["shm"] = "16Gi"
    assert _unknown_keys(job, _crd_schema("RayJob")) == [
        ".spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].shm"
    ]


def test_core_kinds_validate_strictly():
    docs = _docs("cronjob.yaml")
    assert [d["kind"] for d in docs] == ["ServiceAccount", "Role", "RoleBinding", "CronJob"]
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)


def test_the_crd_copies_are_the_shared_originals():
    shared = ROOT.parent / "shared" / "k8s" / "kuberay-v1.7.0"
    if not shared.is_dir():
        pytest.skip("no ../shared/k8s here (a clean clone): the copies in tests/k8s are what is checked")
    for gz in CRDS.glob("*.yaml.gz"):
        assert gzip.decompress(gz.read_bytes()) == (shared / gz.name.removesuffix(".gz")).read_bytes()


def test_raycronjob_creates_exactly_the_rayjob():
    (_, job), (_, template) = _rayjob_specs()
    assert template == job


def test_pods_have_what_gpu_ray_pods_need_sized_from_the_job_config():
    cfg = load_config(CLUSTER / "job.example.yaml")
    for name, spec in _rayjob_specs():
        assert 0 < spec["activeDeadlineSeconds"] < 24 * 3600, name  # ends before the next night's run
        ray_cluster = spec["rayClusterSpec"]
        pods = [ray_cluster["headGroupSpec"]] + ray_cluster["workerGroupSpecs"]
        for group in pods:
            pod = group["template"]["spec"]
            shm = {v["name"]: v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"}
            (c,) = pod["containers"]
            assert any(m["mountPath"] == "/dev/shm" and m["name"] in shm for m in c["volumeMounts"]), name
            assert c["resources"]["requests"] == c["resources"]["limits"], name  # no surprise evictions
        (gpu,) = ray_cluster["workerGroupSpecs"]
        pod = gpu["template"]["spec"]
        res = pod["containers"][0]["resources"]["limits"]
        gpus = int(res["nvidia.com/gpu"])
        assert gpus % cfg.engine.tp == 0
        assert gpu["maxReplicas"] * gpus // cfg.engine.tp == cfg.scale.max_actors
        assert int(res["cpu"]) >= (gpus // cfg.engine.tp) * cfg.scale.actor_cpus + cfg.preprocess.num_cpus
        assert (
            "nvidia.com/gpu" in str(pod["nodeSelector"]) and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        )
    launcher = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    assert launcher["available_node_types"]["gpu"]["max_workers"] == cfg.scale.max_actors


def test_cronjob_waits_for_its_rayjob_and_its_role_allows_what_it_runs():
    sa, role, binding, cron = _docs("cronjob.yaml")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    (_, rayjob), _ = _rayjob_specs()
    # the CronJob's pod outlives its RayJob, so Forbid keeps two runs apart
    assert job["activeDeadlineSeconds"] > rayjob["activeDeadlineSeconds"]
    pod = job["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"] == binding["subjects"][0]["name"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    script = pod["containers"][0]["args"][0]
    assert "jobDeploymentStatus" in script  # it waits for the RayJob to end
    verbs = set(re.findall(r"kubectl (\w+)", script))
    (rule,) = role["rules"]
    assert rule["resources"] == ["rayjobs"] and verbs <= set(rule["verbs"]), verbs
    mount = pod["containers"][0]["volumeMounts"][0]["mountPath"]
    assert f"-f {mount}/rayjob.yaml" in script
    # the RayJob it creates must get a fresh name each night
    assert "generateName" in yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())["metadata"]


def _dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    return [
        tuple(line.split(None, 1))
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def _commands() -> list[tuple[str, list[str]]]:
    """Every `omnilmm-caption` command line in the manifests, scripts and the image, as argv lists."""
    found = [(name, shlex.split(spec["entrypoint"])) for name, spec in _rayjob_specs()]
    submit = (CLUSTER / "nightly-submit.sh").read_text()
    inner = re.search(r'"([^"]*omnilmm-caption[^"]*)"', submit).group(1)
    found.append(("nightly-submit.sh", shlex.split(inner.split(" -- ", 1)[1])))
    cmd = [json.loads(arg) for op, arg in _dockerfile() if op == "CMD"]
    found.append(("Dockerfile CMD", cmd[-1]))
    return found


def test_config_paths_the_commands_name_are_provided():
    # Kubernetes: --config /config/job.yaml comes from the caption-job-config ConfigMap (key job.yaml, made
    # from cluster/job.example.yaml as rayjob.yaml says) mounted on the head, where the driver runs.
    for name, spec in _rayjob_specs():
        config = parse_args(shlex.split(spec["entrypoint"])[1:]).config
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        volumes = {v["name"]: v for v in head["volumes"]}
        (mount,) = [
            m for m in head["containers"][0]["volumeMounts"] if config.startswith(m["mountPath"] + "/")
        ]
        cm = volumes[mount["name"]]["configMap"]["name"]
        key = config.removeprefix(mount["mountPath"] + "/")
        made = f"kubectl create configmap {cm} --from-file={key}=cluster/job.example.yaml"
        assert made in (CLUSTER / "rayjob.yaml").read_text(), name
    # VMs: --config /home/ray/job.yaml is a file_mounts target of the launcher
    (_, argv) = [c for c in _commands() if c[0] == "nightly-submit.sh"][0]
    launcher = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    src = launcher["file_mounts"][parse_args(argv[1:]).config]
    assert load_config(ROOT / src).scale.max_actors >= 1
    # the CronJob's RayJob template, and the scripts the schedulers start
    assert "--from-file=rayjob.yaml=cluster/rayjob.yaml" in (CLUSTER / "cronjob.yaml").read_text()
    service = (CLUSTER / "omnilmm-nightly.service").read_text()
    assert (ROOT / re.search(r"ExecStart=/bin/sh (\S+)", service).group(1)).is_file()
    assert "ray-cluster.yaml" in (CLUSTER / "nightly-submit.sh").read_text()


def _unit(path: Path) -> dict[str, dict[str, str]]:
    """A systemd unit file's sections and settings (one value per key, as these units are written)."""
    sections: dict[str, dict[str, str]] = {}
    for line in path.read_text().splitlines():
        if line.startswith("[") and line.endswith("]"):
            section = sections.setdefault(line[1:-1], {})
        elif "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            section[key.strip()] = value.strip()
    return sections


def test_the_vm_scheduler_retries_failed_runs_like_the_cronjob():
    """Both nightly schedulers retry a failed run twice (each retry resumes it) and never retry the exit codes that
    would only fail again: the CronJob's podFailurePolicy FailJob codes, less 124 (its RayJob's own deadline, which
    VMs do not have)."""
    unit = _unit(CLUSTER / "omnilmm-nightly.service")
    (cron,) = [d for d in _docs("cronjob.yaml") if d["kind"] == "CronJob"]
    job = cron["spec"]["jobTemplate"]["spec"]
    (fail,) = [r for r in job["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    assert unit["Service"]["Restart"] == "on-failure"
    assert {int(c) for c in unit["Service"]["RestartPreventExitStatus"].split()} == set(
        fail["onExitCodes"]["values"]
    ) - {124}
    assert int(unit["Unit"]["StartLimitBurst"]) == 1 + job["backoffLimit"]
    # systemd checks the settings it would refuse (Restart=always on a oneshot service, say), where it is installed
    if shutil.which("systemd-analyze"):
        r = subprocess.run(
            ["systemd-analyze", "verify", str(CLUSTER / "omnilmm-nightly.service")],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr


def test_launcher_config_validates_against_rays_schema():
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    launcher = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    jsonschema.validate(launcher, schema)
    assert (
        launcher["docker"]["image"]
        == _docs("rayjob.yaml")[0]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"][
            "containers"
        ][0]["image"]
    )


def _ray_pods(spec: dict) -> list[dict]:
    """The head's and every worker group's pod template of a RayJob spec."""
    ray_cluster = spec["rayClusterSpec"]
    return [g["template"] for g in [ray_cluster["headGroupSpec"], *ray_cluster["workerGroupSpecs"]]]


def test_finished_rayjobs_and_their_clusters_are_deleted():
    """RayJobs pile up one per night unless KubeRay deletes them (RayCronJob keeps no history limit), and a
    cluster left behind holds its head pod. The checks KubeRay 1.7 makes before it accepts the rules
    (validateDeletionConfiguration), then one DeleteCluster and one DeleteSelf rule per way a run ends."""
    for name, spec in _rayjob_specs():
        rules = spec["deletionStrategy"]["deletionRules"]
        # rules mode: KubeRay refuses shutdownAfterJobFinishes beside it, and a TTL needs that flag
        assert not spec.get("shutdownAfterJobFinishes") and not spec.get("ttlSecondsAfterFinished"), name
        by_condition: dict[tuple, dict[str, int]] = {}
        for rule in rules:
            cond = rule["condition"]
            (key,) = [(k, cond[k]) for k in ("jobStatus", "jobDeploymentStatus") if k in cond]
            assert rule["policy"] not in by_condition.setdefault(key, {}), (name, "duplicate", rule)
            by_condition[key][rule["policy"]] = cond.get("ttlSeconds", 0)
        order = ["DeleteWorkers", "DeleteCluster", "DeleteSelf"]  # TTLs must not decrease along it
        for key, ttls in by_condition.items():
            seq = [ttls[p] for p in order if p in ttls]
            assert seq == sorted(seq), (name, key, ttls)
        # a success (jobStatus SUCCEEDED) and every failure (jobDeploymentStatus Failed: the Ray job failed,
        # its submission failed, or the deadline passed)
        for key in [("jobStatus", "SUCCEEDED"), ("jobDeploymentStatus", "Failed")]:
            assert {"DeleteCluster", "DeleteSelf"} <= set(by_condition[key]), (name, key)
        # a failed RayJob stays long enough to read why (kubectl describe, its submitter's log)
        assert by_condition[("jobDeploymentStatus", "Failed")]["DeleteSelf"] >= 24 * 3600, name


def test_ray_pods_run_as_the_storage_service_account():
    """IRSA / workload identity are bound to a ServiceAccount: the Ray pods name one that cluster/ defines,
    and the key secret is optional, so the pods start without it."""
    (sa,) = _docs("serviceaccount.yaml")
    kubernetes_validate.validate(sa, K8S_VERSION, strict=True)
    assert sa["kind"] == "ServiceAccount"
    text = (CLUSTER / "serviceaccount.yaml").read_text()
    for annotation in ("eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account"):
        assert annotation in text  # how to bind it, per cloud
    for name, spec in _rayjob_specs():
        for pod in _ray_pods(spec):
            assert pod["spec"]["serviceAccountName"] == sa["metadata"]["name"], name
            for c in pod["spec"]["containers"]:
                for source in c.get("envFrom", []):
                    assert source["secretRef"].get("optional") is True, (name, c["name"])
    # the CronJob's own account (kubectl) is another: the storage identity is not given RBAC on RayJobs
    cron_sa, _, binding, cron = _docs("cronjob.yaml")
    assert (
        cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["serviceAccountName"]
        == cron_sa["metadata"]["name"]
    )
    assert sa["metadata"]["name"] not in {cron_sa["metadata"]["name"], binding["subjects"][0]["name"]}
    readme = (ROOT / "README.md").read_text()
    assert "cluster/serviceaccount.yaml" in readme and "serviceAccountName" in readme


KUBERAY_METRICS_PORT = ("metrics", 8080)  # the port KubeRay adds to every Ray container (its default)


def test_metrics_endpoint_is_scraped_on_every_ray_pod():
    (monitor,) = _docs("podmonitor.yaml")
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == KUBERAY_METRICS_PORT[0]
    for name, spec in _rayjob_specs():
        ray_cluster = spec["rayClusterSpec"]
        groups = [ray_cluster["headGroupSpec"], *ray_cluster["workerGroupSpecs"]]
        for group, pod in zip(groups, _ray_pods(spec)):
            assert selector.items() <= pod["metadata"]["labels"].items(), name  # the PodMonitor finds it
            notes = pod["metadata"]["annotations"]
            assert notes["prometheus.io/scrape"] == "true", name
            assert notes["prometheus.io/port"] == str(KUBERAY_METRICS_PORT[1]), name
            # nothing moves Ray's metrics agent off KubeRay's port, nor renames that port
            assert group["rayStartParams"].get("metrics-export-port", "8080") == "8080", name
            for c in pod["spec"]["containers"]:
                for port in c.get("ports", []):
                    assert port.get("name") != KUBERAY_METRICS_PORT[0] or port["containerPort"] == 8080
    assert "cluster/podmonitor.yaml" in (ROOT / "README.md").read_text()
