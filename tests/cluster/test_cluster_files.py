"""The cluster launch files are valid, name only things that exist, and keep Ray's ports private.

- cluster.yaml / onprem.yaml: what `ray up` does before launching anything (Ray's own `prepare_config` +
  `validate_config`, i.e. ray/autoscaler/ray-schema.json), plus the raw file against that schema.
- rayjob.yaml: a JSON schema for the RayJob fields we use, written from KubeRay's Go types
  (ray-operator/apis/ray/v1/rayjob_types.go and raycluster_types.go: RayJobSpec, RayClusterSpec,
  HeadGroupSpec, WorkerGroupSpec, AuthOptions), with additionalProperties=false so a misspelled field fails.
- Every `python -m revq_ray.X`, every configs/ tuning/ cluster/ path, and every `--set` override the yamls
  and README name exists and validates against the config tree.
- No inbound rule opens 8265/6379/10001 to the world; the dashboard stays on loopback; token auth is on.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
RAY_PORTS = {8265, 6379, 10001}


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


# --------------------------------------------------------------------------------------------- ray up
@pytest.mark.parametrize("name", ["cluster.yaml", "onprem.yaml"])
def test_ray_cluster_config_validates(name):
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(name)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)  # the file as written
    prepared = prepare_config(raw)  # merged with the provider defaults, as `ray up` does
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_aws_cluster_shape():
    cfg = _load("cluster.yaml")
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    gpu_types = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert not re.match(r"^(g\d|p\d)", head["node_config"]["InstanceType"]), "the head should be a CPU node"
    assert gpu_types and all(re.match(r"^(g[56]|p[45])", t["node_config"]["InstanceType"]) for t in gpu_types)
    assert all(t.get("min_workers", 0) == 0 for t in gpu_types), "GPU workers must autoscale from zero"
    # GPU workers need their own instance profile: they read shards and write checkpoints in S3.
    assert all("IamInstanceProfile" in t["node_config"] for t in gpu_types)
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "/home/ray/revq-ray" in setup
    assert cfg["file_mounts"]["/home/ray/revq-ray"] == "."


# --------------------------------------------------------------------------------------------- KubeRay
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "object", "required": ["name", "image"]},
                }
            },
        }
    },
}
RAYJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["entrypoint", "rayClusterSpec"],
            "properties": {
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                "backoffLimit": {"type": "integer", "minimum": 0},
                "rayClusterSpec": {"$ref": "#/$defs/rayClusterSpec"},
                "submitterPodTemplate": {"type": "object"},
                "metadata": _STR_MAP,
                "clusterSelector": _STR_MAP,
                "submitterConfig": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"backoffLimit": {"type": "integer", "minimum": 0}},
                },
                "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
                "deletionStrategy": {"type": "object"},
                "entrypoint": {"type": "string", "minLength": 1},
                "runtimeEnvYAML": {"type": "string"},
                "jobId": {"type": "string"},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                "entrypointResources": {"type": "string"},
                "entrypointNumCpus": {"type": "number", "minimum": 0},
                "entrypointNumGpus": {"type": "number", "minimum": 0},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "suspend": {"type": "boolean"},
            },
        },
    },
    "$defs": {
        "rayClusterSpec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["headGroupSpec"],
            "properties": {
                "headGroupSpec": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["rayStartParams", "template"],
                    "properties": {
                        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                        "headService": {"type": "object"},
                        "enableIngress": {"type": "boolean"},
                        # map[string]string in the CRD: a bare number here is rejected by the API server.
                        "rayStartParams": _STR_MAP,
                        "template": _POD_TEMPLATE,
                    },
                },
                "workerGroupSpecs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["groupName", "rayStartParams", "template"],
                        "properties": {
                            "groupName": {"type": "string", "minLength": 1},
                            "replicas": {"type": "integer", "minimum": 0},
                            "minReplicas": {"type": "integer", "minimum": 0},
                            "maxReplicas": {"type": "integer", "minimum": 0},
                            "numOfHosts": {"type": "integer", "minimum": 1},
                            "rayStartParams": _STR_MAP,
                            "template": _POD_TEMPLATE,
                            "scaleStrategy": {"type": "object"},
                        },
                    },
                },
                "rayVersion": {"type": "string"},
                "enableInTreeAutoscaling": {"type": "boolean"},
                "autoscalerOptions": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "resources": {"type": "object"},
                        "image": {"type": "string"},
                        "imagePullPolicy": {"type": "string"},
                        "env": {"type": "array"},
                        "envFrom": {"type": "array"},
                        "volumeMounts": {"type": "array"},
                        "securityContext": {"type": "object"},
                        "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                    },
                },
                "headServiceAnnotations": _STR_MAP,
                "suspend": {"type": "boolean"},
                "authOptions": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"mode": {"enum": ["disabled", "token"]}, "secretName": {"type": "string"}},
                },
            },
        }
    },
}


def test_rayjob_matches_kuberay_crd_fields():
    jsonschema = pytest.importorskip("jsonschema")
    job = _load("rayjob.yaml")
    jsonschema.validate(job, RAYJOB_SCHEMA)
    spec = job["spec"]["rayClusterSpec"]
    for group in spec.get("workerGroupSpecs", []):
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group["groupName"]
    assert re.search(r"python -m revq_ray\.train\b", job["spec"]["entrypoint"])


def test_rayjob_schema_catches_typos():
    """Positive control: the schema above is strict enough to matter."""
    jsonschema = pytest.importorskip("jsonschema")
    job = _load("rayjob.yaml")
    job["spec"]["shutdownAfterJobFinish"] = True  # missing "es"
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinish"):
        jsonschema.validate(job, RAYJOB_SCHEMA)
    job = _load("rayjob.yaml")
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0  # must be a string
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(job, RAYJOB_SCHEMA)


# --------------------------------------------------------------------------------------------- security
def _opens_ray_port_to_world(rule: dict) -> bool:
    """An EC2 IpPermissions entry that lets the internet reach a Ray control port."""
    protocol = str(rule.get("IpProtocol", "tcp"))
    lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
    all_ports = protocol == "-1" or lo in (-1, None) or hi in (-1, None)
    covers = all_ports or any(lo <= p <= hi for p in RAY_PORTS)
    world = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", [])) or any(
        r.get("CidrIpv6") == "::/0" for r in rule.get("Ipv6Ranges", [])
    )
    return covers and world


def _all_ip_permissions(cfg: dict) -> list[dict]:
    rules = list(cfg.get("provider", {}).get("security_group", {}).get("IpPermissions", []))
    for node_type in cfg.get("available_node_types", {}).values():
        rules += node_type.get("node_config", {}).get("IpPermissions", [])
    return rules


def test_security_checker_flags_open_rules():
    assert _opens_ray_port_to_world({"FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]})
    assert _opens_ray_port_to_world({"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]})
    assert _opens_ray_port_to_world({"FromPort": 6000, "ToPort": 7000, "Ipv6Ranges": [{"CidrIpv6": "::/0"}]})
    assert not _opens_ray_port_to_world({"FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]})
    assert not _opens_ray_port_to_world(
        {"FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}
    )


@pytest.mark.parametrize("name", ["cluster.yaml", "onprem.yaml"])
def test_ray_ports_stay_private_and_token_auth_is_on(name):
    cfg = _load(name)
    bad = [r for r in _all_ip_permissions(cfg) if _opens_ray_port_to_world(r)]
    assert not bad, f"{name}: security group rules open Ray's ports to the internet: {bad}"
    head = " ".join(cfg["head_start_ray_commands"])
    workers = " ".join(cfg["worker_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" not in head, "the dashboard must bind to loopback (SSH tunnel)"
    assert "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in workers
    assert any(remote.endswith(".ray/auth_token") for remote in cfg["file_mounts"]), "ship the token"


def test_rayjob_keeps_head_private_with_token_auth():
    spec = _load("rayjob.yaml")["spec"]["rayClusterSpec"]
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
    # authOptions needs Ray >= 2.52 (KubeRay checks spec.rayVersion).
    major, minor = (int(x) for x in spec["rayVersion"].split(".")[:2])
    assert (major, minor) >= (2, 52)


def test_readme_never_opens_ports():
    text = (CLUSTER / "README.md").read_text()
    assert (
        "ray dashboard cluster/cluster.yaml" in text and "ssh -i" in text and "-L 8265:localhost:8265" in text
    )
    assert "RAY_AUTH_MODE=token" in text
    assert not re.search(r"--dashboard-host[= ]0\.0\.0\.0", text)
    for stop in ("ray job stop", "ray down", "ray job logs -f", "tensorboard --logdir"):
        assert stop in text, stop


# --------------------------------------------------------------------------------------------- names
def _texts() -> dict[str, str]:
    names = ["cluster.yaml", "onprem.yaml", "rayjob.yaml", "README.md", "Dockerfile"]
    return {n: (CLUSTER / n).read_text() for n in names}


def _module_runs(name: str) -> bool:
    """`python -m name` works: a module, or a package with __main__."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        return False
    if spec.submodule_search_locations:
        return importlib.util.find_spec(name + ".__main__") is not None
    return True


