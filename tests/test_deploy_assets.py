"""What operators deploy and look at: alert rules, the dashboard, Kubernetes, Dockerfiles, compose, nginx.conf."""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.metrics import Metrics
from tests.front_support import RENDER, ROOT, free_port, render_front

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "amplitude-profile-proxy.json"
RULES = DEPLOY / "prometheus" / "alerts.yml"
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))
BIN = Path(sys.executable).parent
#: Values for Grafana's variables when a dashboard query is checked as plain PromQL.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$upstream_limit": "600"}
BRAZE_FAILURES = {"408", "429", "502", "503", "504", "529"}


def tool(name: str) -> str:
    found = shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)
    if found is None:
        pytest.fail(f"{name} is not installed: `make install` / `make system-deps` install it")
    return found


def run(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)


def service_series() -> set[str]:
    """Every series name the service's /metrics can show."""
    names = set()
    for family in Metrics().registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        names.update(family.name + suffix for suffix in suffixes)
    return names


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel.get("targets", [])]


def as_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable the check does not know: {expr}"
    return expr


def test_promtool_accepts_the_alert_rules_and_their_unit_tests():
    promtool = tool("promtool")
    checked = run(promtool, "check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = run(promtool, "test", "rules", "alerts.test.yml", cwd=RULES.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_promtool_accepts_every_dashboard_query(tmp_path):
    queries = dashboard_queries()
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{n}", "expr": as_promql(expr)} for n, (_, expr) in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    checked = run(tool("promtool"), "check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(queries)} rules found" in checked.stdout


