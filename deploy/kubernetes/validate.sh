#!/usr/bin/env bash
# Offline check of the manifests in this folder (CI runs it):
#
#   bash deploy/kubernetes/validate.sh
#
# 1. every resource against the OpenAPI schemas of one pinned Kubernetes
#    version, strictly (an unknown or misspelt field is an error), with
#    kubernetes-validate from PyPI, whose schemas ship in the package: no
#    cluster and no network are needed;
# 2. what the schemas cannot know: the termination grace covers the preStop
#    pause plus the server's shutdown_grace, the probes ask /healthz and
#    /readyz on the admin port, and the Service has 8080 and 1883.
set -euo pipefail
cd "$(dirname "$0")"
# The oldest Kubernetes these manifests are meant for (policy/v1 PDB,
# Indexed Jobs, topology spread constraints are all older).
K8S_VERSION=${K8S_VERSION:-1.30.0}
VALIDATOR='kubernetes-validate==1.37.0'
if ! python3 -c 'import kubernetes_validate, yaml' 2>/dev/null; then
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore "$VALIDATOR"
fi
python3 -m kubernetes_validate --strict --quiet -k "$K8S_VERSION" ./*.yaml
python3 - ./*.yaml <<'PY'
import sys, yaml
docs = [d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d]
def one(kind, name):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]
def secs(text):
    assert text.endswith("s") and text[:-1].replace(".", "", 1).isdigit(), f"write seconds, e.g. 5s: {text}"
    return float(text[:-1])
dep = one("Deployment", "echo-server")
pod = dep["spec"]["template"]["spec"]
c = pod["containers"][0]
env = {e["name"]: e.get("value") for e in c["env"]}
grace = secs(env["ECHO_SERVER_SHUTDOWN_GRACE"])
pre_stop = float(c["lifecycle"]["preStop"]["exec"]["command"][-1])
total = pod["terminationGracePeriodSeconds"]
assert total >= pre_stop + grace + 2, (
    f"terminationGracePeriodSeconds {total} does not cover preStop {pre_stop} s + shutdown_grace {grace} s + 2 s")
assert env["ECHO_CLUSTER_NATS_URL"] == "nats://nats:4222", env
one("Service", "nats")
ports = {p["name"]: p["containerPort"] for p in c["ports"]}
assert ports == {"websocket": 8080, "mqtt": 1883, "admin": 9090}, ports
assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}, c["readinessProbe"]
assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}, c["livenessProbe"]
svc = one("Service", "echo-server")
assert sorted(p["port"] for p in svc["spec"]["ports"]) == [1883, 8080], svc["spec"]["ports"]
pdb = one("PodDisruptionBudget", "echo-server")
assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
job = one("Job", "echo-loadgen")["spec"]
assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"], job
assert "--start-at" in job["template"]["spec"]["containers"][0]["args"][0]
print(f"[k8s] grace {total} s covers preStop {pre_stop:g} s + shutdown_grace {grace:g} s; probes, ports, PDB, Job agree")
PY
echo "[k8s] validated against Kubernetes $K8S_VERSION (kubernetes-validate, strict, offline)"
