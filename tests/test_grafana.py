"""k8s/80-grafana-dashboard.yaml: a ConfigMap that Grafana's dashboard sidecar loads, holding a valid
dashboard model whose every PromQL expression names only metrics and labels that moco_ray exports
(moco_ray.metrics.VOCABULARY and its labels; `le` of the histograms)."""
import json
import re
from pathlib import Path

import pytest
import yaml

from moco_ray.metrics import LABELS, VOCABULARY

DASHBOARD = Path(__file__).resolve().parents[1] / "k8s" / "80-grafana-dashboard.yaml"
SAMPLES = {s: m for m in VOCABULARY for s in m.samples}
# The PromQL functions and aggregations the dashboard may use; anything else is a metric name.
FUNCTIONS = {"sum", "max", "min", "avg", "count", "rate", "irate", "increase", "histogram_quantile",
             "clamp_min", "label_values"}
KEYWORDS = {"by", "without", "on", "ignoring", "and", "or", "unless", "bool"}


@pytest.fixture(scope="module")
def config_map():
    (doc,) = [d for d in yaml.safe_load_all(DASHBOARD.read_text()) if d]
    return doc


@pytest.fixture(scope="module")
def dashboard(config_map):
    (text,) = config_map["data"].values()
    return json.loads(text)


def names_in(expr):
    """(metric names, label names) of a PromQL expression."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)         # label values and strings
    expr = re.sub(r"\[[^\]]*\]", "", expr)                   # range selectors: [$__rate_interval]
    expr = re.sub(r"\$\{?\w+\}?", "", expr)                  # dashboard variables
    labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"\"", expr))
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        labels |= {g.strip() for g in group.split(",") if g.strip()}
    expr = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    words = re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*(?:\s*\()?", expr)
    functions = {w.rstrip("( ") for w in words if w.endswith("(")}
    assert functions <= FUNCTIONS, f"{expr}: unexpected functions {functions - FUNCTIONS}"
    metrics = {w for w in words if not w.endswith("(") and w not in KEYWORDS}
    return metrics, labels


def expressions(dashboard):
    exprs = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            exprs.append((f"variable {var['name']}", var["definition"]))
    return exprs


def test_the_checker_catches_unknown_metrics_and_labels():
    assert names_in('histogram_quantile(0.95, sum by (run, le) (rate(moco_step_time_seconds_bucket'
                    '{run=~"$run"}[$__rate_interval])))') == ({"moco_step_time_seconds_bucket"}, {"run", "le"})
    assert names_in('max by (pod) (moco_lr{job="x", rank="0"})') == ({"moco_lr"}, {"pod", "job", "rank"})
    assert names_in("label_values(moco_images_total, run)") == ({"moco_images_total", "run"}, set())


def test_every_expression_names_only_exported_metrics_and_labels(dashboard):
    used = set()
    for where, expr in expressions(dashboard):
        metrics, labels = names_in(expr)
        if where.startswith("variable"):   # label_values(METRIC, LABEL)
            metrics, labels = metrics - set(LABELS), labels | (metrics & set(LABELS))
        assert metrics and metrics <= set(SAMPLES), f"{where}: {expr}: not exported: {metrics - set(SAMPLES)}"
        assert labels <= set(LABELS) | {"le"}, f"{where}: {expr}: labels {labels - set(LABELS) - {'le'}}"
        assert "le" not in labels or all(m.endswith("_bucket") for m in metrics), f"{where}: le needs buckets"
        used |= {SAMPLES[m].key for m in metrics}
    wanted = {"images", "step_time_s", "data_wait_s", "loss", "lr", "knn_top1", "lincls_top1", "world_size",
              "restarts", "queue_age_steps", "gpu_memory_bytes"}
    assert wanted <= used, f"no panel for {wanted - used}"


def test_the_config_map_is_what_the_grafana_sidecar_loads(config_map):
    assert config_map["kind"] == "ConfigMap" and config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    (name,) = config_map["data"]
    assert name.endswith(".json")


def test_the_json_is_a_valid_dashboard_model(dashboard):
    for key, kind in (("uid", str), ("title", str), ("schemaVersion", int), ("panels", list),
                      ("templating", dict), ("time", dict)):
        assert isinstance(dashboard.get(key), kind), key
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids, cells = set(), set()
    for p in dashboard["panels"]:
        assert isinstance(p["id"], int) and p["id"] not in ids, p.get("title")
        ids.add(p["id"])
        assert p["type"] == "timeseries" and p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for cell in ((x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])):
            assert cell not in cells, f"{p['title']} overlaps another panel"
            cells.add(cell)
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(set(refs)) == len(refs), p["title"]
        for t in p["targets"]:
            assert t["expr"] and t["datasource"] == p["datasource"]
        assert p["fieldConfig"]["defaults"]["unit"]
    for name, v in variables.items():
        if v["type"] == "query":
            assert v["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert re.search(r"\$" + name + r"\b", json.dumps(dashboard["panels"])), f"${name} is never used"
