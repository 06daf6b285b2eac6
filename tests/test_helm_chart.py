"""The Helm chart, without a cluster: lint, render, validate against the Kubernetes schemas of the
version the chart declares, and assert what matters on the rendered objects (GPU only on Triton,
probes, autoscaling on metrics the code really exports, drain, network isolation, non-root)."""

from __future__ import annotations

import base64
import json
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

import vitaserve.common.metrics as service_metrics
from vitaserve.devcluster.triton_local import model_repository_template

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "vita-audio"
PROD = CHART / "examples" / "gpu-production.yaml"
MODEL_REPO = model_repository_template()
HELM = shutil.which("helm", path=f"{ROOT / '.tools' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
pytestmark = pytest.mark.skipif(HELM is None, reason="helm is not installed (scripts/install_helm.sh)")

SERVICES = ("gateway", "encoder", "decoder")
SCALED = (*SERVICES, "triton")
CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/", "cert-manager.io/")
# Triton's own metrics used for autoscaling (tritonserver --metrics-port)
TRITON_METRICS = {"nv_inference_queue_duration_us", "nv_inference_pending_request_count"}
MONITORING = ("--api-versions", "monitoring.coreos.com/v1/PodMonitor", "--api-versions",
              "monitoring.coreos.com/v1/PrometheusRule", "--set", "metrics.grafanaDashboard.enabled=true")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([HELM, *args], capture_output=True, text=True, check=check, timeout=60)


def render(*args: str) -> list[dict]:
    # rendered for the oldest Kubernetes the chart declares
    out = helm("template", "vita", str(CHART), "--namespace", "voice", "--kube-version", declared_kube_version(),
               *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def values_of(path: Path | None = None) -> dict:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    if path:
        for key, value in yaml.safe_load(path.read_text()).items():
            values[key] = {**values[key], **value} if isinstance(value, dict) else value
    return values


def declared_kube_version() -> str:
    spec = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    return re.search(r">=\s*(\d+\.\d+\.\d+)", spec).group(1)


def exported_metric_names() -> set[str]:
    """Every metric the Python services register, plus the Triton model's own gauges."""
    names = set()
    for obj in vars(service_metrics).values():
        if isinstance(obj, MetricWrapperBase):
            names.update(family.name for family in obj.describe())
    model_py = (MODEL_REPO / "vita_generator" / "1" / "model.py").read_text()
    names.update(re.findall(r'MetricFamily\(\s*name="([a-z_]+)"', model_py))
    return names


def exported_series_names() -> set[str]:
    """The series names Prometheus stores for every exported metric, as queries name them: a counter's
    `_total`, a histogram's `_bucket`, `_sum` and `_count`, a gauge's own name; the Triton model's
    families as named (Triton appends nothing); Triton's own documented metrics."""
    names = set(TRITON_METRICS)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    for obj in vars(service_metrics).values():
        if isinstance(obj, MetricWrapperBase):
            for family in obj.describe():
                names.update(family.name + suffix for suffix in suffixes[family.type])
    model_py = (MODEL_REPO / "vita_generator" / "1" / "model.py").read_text()
    names.update(re.findall(r'MetricFamily\(\s*name="([a-z_]+)"', model_py))
    return names


def metric_names_in(promql: str) -> set[str]:
    """Metric names a PromQL expression reads (label values in quotes are not names)."""
    return set(re.findall(r"\b(?:vita|nv)_[a-z0-9_]+\b", re.sub(r'"[^"]*"', '""', promql)))


def monitoring_queries(docs: list[dict]) -> dict[str, list[str]]:
    """Every metric name or PromQL expression that the autoscalers, monitors, alert rules and
    dashboard of the rendered chart contain, by where it is."""
    found: dict[str, list[str]] = {}
    for d in docs:
        where = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] == "HorizontalPodAutoscaler":
            found[where] = [m["pods"]["metric"]["name"] for m in d["spec"]["metrics"]]
        elif d["kind"] == "ScaledObject":
            found[where] = [t["metadata"]["query"] for t in d["spec"]["triggers"]]
        elif d["kind"] in ("PodMonitor", "ServiceMonitor"):
            endpoints = d["spec"].get("podMetricsEndpoints", []) + d["spec"].get("endpoints", [])
            found[where] = [str(r.get("regex", "")) for e in endpoints for r in e.get("metricRelabelings", [])]
        elif d["kind"] == "PrometheusRule":
            found[where] = [r["expr"] for g in d["spec"]["groups"] for r in g["rules"]]
        elif d["kind"] == "ConfigMap" and any(k.endswith(".json") for k in d.get("data", {})):
            dashboard = json.loads(next(v for k, v in d["data"].items() if k.endswith(".json")))
            found[where] = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    return found


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in docs if d["kind"] == kind}


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    specs = [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in workloads(docs)]
    return specs + [(d["metadata"]["name"], d["spec"]) for d in docs if d["kind"] == "Pod"]