def test_named_modules_exist():
    found = set()
    for fname, text in _texts().items():
        for mod in re.findall(r"python -m (revq_ray(?:\.\w+)*)", text):
            found.add(mod)
            assert _module_runs(mod), f"cluster/{fname} runs `python -m {mod}`, which does not exist"
    assert {"revq_ray.train", "revq_ray.tune", "revq_ray.encode"} <= found


def test_named_files_exist():
    pattern = re.compile(r"(?<![\w/.-])((?:configs|tuning|cluster|tests)/[\w./-]*[\w])")
    for fname, text in _texts().items():
        for rel in set(pattern.findall(text)):
            assert (ROOT / rel).exists(), f"cluster/{fname} names {rel}, which does not exist"


def _commands(text: str) -> list[list[str]]:
    """Every `python -m revq_ray.train|tune ...` command line (README continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", text)
    text = re.sub(r"\n\s+(?=--)", " ", text)  # folded YAML (>-) entrypoints
    out = []
    for line in re.findall(r"python -m revq_ray\.(?:train|tune)\b[^\n`]*", text):
        out.append(shlex.split(line.split("&&")[0]))
    return out


def test_named_overrides_validate():
    """`--config X --set k=v` in the docs must load: the preset exists and every key is a real field."""
    from revq_ray.config import load_config

    checked = 0
    for text in _texts().values():
        for argv in _commands(text):
            module, args = argv[2], argv[3:]
            if "--config" not in args:
                continue
            path = ROOT / args[args.index("--config") + 1]
            if path.name == "best.yaml":  # written by a sweep; tests/tune checks it trains
                continue
            sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
            if module == "revq_ray.train":
                load_config(path, sets)
            else:
                from revq_ray.tune import load_tune_config

                train_sets = [args[i + 1] for i, a in enumerate(args) if a == "--train-set"]
                load_tune_config(path, sets, train_overrides=train_sets)
            checked += 1
    assert checked >= 3
