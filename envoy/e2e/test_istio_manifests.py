"""The Istio manifests we document are valid: each WasmPlugin validates against Istio's CRD schema
(shared/data/istio-wasmplugin-crd.yaml), and its pluginConfig is accepted by the real module in
real Envoy (an invalid plugin configuration makes Envoy refuse to start)."""

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

import harness

ISTIO_DIR = harness.ROOT / "envoy" / "istio"
CRD = harness.ROOT.parent / "shared" / "data" / "istio-wasmplugin-crd.yaml"


def wasm_plugins():
    for path in sorted(ISTIO_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "WasmPlugin":
                yield pytest.param(doc, id=f"{path.name}:{doc['metadata']['name']}")


def crd_schema():
    if not CRD.exists():
        pytest.skip(f"{CRD} not present")
    crd = next(d for d in yaml.safe_load_all(CRD.read_text()) if d)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    return version["schema"]["openAPIV3Schema"]


def validate_spec(plugin):
    schema = crd_schema()
    jsonschema.validate({"spec": plugin["spec"]}, {
        "type": "object", "properties": {"spec": schema["properties"]["spec"]}, "required": ["spec"]})


def test_the_schema_check_can_fail():
    doc = next(iter(wasm_plugins())).values[0]
    broken = {**doc, "spec": {**doc["spec"], "phase": "BEFORE_EVERYTHING", "failStrategy": "MAYBE"}}
    with pytest.raises(jsonschema.ValidationError):
        validate_spec(broken)


def test_there_are_manifests():
    assert list(wasm_plugins()), "envoy/istio has no WasmPlugin"


@pytest.mark.parametrize("plugin", list(wasm_plugins()))
def test_wasm_plugin_matches_the_istio_crd(plugin):
    validate_spec(plugin)
    assert plugin["apiVersion"] == "extensions.istio.io/v1alpha1"
    assert plugin["spec"]["failStrategy"] == "FAIL_CLOSE", "money routes fail closed"


@pytest.mark.parametrize("plugin", list(wasm_plugins()))
def test_plugin_config_is_accepted_by_the_module_in_real_envoy(plugin, demo_api):
    spec = plugin["spec"]
    module = spec["url"].rsplit("/", 1)[-1].split(":")[0]
    env_names = [e["name"] for e in spec.get("vmConfig", {}).get("env", []) if e.get("valueFrom") == "HOST"]
    inline = {e["name"]: e["value"] for e in spec.get("vmConfig", {}).get("env", []) if "value" in e}
    config = spec.get("pluginConfig", {})
    # The one-module chain's stages each have their own configuration (and maybe state).
    sections = [next(iter(s.values())) for s in config["filters"]] if module == "firebreak_chain" else [config]
    state_clusters = {s["state"]["cluster"] for s in sections if isinstance(s.get("state"), dict) and s["state"].get("cluster")}
    clusters = [{"name": name, "type": "STATIC", "connect_timeout": "0.25s",
                 "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{
                     "endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                                 "port_value": harness.free_port()}}}}]}]}}
                for name in sorted(state_clusters)]
    envoy = harness.Envoy(
        [harness.wasm_filter(module, config, key_values=inline or None, host_env_keys=env_names)],
        demo_api.port, env={name: harness.DEMO_SECRET_B64 for name in env_names}, extra_clusters=clusters)
    try:
        configured = "firebreak chain configured" if module == "firebreak_chain" else f"firebreak {module} configured"
        assert configured in envoy.logs()
    finally:
        envoy.stop()


# ---- EnvoyFilters: the buffer filter before the wasm filters, and the path hardening ----

BUFFER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer"
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
HCM_NAME = "envoy.filters.network.http_connection_manager"


def envoy_filter_patches():
    """Every configPatch of every EnvoyFilter in envoy/istio/."""
    for path in sorted(ISTIO_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "EnvoyFilter":
                assert doc["apiVersion"] == "networking.istio.io/v1alpha3", path
                for patch in doc["spec"]["configPatches"]:
                    yield doc, patch


def buffer_patch():
    (patch,) = [p for _, p in envoy_filter_patches() if p["applyTo"] == "HTTP_FILTER"
                and p["patch"]["value"].get("name") == "envoy.filters.http.buffer"]
    return patch


def hcm_patch():
    (patch,) = [p for _, p in envoy_filter_patches() if p["applyTo"] == "NETWORK_FILTER"
                and p["match"]["listener"]["filterChain"]["filter"]["name"] == HCM_NAME]
    return patch


def test_the_buffer_filter_goes_first_on_the_sidecar_inbound():
    patch = buffer_patch()
    assert patch["match"]["context"] == "SIDECAR_INBOUND", "the money API's sidecar, inbound"
    assert patch["match"]["listener"]["filterChain"]["filter"]["name"] == HCM_NAME
    # Istio adds the WasmPlugins' filters before applying EnvoyFilter patches: INSERT_FIRST puts the
    # buffer ahead of every wasm filter.
    assert patch["patch"]["operation"] == "INSERT_FIRST"
    value = patch["patch"]["value"]
    assert value["typed_config"]["@type"] == BUFFER_TYPE
    assert 0 < value["typed_config"]["max_request_bytes"] <= 64 * 1024 * 1024
    # It selects the workloads the WasmPlugins protect.
    docs = {d["metadata"]["name"]: d for d, p in envoy_filter_patches() if p == patch}
    (doc,) = docs.values()
    labels = doc["spec"]["workloadSelector"]["labels"]
    protected = [p for p in wasm_plugins() if p.values[0]["spec"].get("selector")]
    assert any(p.values[0]["spec"]["selector"]["matchLabels"] == labels
               and p.values[0]["metadata"]["namespace"] == doc["metadata"]["namespace"] for p in protected)


def test_the_path_hardening_merges_into_the_inbound_connection_manager():
    patch = hcm_patch()
    assert patch["match"]["context"] == "SIDECAR_INBOUND"
    assert patch["patch"]["operation"] == "MERGE"
    config = patch["patch"]["value"]["typed_config"]
    assert config["@type"] == HCM_TYPE
    assert {k: v for k, v in config.items() if k != "@type"} == harness.HARDENED_HCM


def test_the_envoy_filter_patches_are_accepted_by_real_envoy(demo_api):
    """Both patches applied to a listener as Istio would (the buffer first, before the wasm
    filter; the connection manager merged): Envoy starts, and does what they say."""
    buffer = buffer_patch()["patch"]["value"]
    hardening = {k: v for k, v in hcm_patch()["patch"]["value"]["typed_config"].items() if k != "@type"}
    sig = harness.wasm_filter("request_signature", harness.signature_config(), host_env_keys=[harness.DEMO_KEY_ENV])
    envoy = harness.Envoy([buffer, sig], demo_api.port, hcm_options=hardening)
    try:
        filters = harness.hcm(json.loads(envoy.config_path.read_text()))["http_filters"]
        assert [f["name"] for f in filters][:2] == ["envoy.filters.http.buffer", "envoy.filters.http.wasm"]
        assert envoy.request("GET", "/healthz").status == 200
        assert envoy.request("GET", "/v1%2Fledger").status == 400, "escaped slashes refused"
        assert envoy.request("GET", "/healthz", [("x_firebreak_principal", "demo-client")]).status == 400, \
            "underscore headers refused"
        too_big = envoy.request("POST", "/v1/transfers", [("content-type", "application/json")],
                                b"x" * (buffer["typed_config"]["max_request_bytes"] + 1))
        assert too_big.status == 413, "the buffer filter holds (and bounds) the whole request"
        assert "firebreak request_signature configured" in envoy.logs()
    finally:
        envoy.stop()
