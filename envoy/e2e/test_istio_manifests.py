"""The Istio manifests we document are valid: each WasmPlugin validates against Istio's CRD schema
(shared/data/istio-wasmplugin-crd.yaml), and its pluginConfig is accepted by the real module in
real Envoy (an invalid plugin configuration makes Envoy refuse to start)."""

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
