# Static checks of the deployment files under platform/: they parse, agree with pyproject's Ray pin and with
# what the study presets ask of a node, name only files that exist, and keep heavy dirs out of job uploads.
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PLATFORM = ROOT / "platform"
YAMLS = sorted(p for ext in ("yaml", "yml") for p in PLATFORM.rglob(f"*.{ext}"))
TEXT_FILES = sorted(p for p in PLATFORM.rglob("*") if p.suffix in (".yaml", ".yml", ".sh", ".md"))
CLUSTERS = {"aws": PLATFORM / "cluster/aws.yaml", "gcp": PLATFORM / "cluster/gcp.yaml"}
HEAVY = (".venv", ".git", "mlflow.db", "mlruns", "mlartifacts", "data", "results", ".cache", "__pycache__")


def pyproject_deps() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def ray_pin() -> str:
    pins = [m.group(1) for d in pyproject_deps() if (m := re.fullmatch(r"ray(?:\[[^\]]*\])?==([\w.]+)", d))]
    assert len(pins) == 1, "pyproject.toml must pin ray exactly once (ray[...]==X.Y.Z)"
    return pins[0]


def presets() -> dict:
    from studies.agc_lambda import PRESETS

    return PRESETS


def per_trial(fixed: dict) -> tuple[float, int]:
    """(CPUs, GPUs) one trial of a preset asks for: num_workers × (cpus_per_worker [+ 1 GPU])."""
    from studies.training.config import TrainConfig

    cfg = TrainConfig(**fixed)
    return cfg.num_workers * cfg.cpus_per_worker, cfg.num_workers if cfg.use_gpu else 0


def test_platform_is_not_a_python_package():
    assert not (PLATFORM / "__init__.py").exists(), "platform/ is not a package: remove __init__.py"
    assert not list(PLATFORM.rglob("*.py")), "no Python under platform/"


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(PLATFORM)))
def test_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


def test_expected_files_exist():
    for rel in ("README.md", "runtime_env.yaml", "cluster/aws.yaml", "cluster/gcp.yaml",
                "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "mlflow/start.sh",
                "mlflow/docker-compose.yml", "ray/start-head.sh", "ci/install-test-deps.sh"):
        assert (PLATFORM / rel).is_file(), f"platform/{rel} is missing"


def test_ray_version_everywhere_is_the_pyproject_pin():
    pin = ray_pin()
    seen = 0
    for path in TEXT_FILES:
        text, rel = path.read_text(), path.relative_to(ROOT)
        for v in re.findall(r"rayproject/ray:([0-9][\w.]*?)(?:-|\"|'|\s|$)", text):
            assert v == pin, f"{rel}: image rayproject/ray:{v}, pyproject pins ray=={pin}"
            seen += 1
        for v in re.findall(r"\bray(?:\[[\w,]*\])?==([0-9][\w.]*)", text):
            assert v == pin, f"{rel}: ray=={v}, pyproject pins ray=={pin}"
            seen += 1
    for path in PLATFORM.glob("kuberay/*.yaml"):
        doc = yaml.safe_load(path.read_text())
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert spec["rayVersion"] == pin, f"{path.name}: rayVersion {spec['rayVersion']} != {pin}"
        seen += 1
    assert seen >= 8  # images and pins in both cluster configs and both KubeRay files


def test_named_repo_files_exist():
    # Any studies/…, storage/…, platform/… path a deployment file mentions must exist in this repository.
    pattern = re.compile(r"(?<![\w/.-])((?:studies|storage|nfnet|platform|benchmarks)/[\w./-]*\w)")
    named = set()
    for path in TEXT_FILES:
        for rel in pattern.findall(path.read_text()):
            named.add(rel)
            assert (ROOT / rel).exists(), f"{path.relative_to(ROOT)} names {rel}, which does not exist"
    assert "studies/agc_lambda.py" in named and "platform/runtime_env.yaml" in named