def test_queries_and_rules_use_only_metrics_the_service_exposes():
    exposed = service_series()
    texts = [expr for _, expr in dashboard_queries()]
    texts += [rule["expr"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    used = {name for text in texts for name in re.findall(r"\bproxy_[a-z_]+", text)}
    assert used and used <= exposed, used - exposed


def test_the_dashboard_has_the_panels_an_operator_of_a_send_needs():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    assert [v["name"] for v in dashboard["templating"]["list"]][:1] == ["datasource"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
    queries = dashboard_queries()
    joined = "\n".join(expr for _, expr in queries)
    for needed in (
        "sum by (status) (rate(proxy_requests_total",  # answers by status
        "sum by (outcome) (rate(proxy_cache_lookups_total",  # cache outcomes
        'proxy_cache_lookups_total{outcome=~"hit|stale|negative"}',  # hit ratio
        "sum(rate(proxy_upstream_calls_total[$__rate_interval])) * 60",  # upstream calls per minute
        "vector($upstream_limit)",  # ... against the limit
        "proxy_budget_tokens",
        "proxy_budget_turned_away_total",
        "proxy_circuit_state",
        "proxy_redis_available",
        "histogram_quantile(0.99, sum by (le) (rate(proxy_request_duration_seconds_bucket",
        "max by (cohort) (proxy_cohort_members)",  # members per cohort
        "min by (cohort) (proxy_cohort_last_batch_age_seconds",  # age of each cohort's last batch
        "sum by (outcome) (rate(proxy_cohort_batches_total",  # cohort batches by outcome
        "max by (cohort) (proxy_cohort_authoritative)",  # authoritative per cohort
    ):
        assert needed in joined, needed
    shares = [expr for title, expr in queries if "failure share" in title.lower()]
    assert shares
    for expr in shares:
        statuses = re.search(r'status=~"([0-9|]+)"', expr)
        assert statuses is not None and set(statuses.group(1).split("|")) == BRAZE_FAILURES
        assert "/ sum(rate(proxy_requests_total[" in expr  # over all answers


def test_alerts_cover_the_readme_advice():
    rules = {rule["alert"]: rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    assert 'outcome="misconfigured"' in rules["AmplitudeKeyRejected"]["expr"]
    assert "proxy_budget_turned_away_total" in rules["BudgetTurningAwayRequests"]["expr"]
    assert "proxy_circuit_state" in rules["CircuitOpen"]["expr"]
    assert "proxy_redis_available" in rules["RedisDown"]["expr"] and "== 0" in rules["RedisDown"]["expr"]
    shared_file = rules["SharedStateFileDown"]["expr"]
    assert "proxy_shared_file_available" in shared_file and "== 0" in shared_file
    assert "proxy_budget_tokens" in rules["BudgetSaturated"]["expr"] and rules["BudgetSaturated"]["for"] == "5m"
    # A real-time cohort silent past COHORT_REALTIME_MAX_SILENCE_SECONDS (the service's gauge), and a cohort whose
    # membership is not answered from its webhooks, each per cohort.
    silent = rules["RealtimeCohortSilent"]["expr"]
    assert "proxy_cohort_silent" in silent and "by (cohort)" in silent and "== 1" in silent
    kept = rules["CohortNotAuthoritative"]["expr"]
    assert "proxy_cohort_authoritative" in kept and "by (cohort)" in kept and "== 0" in kept
    for rule in rules.values():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_kubernetes_manifests_validate():
    result = run(tool("kubernetes-validate"), "--strict", "--quiet", *map(str, K8S))
    assert result.returncode == 0, result.stdout + result.stderr


def _k8s_objects() -> dict[str, dict]:
    return {
        f"{doc['kind']}/{doc['metadata']['name']}": doc
        for path in K8S
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    }


def test_kubernetes_has_probes_resources_pdb_secret_redis_and_room_to_drain():
    objects = _k8s_objects()
    deployment = objects["Deployment/amplitude-profile-proxy"]
    pod = deployment["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"front", "service"}
    probes = json.dumps([c.get(kind) for c in containers.values() for kind in ("livenessProbe", "readinessProbe")])
    assert "/healthz" in probes and "/readyz" in probes
    for container in containers.values():
        assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert {"secretRef": {"name": "amplitude-profile-proxy"}} in containers["service"]["envFrom"]
    assert "Secret/amplitude-profile-proxy" in objects
    # The pre-stop wait and gunicorn's graceful timeout fit in the grace period.
    pre_stop = int(containers["service"]["lifecycle"]["preStop"]["exec"]["command"][-1])
    graceful = int(re.search(r"^graceful_timeout = (\d+)", (ROOT / "gunicorn.conf.py").read_text(), re.M).group(1))
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + graceful + 5
    pdb = objects["PodDisruptionBudget/amplitude-profile-proxy"]
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert deployment["spec"]["replicas"] > pdb["spec"]["minAvailable"]
    config = objects["ConfigMap/amplitude-profile-proxy"]["data"]
    assert config["REDIS_URL"].startswith("redis://amplitude-profile-redis:")
    assert "Service/amplitude-profile-redis" in objects and "Deployment/amplitude-profile-redis" in objects
    # Only the front is reachable: gunicorn on loopback, the Service pointing at the front's port.
    assert config["HOST"] == "127.0.0.1" and config["FORWARDED_ALLOW_IPS"] == "127.0.0.1"
    front_ports = {p["name"]: p["containerPort"] for p in containers["front"]["ports"]}
    assert objects["Service/amplitude-profile-proxy"]["spec"]["ports"][0]["targetPort"] in front_ports
    assert "ports" not in containers["service"]


def test_dockerfiles_pass_hadolint():
    result = run(tool("hadolint"), "Dockerfile", "deploy/nginx/Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_publishes_only_the_front():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"front", "proxy", "redis"}
    assert [name for name, service in services.items() if service.get("ports")] == ["front"]
    proxy_env = services["proxy"]["environment"]
    upstream_host, _, upstream_port = services["front"]["environment"]["FRONT_UPSTREAM"].rpartition(":")
    assert upstream_host == "proxy" and upstream_port == proxy_env["PORT"]
    subnet = ipaddress.ip_network(compose["networks"]["internal"]["ipam"]["config"][0]["subnet"])
    trusted = ipaddress.ip_network(proxy_env["FORWARDED_ALLOW_IPS"])
    assert trusted.subnet_of(subnet)  # type: ignore[arg-type]
    assert services["front"]["build"]["dockerfile"] == "deploy/nginx/Dockerfile"


@pytest.mark.parametrize(
    "extra",
    [[], ["--real-ip-from", "10.0.0.0/8,192.0.2.1"], ["--header-timeout", "3", "--worker-processes", "2"]],
)
def test_rendered_nginx_conf_passes_nginx_t(tmp_path, extra):
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.fail("nginx is not installed: run `make system-deps`")
    conf = render_front(tmp_path / "front", free_port(), "127.0.0.1:8001", *extra)
    result = run(nginx, "-t", "-p", str(conf.parent), "-c", str(conf), "-e", str(conf.parent / "error.log"))
    assert result.returncode == 0, result.stdout + result.stderr
    text = conf.read_text()
    assert "${" not in text
    assert "limit_conn" not in text  # Braze sends from few addresses: no per-address connection cap
    assert RENDER.exists()