@pytest.fixture(scope="module")
def default() -> list[dict]:
    return render()


@pytest.fixture(scope="module")
def prod() -> list[dict]:
    return render("-f", str(PROD))


@pytest.fixture(scope="module", params=["default", "prod"])
def rendered(request, default, prod) -> tuple[list[dict], dict]:
    return (default, values_of()) if request.param == "default" else (prod, values_of(PROD))


@pytest.mark.parametrize("extra", [[], ["-f", str(PROD)]], ids=["default", "prod"])
def test_helm_lint(extra):
    result = helm("lint", str(CHART), "--strict", *extra, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_manifest_validates_for_declared_kubernetes(rendered):
    docs, _ = rendered
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "StatefulSet", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "NetworkPolicy", "ServiceAccount", "ConfigMap", "Secret"} <= kinds
    for version in (declared_kube_version(), kubernetes_validate.latest_version()):
        for doc in docs:
            if doc["apiVersion"].startswith(CRD_GROUPS):
                continue  # custom resources: no upstream schema; checked by the tests below
            kubernetes_validate.validate(doc, version, strict=True)


def test_gpu_requested_by_triton_only(rendered):
    docs, values = rendered
    for name, spec in pod_specs(docs):
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            resources = c.get("resources", {})
            gpus = {**resources.get("requests", {}), **resources.get("limits", {})}.get("nvidia.com/gpu")
            if name.endswith("-triton") and c["name"] == "triton":
                assert gpus == values["triton"]["gpus"]
            else:
                assert gpus is None, f"{name}/{c['name']} asks for a GPU"
    triton = by_kind(docs, "Deployment")["triton"]["spec"]["template"]["spec"]
    assert triton["tolerations"] and triton["nodeSelector"]
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in triton["volumes"]), "no /dev/shm"


def test_probes_on_every_container(rendered):
    docs, _ = rendered
    deployments = by_kind(docs, "Deployment")
    for name, spec in pod_specs(docs):
        if name.endswith("-grpc-health"):
            continue  # the helm test pod runs once
        for c in spec["containers"]:
            startup = c["startupProbe"]
            assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, f"{name}: 7B weights need minutes"
            assert c["readinessProbe"] and c["livenessProbe"]
    for component in SERVICES:
        (c,) = deployments[component]["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        # with TLS on the service port the kubelet (no TLS) probes the plaintext health-only port
        probe_port = ports["health"] if "--plaintext" not in c["args"] else ports["grpc"]
        assert ("--plaintext" in c["args"]) != (f"--health-port={ports.get('health')}" in c["args"])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == probe_port, f"{component} {probe} is not a grpc.health.v1 probe"
    (t,) = deployments["triton"]["spec"]["template"]["spec"]["containers"]
    assert t["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert t["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"


def test_hpa_per_service_on_exported_metrics(rendered):
    docs, values = rendered
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    deployments = by_kind(docs, "Deployment")
    known = exported_metric_names() | TRITON_METRICS
    assert {"vita_gateway_active_streams", "vita_decoder_active_streams", "vita_generator_requests_in_flight"} <= known
    assert set(hpas) == set(SCALED)
    for component, hpa in hpas.items():
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"]["name"] == deployments[component]["metadata"]["name"]
        assert "replicas" not in deployments[component]["spec"], "the HPA owns the replica count"
        limits = values[component]["autoscaling"]
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (limits["minReplicas"], limits["maxReplicas"])
        names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]]
        assert names and set(names) <= known, f"{component}: {set(names) - known} is exported by nothing"
        up, down = hpa["spec"]["behavior"]["scaleUp"], hpa["spec"]["behavior"]["scaleDown"]
        assert up["stabilizationWindowSeconds"] <= 60 <= 300 <= down["stabilizationWindowSeconds"]
        assert max(p["value"] for p in up["policies"] if p["type"] == "Pods") > max(
            p["value"] for p in down["policies"] if p["type"] == "Pods"), "scale up faster than down"
    assert not any(d["kind"] == "ScaledObject" for d in docs)


