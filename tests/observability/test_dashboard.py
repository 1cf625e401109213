"""The Grafana dashboard (deploy/grafana/pony-platform.json): valid dashboard JSON whose panels do not overlap, and
every metric it queries is one we export (pony_*, and the RPC metrics under py-grpc-prometheus's grpc_server_* names)
or one a real tritonserver exports (nv_*)."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from celery import Celery
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from pony_common import celery_metrics, metrics
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "pony-platform.json"
# Metric names, not label names: grpc_service, grpc_method and grpc_code are labels of the grpc_server_* metrics.
METRIC = re.compile(r"\b((?:pony|nv|grpc_server)_[a-z0-9_]+)\b")
OURS = ("pony_", "grpc_server_")
# Exported by a Triton with GPUs only (this machine has none): NVIDIA's documented GPU metric names.
TRITON_GPU_METRICS = {"nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes"}
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _queries(dash: dict) -> list[str]:
    out = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        query = var.get("query")
        if var["type"] == "query":
            out.append(query["query"] if isinstance(query, dict) else query)
    return out


def _ours() -> set[str]:
    """Sample names our processes can export: every family in the registry, plus the broker collector's."""
    assert metrics.RPC_HANDLED and celery_metrics.TASK_SECONDS  # imported: their metrics are registered
    families = list(REGISTRY.collect())
    families += celery_metrics.QueueDepthCollector(Celery("probe"), []).describe()
    names = set()
    for family in families:
        if family.name.startswith(OURS):
            names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return names


def test_dashboard_is_grafana_json_with_non_overlapping_panels_on_our_datasource() -> None:
    dash = _dashboard()
    assert dash["uid"] == "pony-platform" and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & mine, f"panel {panel['title']!r} overlaps another"
        cells |= mine
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}"
            assert all(t["expr"].strip() and t["refId"] for t in panel["targets"])
    titles = " ".join(p["title"] for p in dash["panels"] if p["type"] == "row")
    assert "Curation workflow" in titles and "Sampler" in titles


def test_every_pony_and_grpc_metric_the_dashboard_queries_is_one_we_export() -> None:
    queries = _queries(_dashboard())
    assert all(METRIC.search(q) for q in queries), [q for q in queries if not METRIC.search(q)]
    used = {m for q in queries for m in METRIC.findall(q) if m.startswith(OURS)}
    unknown = used - _ours()
    assert not unknown, f"the dashboard queries metrics nobody exports: {sorted(unknown)}"
    # It covers the workflow, the services and the sampler.
    for name in (
        "grpc_server_handling_seconds_bucket",
        "grpc_server_handled_total",
        "grpc_server_started_total",
        "pony_batch_size_bucket",
        "pony_item_failures_total",
        "pony_model_info",
        "pony_model_load_seconds",
        "pony_celery_queue_depth",
        "pony_celery_task_seconds_bucket",
        "pony_celery_task_retries_total",
        "pony_celery_task_failures_total",
        "pony_sampler_queue_wait_seconds_bucket",
        "pony_sampler_compute_seconds_bucket",
    ):
        assert name in used, name
    # The RPC panels group and filter by the convention's labels.
    rpc = [q for q in queries if "grpc_server_" in q]
    assert rpc and all("grpc_service" in q and not re.search(r"\b(service|method|code)\b\s*[=!~,)]", q) for q in rpc)


MODEL_PY = """import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy())])
            for r in requests
        ]
"""
CONFIG = """name: "identity"
backend: "python"
max_batch_size: 4
dynamic_batching {}
input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""


@pytest.mark.triton
def test_every_triton_metric_the_dashboard_queries_is_one_tritonserver_exports(tmp_path: Path) -> None:
    runner = pytest.importorskip(
        "services.sampler.triton_server", reason="the sampler's tritonserver runner is not in this checkout"
    )
    repo = tmp_path / "repo" / "identity"
    (repo / "1").mkdir(parents=True)
    (repo / "config.pbtxt").write_text(CONFIG)
    (repo / "1" / "model.py").write_text(MODEL_PY)
    http, grpc_port, metrics_port = free_port(), free_port(), free_port()
    cmd = [
        str(runner.wheel_dir() / "bin" / "tritonserver"),
        f"--model-repository={tmp_path / 'repo'}",
        f"--backend-directory={runner.prepare_backends(tmp_path / 'backends')}",
        "--model-control-mode=explicit",
        "--load-model=identity",
        f"--http-port={http}",
        f"--grpc-port={grpc_port}",
        f"--metrics-port={metrics_port}",
        "--allow-gpu-metrics=false",
    ]
    log = tmp_path / "tritonserver.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=runner.stub_environment(), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/identity/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
            time.sleep(0.25)
        # The metrics endpoint may come up a moment after the model is ready: poll it too.
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
                    text = r.read().decode()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
                time.sleep(0.25)
    finally:
        proc.terminate()
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    exported |= {f.name for f in text_string_to_metric_families(text)}
    used = {m for q in _queries(_dashboard()) for m in METRIC.findall(q) if m.startswith("nv_")}
    assert "nv_inference_queue_duration_us" in used and "nv_inference_compute_infer_duration_us" in used
    unknown = used - exported - TRITON_GPU_METRICS
    assert not unknown, f"the dashboard queries Triton metrics tritonserver does not export: {sorted(unknown)}"


def test_dashboard_renders_as_a_configmap_for_grafanas_sidecar() -> None:
    from tests.deploy.manifests import kubectl, render_dir

    if kubectl() is None:
        pytest.skip("kubectl is not installed on this machine; the deploy renders use it")
    (cm,) = render_dir(DASHBOARD.parent)
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["pony-platform.json"]) == _dashboard()
