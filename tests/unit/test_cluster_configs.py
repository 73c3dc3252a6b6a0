"""The files in cluster/: launcher YAMLs, KubeRay manifests, the image and the MLflow recipe.

Nothing here starts a cluster: each file is checked against the schema its consumer applies
(Ray's ray-schema.json, KubeRay's required fields, Serve's builder contract, lepton-ray's own
config schema for the overrides a job passes), plus the settings that matter for security.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shlex
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from lepton_ray.config import load_experiment
from tests.conftest import ROOT

CLUSTER = ROOT / "cluster"
LAUNCHERS = ["aws-gpu.yaml", "gcp-gpu.yaml"]
KUBERAY = ["raycluster.yaml", "rayjob.yaml", "rayservice.yaml"]
SERVE_APP = ROOT / "lepton_ray" / "serve" / "app.py"


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, _, pinned = line.partition("==")
            pins[name.strip().lower()] = pinned.split("#")[0].strip()
    return pins


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


# ------------------------------------------------------------------------ cluster launcher
def _launcher(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _ray_schema() -> dict:
    # Found without importing ray (seconds): the schema ships inside the installed package.
    spec = importlib.util.find_spec("ray")
    assert spec and spec.submodule_search_locations, "ray is not installed"
    path = Path(spec.submodule_search_locations[0]) / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_matches_rays_schema(name):
    jsonschema = pytest.importorskip("jsonschema")
    schema = _ray_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [
        f"{'.'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}"
        for e in validator.iter_errors(_launcher(name))
    ]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_passes_rays_own_checks(name):
    """What `ray up` runs before it touches the cloud: defaults merged, then validated."""
    util = pytest.importorskip("ray.autoscaler._private.util")
    prepared = util.prepare_config(_launcher(name))
    util.validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_has_an_autoscaling_gpu_worker_type(name):
    cfg = _launcher(name)
    workers = {
        key: node
        for key, node in cfg["available_node_types"].items()
        if key != cfg["head_node_type"] and node["resources"].get("GPU", 0) >= 1
    }
    assert workers, f"{name}: no worker type declares GPU resources"
    for key, node in workers.items():
        assert 0 <= node["min_workers"] <= node["max_workers"] <= cfg["max_workers"], key
        assert node["max_workers"] >= 1, key
        assert "--gpus all" in node["docker"]["worker_run_options"], key
    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{_pins()['ray']}-py311-gpu")


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_enables_token_auth_on_every_node(name):
    cfg = _launcher(name)
    for section in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [cmd for cmd in cfg[section] if "ray start" in cmd]
        assert starts, section
        for cmd in starts:
            assert "RAY_AUTH_MODE=token" in cmd, f"{section}: {cmd}"
            assert cmd.index("RAY_AUTH_MODE=token") < cmd.index("ray start"), cmd
    assert "-e RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    # Every node reads the token where Ray looks by default.
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_never_exposes_the_dashboard(name):
    cfg = _launcher(name)
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in json.dumps(cfg)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_installs_lepton_ray_with_the_constraints(name):
    cfg = _launcher(name)
    installs = [c for c in cfg["setup_commands"] if "pip install" in c]
    assert any("-c " in c and "constraints.txt" in c and "lepton_ray" in c for c in installs), (
        installs
    )
    # The folder it installs from is built by the command in the header, from this checkout.
    mounted = {remote: local for remote, local in cfg["file_mounts"].items()}
    assert mounted.get("~/lepton-ray-dist") == "dist/cluster"
    header = (CLUSTER / name).read_text().split("\ncluster_name:")[0]
    assert "pip wheel --no-deps -w dist/cluster ." in header
    assert "cp constraints.txt dist/cluster/" in header
    # torch is pinned, and a CPU-only build fails the node's setup.
    assert "torch" in _pins()
    assert any("torch.version.cuda" in c for c in cfg["setup_commands"])


# --------------------------------------------------------------------------------- KubeRay
def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d]


def _ray_objects() -> list[tuple[str, dict]]:
    return [(name, d) for name in KUBERAY for d in _docs(name) if d["apiVersion"] == "ray.io/v1"]


def _kind(value: object) -> str:
    return value["kind"] if isinstance(value, dict) else str(value)


def _cluster_spec(obj: dict) -> dict:
    kind, spec = obj["kind"], obj["spec"]
    if kind == "RayCluster":
        return spec
    if kind == "RayJob":
        return spec["rayClusterSpec"]
    if kind == "RayService":
        return spec["rayClusterConfig"]
    raise AssertionError(f"unexpected kind {kind}")


def _pod_specs(cluster: dict) -> list[tuple[str, dict]]:
    pods = [("head", cluster["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in cluster["workerGroupSpecs"]]
    return pods


def test_kuberay_files_hold_one_object_of_each_kind():
    kinds = {name: [d["kind"] for n, d in _ray_objects() if n == name] for name in KUBERAY}
    assert kinds == {
        "raycluster.yaml": ["RayCluster"],
        "rayjob.yaml": ["RayJob"],
        "rayservice.yaml": ["RayService"],
    }


@pytest.mark.parametrize("name,obj", _ray_objects(), ids=_kind)
def test_kuberay_object_has_the_fields_kuberay_requires(name, obj):
    assert obj["apiVersion"] == "ray.io/v1"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"])
    cluster = _cluster_spec(obj)
    assert cluster["rayVersion"] == _pins()["ray"], "rayVersion must match the image's Ray"
    assert isinstance(cluster["headGroupSpec"]["rayStartParams"], dict)
    assert cluster["workerGroupSpecs"], "no worker group"
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"]
        assert isinstance(group["rayStartParams"], dict)
        counts = [group[k] for k in ("minReplicas", "replicas", "maxReplicas")]
        assert all(isinstance(c, int) for c in counts), counts
        assert counts[0] <= counts[1] <= counts[2] and counts[2] >= 1, counts
    for role, pod in _pod_specs(cluster):
        container = pod["containers"][0]
        assert container["name"] and container["image"], role
        assert container["resources"]["limits"], f"{role}: no resource limits"


@pytest.mark.parametrize("name,obj", _ray_objects(), ids=_kind)
def test_kuberay_object_enables_token_auth_in_every_container(name, obj):
    cluster = _cluster_spec(obj)
    auth = cluster["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"]
    for role, pod in _pod_specs(cluster):
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", role
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": auth["secretName"], "key": "auth_token"}, role


def test_training_manifests_request_gpus():
    for name in ("raycluster.yaml", "rayjob.yaml"):
        [obj] = [d for n, d in _ray_objects() if n == name]
        for group in _cluster_spec(obj)["workerGroupSpecs"]:
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert limits.get("nvidia.com/gpu", 0) >= 1, f"{name}: {group['groupName']}"


def test_rayjob_runs_a_shipped_experiment_with_valid_overrides(monkeypatch):
    [job] = [d for n, d in _ray_objects() if n == "rayjob.yaml"]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["RAY_AUTH_MODE"] == "token"

    entrypoint = spec["entrypoint"]
    assert "lepton-ray run experiments/" in entrypoint
    words = shlex.split(entrypoint.split("&&")[-1])
    assert words[:2] == ["lepton-ray", "run"]
    experiment = ROOT / words[2]
    assert experiment.is_file(), f"{words[2]} is not in the repository"
    head_env = {
        e["name"]: e.get("value", "")
        for e in _cluster_spec(job)["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    }
    overrides = [
        re.sub(r"\$(\w+)", lambda m: head_env[m.group(1)], words[i + 1])
        for i, word in enumerate(words)
        if word == "--set"
    ]
    assert "cluster.auth=token" in overrides and "serve.enabled=false" in overrides
    monkeypatch.chdir(ROOT)
    cfg = load_experiment(experiment, overrides)  # every key and value valid for the schema
    assert cfg.scaling.use_gpu and cfg.cluster.auth == "token"
    assert cfg.tracking.tracking_uri.startswith("https://")
    assert "://" in cfg.tracking.artifact_location


def _serve_args_fields() -> tuple[set[str], set[str]]:
    """(all, required) fields of ServeArgs, read from app.py without importing Ray."""
    tree = ast.parse(SERVE_APP.read_text())
    [cls] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ServeArgs"]
    fields, required = set(), set()
    for stmt in cls.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            name = stmt.target.id
            if name == "model_config":
                continue
            fields.add(name)
            if stmt.value is None or (
                isinstance(stmt.value, ast.Call)
                and getattr(stmt.value.func, "id", "") == "Field"
                and not stmt.value.args
                and not any(k.arg in ("default", "default_factory") for k in stmt.value.keywords)
            ):
                required.add(name)
    return fields, required


def _serve_apps() -> list[dict]:
    [service] = [d for n, d in _ray_objects() if n == "rayservice.yaml"]
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert config["applications"], "serveConfigV2 has no applications"
    return config["applications"]


def test_rayservice_serve_config_targets_lepton_ray():
    fields, required = _serve_args_fields()
    source = SERVE_APP.read_text()
    for app in _serve_apps():
        assert app["route_prefix"].startswith("/")
        module, _, attr = app["import_path"].partition(":")
        assert module == "lepton_ray.serve.app" and attr, app["import_path"]
        assert not set(app["args"]) - fields, f"unknown ServeArgs: {set(app['args']) - fields}"
        assert required <= set(app["args"]), f"missing ServeArgs: {required - set(app['args'])}"
        assert re.fullmatch(r"models:/[^/@]+/\d+", app["args"]["model_uri"]), "pin a version"
        for deployment in app.get("deployments", []):
            assert f'name="{deployment["name"]}"' in source, deployment["name"]


def test_rayservice_import_path_is_a_one_argument_app_builder():
    """Serve calls the builder with the args dict, and only accepts one parameter."""
    tree = ast.parse(SERVE_APP.read_text())
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    for app in _serve_apps():
        attr = app["import_path"].partition(":")[2]
        assert attr in functions, f"lepton_ray.serve.app:{attr} (the RayService builder) is missing"
        params = functions[attr].args
        assert len(params.args) + len(params.kwonlyargs) == 1, f"{attr} must take one argument"
        annotation = params.args[0].annotation if params.args else None
        assert getattr(annotation, "id", None) == "ServeArgs", f"annotate {attr}(args: ServeArgs)"


def test_rayservice_reads_an_api_key_digest_from_a_secret_on_every_pod():
    """KubeRay binds Serve to 0.0.0.0: the application must carry a key (app_builder checks)."""
    [service] = [d for n, d in _ray_objects() if n == "rayservice.yaml"]
    for app in _serve_apps():
        name = app["args"].get("api_key_sha256_env")
        assert name, "set args.api_key_sha256_env (the key's SHA-256, from a Secret)"
        assert "api_key_sha256" not in app["args"], "a digest in the manifest: use the Secret"
        for role, pod in _pod_specs(_cluster_spec(service)):
            env = {e["name"]: e for e in pod["containers"][0]["env"]}
            assert name in env, f"{role}: {name} is not set"
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref["name"] and ref["key"], role


# ------------------------------------------------------------------------------ Dockerfile
def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile_builds_on_the_ray_image_and_installs_with_constraints():
    steps = _instructions(CLUSTER / "Dockerfile")
    kinds = [k for k, _ in steps]
    known = {"ARG", "FROM", "RUN", "COPY", "WORKDIR", "ENV", "USER", "EXPOSE", "LABEL"}
    assert set(kinds) <= known, set(kinds) - known
    args = dict(a.split("=", 1) for k, a in steps if k == "ARG" and "=" in a)
    assert args["RAY_IMAGE"] == f"rayproject/ray:{_pins()['ray']}-py311-gpu"
    assert kinds.index("FROM") < kinds.index("RUN")
    runs = " ".join(a for k, a in steps if k == "RUN")
    assert "pip install" in runs and "-c constraints.txt" in runs
    for _, arg in (s for s in steps if s[0] == "COPY"):
        for source in arg.split()[:-1]:
            if not source.startswith("--"):
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


# ------------------------------------------------------------------------------ MLflow recipe
def test_mlflow_recipe_is_authenticated_private_and_pinned():
    compose = yaml.safe_load((CLUSTER / "mlflow" / "docker-compose.yaml").read_text())
    services = compose["services"]
    command = services["mlflow"]["command"]
    assert command[:2] == ["mlflow", "server"]
    assert "--app-name=basic-auth" in command
    assert any(c.startswith("--backend-store-uri=postgresql://") for c in command)
    assert any(c.startswith("--artifacts-destination=") for c in command)
    assert "--serve-artifacts" in command
    # Only the TLS proxy publishes ports; MLflow and PostgreSQL stay on the compose network.
    assert [name for name, s in services.items() if s.get("ports")] == ["caddy"]
    env = services["mlflow"]["environment"]
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"

    ini = (CLUSTER / "mlflow" / "basic_auth.ini").read_text()
    assert re.search(r"^database_uri = postgresql://", ini, re.M)
    assert not re.search(r"^admin_password", ini, re.M), "no password in the ini file"

    pinned = re.search(
        r"^mlflow\[auth\]==(\S+)", (CLUSTER / "mlflow" / "requirements.txt").read_text(), re.M
    )
    assert pinned, "pin the server's MLflow version"
    server = _version_tuple(pinned.group(1))
    assert server >= (3, 11, 1), "basic-auth servers below 3.11.1 have published advisories"
    assert server >= _version_tuple(version("mlflow")), "server older than lepton-ray's client"