def test_keda_scaled_objects_replace_hpas():
    docs = render("--set", "autoscaling.engine=keda")
    known = exported_metric_names() | TRITON_METRICS
    scaled = by_kind(docs, "ScaledObject")
    assert set(scaled) == set(SCALED) and not by_kind(docs, "HorizontalPodAutoscaler")
    for component, so in scaled.items():
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        assert so["spec"]["scaleTargetRef"]["name"] == f"vita-vita-audio-{component}"
        for trigger in so["spec"]["triggers"]:
            assert trigger["type"] == "prometheus"
            (name,) = re.findall(r"\b(vita_[a-z_]+|nv_[a-z_]+)\{", trigger["metadata"]["query"])
            assert name in known and float(trigger["metadata"]["threshold"]) > 0
            assert f'pod=~"vita-vita-audio-{component}-.*"' in trigger["metadata"]["query"]
        behavior = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] > behavior["scaleUp"]["stabilizationWindowSeconds"]
    assert not by_kind(render("--set", "autoscaling.engine=none"), "HorizontalPodAutoscaler")


def test_pdb_per_workload_selects_its_pods(rendered):
    docs, _ = rendered
    pdbs, deployments = by_kind(docs, "PodDisruptionBudget"), by_kind(docs, "Deployment")
    assert set(pdbs) == set(SCALED)
    for component, pdb in pdbs.items():
        labels = deployments[component]["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert pdb["spec"]["maxUnavailable"] >= 1


def test_drain_outlasts_the_longest_call(rendered):
    docs, values = rendered
    max_call = values["maxCallSeconds"]
    for w in workloads(docs):
        if w["kind"] == "Deployment":
            spec = w["spec"]["template"]["spec"]
            assert spec["terminationGracePeriodSeconds"] >= max_call + values["drain"]["preStopSleepSeconds"]
            assert w["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    deployments = by_kind(docs, "Deployment")
    gateway = deployments["gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    assert f"--grace-s={max_call}" in gateway["args"]
    triton = deployments["triton"]["spec"]["template"]["spec"]["containers"][0]
    assert f"--exit-timeout-secs={max_call}" in triton["args"]


def test_gateway_balances_over_headless_services(default):
    services, deployments = by_kind(default, "Service"), by_kind(default, "Deployment")
    args = deployments["gateway"]["spec"]["template"]["spec"]["containers"][0]["args"]
    for component in ("encoder", "decoder"):
        svc = services[component]
        assert svc["spec"]["clusterIP"] == "None"
        port = svc["spec"]["ports"][0]["port"]
        assert f"--{component}=dns:///{svc['metadata']['name']}.voice.svc.cluster.local:{port}" in args
    assert f"--triton={services['triton']['metadata']['name']}.voice.svc.cluster.local:8001" in args


def _peer_components(rule: dict) -> set[str] | None:
    if "from" not in rule:
        return None  # anyone
    return {peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component", "<other>")
            for peer in rule["from"]}


def test_only_the_gateway_reaches_internal_services(rendered):
    docs, values = rendered
    policies, deployments = by_kind(docs, "NetworkPolicy"), by_kind(docs, "Deployment")
    metrics_ports = {values["metrics"]["port"], 8002}
    allowed = {"encoder": {"gateway"}, "decoder": {"gateway"}, "triton": {"gateway"}, "redis": {"gateway", "decoder"}}
    for component, peers in allowed.items():
        policy = policies[component]["spec"]
        assert policy["policyTypes"] == ["Ingress", "Egress"]
        for rule in policy["ingress"]:
            ports = {p["port"] for p in rule["ports"]}
            if ports <= metrics_ports:
                continue
            assert _peer_components(rule) == peers, f"{component} is open to {_peer_components(rule)}"
        if component in deployments:
            labels = deployments[component]["spec"]["template"]["metadata"]["labels"]
            assert policy["podSelector"]["matchLabels"].items() <= labels.items()


def test_no_container_runs_as_root(rendered):
    docs, _ = rendered
    for name, spec in pod_specs(docs):
        pod_ctx = spec["securityContext"]
        assert pod_ctx["runAsNonRoot"] is True and pod_ctx.get("runAsUser", 1) != 0, name
        for c in spec["containers"] + spec.get("initContainers", []):
            ctx = c["securityContext"]
            assert ctx["runAsNonRoot"] is True and ctx.get("runAsUser", 1) != 0, f"{name}/{c['name']}"
            assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"]["drop"] == ["ALL"]
        assert spec["automountServiceAccountToken"] is False


@pytest.mark.parametrize("args, message", [
    (["--set", "gateway.replicaz=3"], "additional properties 'replicaz' not allowed"),
    (["--set-string", "maxCallSeconds=long"], "/maxCallSeconds"),
    (["--set", "triton.gpus=0"], "/triton/gpus"),
    (["--set", "checkpoints.source=s3"], "/checkpoints/source"),
    (["--set", "redis.enabled=false"], "externalRedis.existingSecret"),
    (["--set", "checkpoints.source=copy"], "checkpoints.copy.image"),
    (["--set", "gateway.autoscaling.maxReplicas=1"], "below minReplicas"),
])
def test_bad_values_fail_with_a_reason(args, message):
    result = helm("template", "vita", str(CHART), *args, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_external_redis_and_copied_checkpoints():
    docs = render("--set", "redis.enabled=false", "--set", "externalRedis.existingSecret=redis-url",
                  "--set", "checkpoints.source=copy", "--set", "checkpoints.copy.image=amazon/aws-cli:2",
                  "--set", "checkpoints.copy.command={sh,-c,aws s3 sync s3://b/vita /checkpoints}")
    assert not [d for d in docs if d["kind"] == "StatefulSet"]
    deployments = by_kind(docs, "Deployment")
    for component in ("gateway", "decoder"):
        env = {e["name"]: e for e in deployments[component]["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["VITA_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "redis-url", "key": "redis-url"}
    for component in SCALED:
        spec = deployments[component]["spec"]["template"]["spec"]
        assert spec["initContainers"][0]["name"] == "copy-checkpoints"
        assert next(v for v in spec["volumes"] if v["name"] == "checkpoints")["emptyDir"]


def test_the_redis_password_is_in_no_command_args_or_env_value(rendered):
    """The password (generated into the chart's Secret) reaches redis-server in a config file mounted
    from that Secret and the services as VITA_REDIS_URL from it: no rendered object but the Secret
    holds it, and no container's command, args or plain env value carries it or a reference to it."""
    docs, _ = rendered
    (secret,) = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "vita-vita-audio-redis"]
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    password = data["redis-password"]
    assert len(password) >= 32 and password in data["redis-url"]
    # the services' ACL user holds the password; the default user (password-less clients) is off
    assert f"user vita on >{password} " in data["redis.conf"] and "user default off" in data["redis.conf"]
    assert data["redis-url"].startswith(f"rediss://vita:{password}@")
    for doc in docs:
        if doc is not secret:
            assert password not in yaml.safe_dump(doc), f"{doc['kind']}/{doc['metadata']['name']} holds the password"
    for name, spec in pod_specs(docs):
        for c in spec["containers"] + spec.get("initContainers", []):
            words = [*c.get("command", []), *c.get("args", [])]
            assert not [w for w in words if password in w or "$(" in w or "pass" in w.lower()], f"{name}/{c['name']}"
            for env in c.get("env", []):
                assert password not in env.get("value", "") and "$(" not in env.get("value", ""), f"{name}/{c['name']}"
    deployments, redis = by_kind(docs, "Deployment"), by_kind(docs, "StatefulSet")["redis"]["spec"]["template"]["spec"]
    for component in ("gateway", "decoder"):
        (c,) = deployments[component]["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in c["env"]}
        assert env["VITA_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"],
                                                                      "key": "redis-url"}
    (server,) = redis["containers"]
    assert server["command"] == ["redis-server"] and server["args"][0] == "/etc/redis/redis.conf"
    config = next(v for v in redis["volumes"] if v["name"] == "config")["secret"]
    assert config["secretName"] == secret["metadata"]["name"] and config["items"] == [
        {"key": "redis.conf", "path": "redis.conf"}]
    assert {"name": "config", "mountPath": "/etc/redis", "readOnly": True} in server["volumeMounts"]


def test_gateway_settings_come_from_values():
    docs = render("--set-string", r"gateway.chunkPlan=10\,25\,50", "--set-json", "gateway.maxUtteranceSeconds=12.5",
                  "--set", "gateway.maxNewTokens=300")
    (c,) = by_kind(docs, "Deployment")["gateway"]["spec"]["template"]["spec"]["containers"]
    assert {"--chunk-plan=10,25,50", "--max-utterance-s=12.5", "--max-new-tokens=300"} <= set(c["args"])


def test_pod_monitor_when_the_operator_is_present():
    assert not [d for d in render() if d["kind"] == "PodMonitor"]
    (monitor,) = [d for d in render("--api-versions", "monitoring.coreos.com/v1/PodMonitor") if d["kind"] == "PodMonitor"]
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    for _, spec in pod_specs(render()):
        if spec["containers"][0]["name"] in SCALED:
            assert "metrics" in {p["name"] for p in spec["containers"][0]["ports"]}


def test_triton_init_script_fills_the_real_config(default, tmp_path):
    """Run the rendered script on model_repo/ itself: every parameter of config.pbtxt is set."""
    (config_map,) = [d for d in default if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-triton")]
    config = (MODEL_REPO / "vita_generator" / "config.pbtxt").read_text()
    parameters = set(re.findall(r'parameters: \{ key: "(\w+)"', config))
    assert parameters == set(config_map["data"]) - {"fill-model-repo.sh"}
    params, dest = tmp_path / "params", tmp_path / "repo"
    params.mkdir(), dest.mkdir()
    for key, value in config_map["data"].items():
        (params / key).write_text(value)
    env = {**os.environ, "SOURCE_REPO": str(MODEL_REPO), "MODEL_REPO": str(dest), "PARAMS": str(params)}
    subprocess.run(["sh", str(params / "fill-model-repo.sh")], env=env, check=True, capture_output=True, timeout=30)
    filled = (dest / "vita_generator" / "config.pbtxt").read_text()
    for key in parameters:
        assert f'key: "{key}" value: {{ string_value: "{config_map["data"][key]}" }}' in filled
    assert 'key: "lm_dir" value: { string_value: "/checkpoints/lm" }' in filled
    assert (dest / "vita_generator" / "1" / "model.py").exists()


def test_schema_and_readme_match_values_yaml():
    spec = importlib.util.spec_from_file_location("values_docs", CHART / "hack" / "values_docs.py")
    values_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(values_docs)
    schema, readme = values_docs.render()
    assert (CHART / "values.schema.json").read_text() == schema, "run python charts/vita-audio/hack/values_docs.py"
    assert (CHART / "README.md").read_text() == readme, "run python charts/vita-audio/hack/values_docs.py"


def test_notes_tell_how_to_call():
    result = helm("install", "vita", str(CHART), "--dry-run=client", "--namespace", "voice", check=False)
    assert result.returncode == 0, result.stderr
    assert "vita-audio call --target" in result.stdout and "vita-vita-audio-gateway" in result.stdout


def test_service_args_parse_with_the_real_cli(rendered):
    """The rendered args are accepted by `vita-audio serve` itself (a renamed flag fails here)."""
    import argparse

    from vitaserve.cli import serve

    parser = argparse.ArgumentParser(exit_on_error=False)
    serve.subparser_init(parser.add_subparsers(dest="command"))
    docs, values = rendered
    deployments = by_kind(docs, "Deployment")
    for component in SERVICES:
        (c,) = deployments[component]["spec"]["template"]["spec"]["containers"]
        args = parser.parse_args(c["args"])
        assert (args.service, args.port, args.grace_s) == (component, values[component]["port"], values["maxCallSeconds"])
        assert args.metrics_port == values["metrics"]["port"]


@pytest.mark.parametrize("engine", ["hpa", "keda"])
def test_every_metric_the_chart_names_is_exported(engine):
    """HPA, KEDA, PodMonitor, alert rules and dashboard, rendered by helm template: every metric
    name they read is one the services (common/metrics.py), the Triton model or Triton export."""
    docs = render(*MONITORING, "--set", f"autoscaling.engine={engine}")
    found = monitoring_queries(docs)
    kinds = {where.split("/")[0] for where in found}
    assert {"PodMonitor", "PrometheusRule", "ConfigMap",
            "HorizontalPodAutoscaler" if engine == "hpa" else "ScaledObject"} <= kinds
    known = exported_series_names()
    for where, queries in found.items():
        for query in queries:
            names = metric_names_in(query)
            assert names <= known, f"{where}: {sorted(names - known)} is exported by nothing ({query})"
    named = set().union(*(metric_names_in(q) for qs in found.values() for q in qs))
    # what the issue asks the alerts and the dashboard to cover
    assert {"vita_gateway_first_audio_ms_bucket", "vita_gateway_errors_total", "vita_generator_queue_depth",
            "vita_decoder_playback_slack_s_bucket"} <= named


def test_metric_name_check_catches_a_misspelt_name():
    """The check above can fail: a name one letter off, or a histogram queried without _bucket."""
    known = exported_series_names()
    assert not metric_names_in('rate(vita_gateway_error_total{code="x"}[5m])') <= known
    assert not metric_names_in("histogram_quantile(0.9, rate(vita_gateway_first_audio_ms[5m]))") <= known
    assert metric_names_in('sum(vita_gateway_turns_total{pod=~"vita_x_.*"})') == {"vita_gateway_turns_total"}


def test_alert_rules_and_dashboard_render_only_when_asked():
    docs = render()
    assert not [d for d in docs if d["kind"] == "PrometheusRule"]
    assert not [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
    docs = render(*MONITORING, "--set", "metrics.prometheusRule.firstAudioP95Ms=1234")
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert alerts["VitaAudioFirstAudioSlow"]["expr"].endswith("> 1234")
    assert all(r["for"] and r["labels"]["severity"] and r["annotations"]["summary"] for r in alerts.values())
    (dashboard,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["vita-audio.json"])["uid"] == "vita-audio"
    assert [d for d in render("--set", "metrics.prometheusRule.enabled=true") if d["kind"] == "PrometheusRule"]


def test_internal_servers_age_their_connections(default):
    deployments = by_kind(default, "Deployment")
    for component in ("encoder", "decoder"):
        (c,) = deployments[component]["spec"]["template"]["spec"]["containers"]
        assert "--max-connection-age-s=300" in c["args"] and "--max-connection-age-grace-s=60" in c["args"]


def test_bundled_redis_persists_and_never_evicts():
    """README "Durability": the AOF on, its fsync policy and the memory limit from values, and
    noeviction always (a full Redis refuses writes; it never drops a session)."""
    def args_of(*values: str) -> dict[str, str]:
        spec = by_kind(render(*values), "StatefulSet")["redis"]["spec"]["template"]["spec"]
        (server,) = spec["containers"]
        flags = server["args"][1:]
        return dict(zip(flags[0::2], flags[1::2]))

    default = args_of()
    assert default["--appendonly"] == "yes" and default["--appendfsync"] == "everysec"
    assert default["--maxmemory"] == "1gb" and default["--maxmemory-policy"] == "noeviction"
    chosen = args_of("--set", "redis.appendfsync=always", "--set", "redis.maxmemory=512mb")
    assert (chosen["--appendfsync"], chosen["--maxmemory"], chosen["--maxmemory-policy"]) == (
        "always", "512mb", "noeviction")
    assert helm("template", "vita", str(CHART), "--set", "redis.appendfsync=sometimes", check=False).returncode != 0