def test_runtime_env_is_valid_and_excludes_heavy_dirs():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((PLATFORM / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # Ray's own validation, as `ray job submit --runtime-env` applies it
    excludes = {e.strip("/") for e in env["excludes"]}
    for heavy in HEAVY:
        assert heavy in excludes, f"runtime_env.yaml must exclude {heavy} from the job upload"
    env_vars = env["env_vars"]
    assert env_vars["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env_vars["MLFLOW_TRACKING_URI"].startswith("http")  # a server: trials run on other machines
    assert not any("PASSWORD" in k or "TOKEN" in k for k in env_vars), "no secrets in runtime_env.yaml"


@pytest.mark.parametrize("cloud", sorted(CLUSTERS))
def test_cluster_launcher_config(cloud):
    import jsonschema
    import ray.autoscaler

    cfg = yaml.safe_load(CLUSTERS[cloud].read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["provider"]["type"] == cloud
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]["resources"]
    assert head.get("GPU", 0) == 0 and head.get("CPU") == 0, "a CPU head that takes no training workers"
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    for name, t in workers.items():  # autoscaling from zero
        assert t.get("min_workers", 0) == 0 < t["max_workers"] <= cfg["max_workers"], name

    # The imagenet preset: one trial = 8 GPU workers × 8 CPUs must fit on the 8-GPU node type.
    cpus, gpus = per_trial(presets()["imagenet"].fixed)
    assert (cpus, gpus) == (64, 8)
    big = [t["resources"] for t in workers.values() if t["resources"].get("GPU", 0) == 8]
    assert big and all(r["CPU"] >= cpus for r in big), f"8-GPU node type needs >= {cpus} CPUs: {big}"
    # The cifar10 preset: one GPU worker per trial, on the single-GPU node type.
    cifar = presets()["cifar10"].fixed
    assert cifar["use_gpu"] is True and cifar.get("num_workers", 1) == 1
    cpus1, gpus1 = per_trial(cifar)
    small = [t["resources"] for t in workers.values() if t["resources"].get("GPU", 0) == 1]
    assert small and gpus1 == 1 and all(r["CPU"] >= cpus1 for r in small)

    commands = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    scheme = {"aws": "s3://", "gcp": "gs://"}[cloud]
    for var in ("NFNET_LAB_RESULTS", "NFNET_LAB_DATA"):
        values = re.findall(rf"{var}=(\S+)", commands)
        assert len(values) == 2 and all(v.startswith(scheme) for v in values), f"{var}: {scheme}… on nodes"
    assert commands.count("RAY_AUTH_MODE=token") == 2, "token auth on every node"
    assert "--dashboard-host=127.0.0.1" in commands  # reached through `ray dashboard` (SSH)
    assert "MLFLOW_TRACKING_PASSWORD=$(" in commands  # from the cloud's secret store, not from this file
    assert any(f"ray[tune,train,default]=={ray_pin()}" in c for c in cfg["setup_commands"])


def container_resources(group: dict) -> tuple[float, int]:
    res = group["template"]["spec"]["containers"][0]["resources"]
    for kind in ("requests", "limits"):
        assert "cpu" in res[kind], "set cpu requests and limits: Ray sizes the pod's CPU count from them"
    return float(res["limits"]["cpu"]), int(res["limits"].get("nvidia.com/gpu", 0))


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay(name):
    doc = yaml.safe_load((PLATFORM / "kuberay" / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob"}[name]
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    assert spec["authOptions"]["mode"] == "token"
    head, groups = spec["headGroupSpec"], spec["workerGroupSpecs"]
    assert head["rayStartParams"].get("num-cpus") == "0"
    assert container_resources(head)[1] == 0
    cpus, gpus = per_trial(presets()["imagenet"].fixed)
    big = [container_resources(g) for g in groups if container_resources(g)[1] >= gpus]
    assert big and all(c >= cpus for c, _ in big), f"a worker group with >= {gpus} GPUs and {cpus} CPUs"
    for g in groups:
        image = g["template"]["spec"]["containers"][0]["image"]
        if container_resources(g)[1]:
            assert image.endswith("-gpu"), f"GPU group {g['groupName']} needs a -gpu image, got {image}"


def test_rayjob_runs_the_imagenet_study_with_the_project_dependencies():
    doc = yaml.safe_load((PLATFORM / "kuberay/rayjob.yaml").read_text())
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["python", "studies/agc_lambda.py"] and (ROOT / argv[1]).is_file()
    assert argv[argv.index("--preset") + 1] == "imagenet"
    out = argv[argv.index("--output") + 1]
    assert out.startswith(("s3://", "gs://")), "a multi-node study writes to object storage, not a local path"
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    pip = env["pip"]["packages"] if isinstance(env["pip"], dict) else env["pip"]
    expected = [d for d in pyproject_deps() if not re.match(r"ray\b", d)]
    assert sorted(pip) == sorted(expected), "rayjob.yaml's pip must list pyproject's dependencies minus ray"
    assert env["working_dir"].startswith(("s3://", "gs://"))


def test_rayjob_entrypoint_flags_exist():
    doc = yaml.safe_load((PLATFORM / "kuberay/rayjob.yaml").read_text())
    flags = [a for a in shlex.split(doc["spec"]["entrypoint"]) if a.startswith("--")]
    helptext = subprocess.run([sys.executable, "studies/agc_lambda.py", "--help"], cwd=ROOT, text=True,
                              capture_output=True, timeout=120, check=True).stdout
    for f in flags:
        assert re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", helptext), f"agc_lambda.py has no flag {f}"


def test_mlflow_compose_and_start_script():
    text = (PLATFORM / "mlflow/docker-compose.yml").read_text()
    services = yaml.safe_load(text)["services"]
    assert {"postgres", "minio", "mlflow"} <= set(services)
    # Secrets come from the environment (an env file outside the repository), never literal values.
    for key in ("MLFLOW_AUTH_ADMIN_PASSWORD", "POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "PGPASSWORD"):
        for value in re.findall(rf"{key}:\s*(\S+)", text):
            assert value.startswith("${"), f"{key} must come from the environment, got {value}"
    assert any("127.0.0.1:" in str(p) for p in services["mlflow"]["ports"]), "publish on loopback by default"
    script = (PLATFORM / "mlflow/start.sh").read_text()
    for must in ('--app-name "$app"', "MLFLOW_APP_NAME:-nfnet-lab-auth", "--workers 1",
                 "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false", '"${MLFLOW_HOST:-127.0.0.1}"', "--artifacts-destination"):
        assert must in script, f"platform/mlflow/start.sh lacks {must}"


def test_mlflow_start_script_names_missing_settings():
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    run = subprocess.run(["bash", str(PLATFORM / "mlflow/start.sh")], env=env, capture_output=True, text=True,
                         timeout=30)
    assert run.returncode == 2
    for var in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert var in run.stderr


def test_install_script_is_quiet_when_everything_is_there():
    import shutil

    postgres = shutil.which("initdb") or list(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not (shutil.which("chromium") and postgres):
        pytest.skip("PostgreSQL or Chromium missing here: running the script would install them")
    run = subprocess.run(["bash", str(PLATFORM / "ci/install-test-deps.sh")], capture_output=True, text=True,
                         timeout=30)
    assert (run.returncode, run.stdout, run.stderr) == (0, "", "")
