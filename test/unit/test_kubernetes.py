"""deploy/kubernetes: valid against a pinned Kubernetes (kubernetes-validate, strict), clean under
checkov's policies (each skip explained in the manifest), and consistent with the server."""

import subprocess
import sys
from pathlib import Path

import yaml

from nvembed_triton.protocol.contract import PUBLIC_MODEL
from nvembed_triton.settings import launcher_setting

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.31.0"


def resources() -> dict[str, dict]:
    found = {}
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return found


def test_manifests_are_valid_for_a_pinned_kubernetes():
    result = subprocess.run(
        [str(Path(sys.executable).parent / "kubernetes-validate"), "-k", KUBERNETES_VERSION, "--strict", "--quiet",
         *map(str, sorted(MANIFESTS.glob("*.yaml")))],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_checkov_finds_nothing():
    checkov = ROOT / ".venv" / "checkov" / "bin" / "checkov"  # setup.sh installs it
    result = subprocess.run(
        [str(checkov), "-d", str(MANIFESTS), "--framework", "kubernetes", "--compact", "--quiet", "--skip-download"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Failed checks: 0" in result.stdout


def test_the_deployment_fits_the_server():
    found = resources()
    pod = found["Deployment/nvembed-triton"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002, "openai": 8080}
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] == f"/v2/models/{PUBLIC_MODEL}/ready"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # a 16 GB load
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= launcher_setting("drain_timeout_s", {}) + pause + 5
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models/NV-Embed-v2"]["readOnly"] and mounts["/dev/shm"]["name"] == "shm"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {e["name"]: e["value"] for e in container["env"]}["TRITON_HOST"] == "0.0.0.0"


def test_the_headless_service_and_autoscaler_point_at_the_deployment():
    found = resources()
    labels = found["Deployment/nvembed-triton"]["spec"]["template"]["metadata"]["labels"]
    headless = found["Service/nvembed-triton-headless"]["spec"]
    assert headless["clusterIP"] == "None" and headless["selector"] == labels
    assert found["Service/nvembed-triton"]["spec"]["selector"] == labels
    target = found["HorizontalPodAutoscaler/nvembed-triton"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "nvembed-triton")
    assert found["PodDisruptionBudget/nvembed-triton"]["spec"]["selector"]["matchLabels"] == labels
