"""The Kubernetes manifests in deploy/k8s/ are valid against the Kubernetes schemas
(``kubernetes-validate``, strict: unknown fields are errors) and agree with fleetlm itself: every
container's args parse with the real ``fleetlm`` CLI, each ``--kv-transfer-config`` is a valid
``KVTransferConfig``, decode workers trust exactly the prefill pods' advertised K/V addresses, the
router lists every pod of both groups, probes hit /health and /health/ready, and the grace period
covers ``--shutdown-timeout``."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from fleetlm.disagg.config import KVTransferConfig
from fleetlm.entrypoints.cli import build_parser

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
VERSION = "1.30"


def docs() -> list[dict]:
    out = []
    for f in sorted(K8S.glob("*.yaml")):
        if f.name != "kustomization.yaml":
            out += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return out


def workloads() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs() if d["kind"] in ("Deployment", "StatefulSet")}


def container(w: dict) -> dict:
    return w["spec"]["template"]["spec"]["containers"][0]


def parsed_args(w: dict):
    args = [a.replace("$(POD_NAME)", "fleetlm-prefill-0") for a in container(w)["args"]]
    return build_parser().parse_args(args)


@pytest.mark.parametrize("doc", docs(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_is_valid_against_the_kubernetes_schema(doc):
    kubernetes_validate.validate(doc, VERSION, strict=True)


def test_a_broken_manifest_is_caught():
    bad = workloads()["fleetlm-decode"]
    bad = yaml.safe_load(yaml.safe_dump(bad))
    container(bad)["readinessProbe"]["httpGet"]["paht"] = "/health/ready"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSION, strict=True)


def test_kustomization_lists_every_manifest():
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(k["resources"]) == sorted(f.name for f in K8S.glob("*.yaml") if f.name != "kustomization.yaml")


def test_workers_args_parse_and_roles_agree():
    w = workloads()
    pre, dec = w["fleetlm-prefill"], w["fleetlm-decode"]
    p_args, d_args = parsed_args(pre), parsed_args(dec)
    p_cfg, d_cfg = KVTransferConfig.parse(p_args.kv_transfer_config), KVTransferConfig.parse(d_args.kv_transfer_config)
    assert p_cfg.role == "producer" and d_cfg.role == "consumer" and p_cfg.transport == d_cfg.transport
    n_prefill = pre["spec"]["replicas"]
    port = p_cfg.address.rpartition(":")[2]
    advertised = [container(pre)["args"][-1].split('"advertise_address": "')[1].split('"')[0]
                  .replace("$(POD_NAME)", f"fleetlm-prefill-{i}") for i in range(n_prefill)]
    assert list(d_cfg.producers) == advertised == [f"fleetlm-prefill-{i}.fleetlm-prefill:{port}" for i in range(n_prefill)]
    kv_port = [p for p in container(pre)["ports"] if p["name"] == "kv"][0]["containerPort"]
    assert int(port) == kv_port


def test_router_lists_every_worker_pod():
    w = workloads()
    args = parsed_args(w["fleetlm-router"])
    assert args.pd
    assert args.prefill == [f"http://fleetlm-prefill-{i}.fleetlm-prefill:8000"
                            for i in range(w["fleetlm-prefill"]["spec"]["replicas"])]
    assert args.decode == [f"http://fleetlm-decode-{i}.fleetlm-decode:8000"
                           for i in range(w["fleetlm-decode"]["spec"]["replicas"])]


@pytest.mark.parametrize("name", ["fleetlm-prefill", "fleetlm-decode", "fleetlm-router"])
def test_probes_and_graceful_termination(name):
    w = workloads()[name]
    c, args = container(w), parsed_args(w)
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    grace = w["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert args.shutdown_timeout <= grace <= args.shutdown_timeout + 10  # drain, then a few seconds to exit
    if name != "fleetlm-router":
        assert c["startupProbe"]["httpGet"]["path"] == "/health/ready"
        assert c["livenessProbe"]["timeoutSeconds"] > args.health_timeout  # /health may take that long
