"""The gRPC callout clusters of a scenario run in real Envoy (host-tests/src/envoy.rs starts it).

One grpcio server per cluster (Envoy's gRPC client names the cluster only in `:authority`, which
grpcio does not show a handler), each answering any method as a bidirectional stream: it reads
every message until the caller half-closes, then answers as the runner says. The runner speaks
one JSON line per command on stdin and reads one JSON line back on stdout:

  start:   {"clusters": [names]}              -> {"ports": {name: port}}
  answer:  {"answers": {name: answer}}        -> {"ok": true}
  take:    {"take": true}                     -> {"calls": [{cluster, path, metadata, body_b64}]}

An answer: {"status": 0, "message": "", "body_b64": "", "initial_metadata": [[k, v]],
"trailers": [[k, v]], "delay_ms": 0}.
"""

import base64
import json
import sys
import threading
import time
from concurrent import futures

import grpc

lock = threading.Lock()
answers = {}
calls = []


class Handler(grpc.GenericRpcHandler):
    def __init__(self, cluster):
        self.cluster = cluster

    def service(self, details):
        cluster = self.cluster

        def handle(request_iterator, context):
            body = b"".join(request_iterator)
            metadata = [[k, v if isinstance(v, str) else base64.b64encode(v).decode()] for k, v in context.invocation_metadata()]
            with lock:
                calls.append(
                    {"cluster": cluster, "path": details.method, "metadata": metadata, "body_b64": base64.b64encode(body).decode()}
                )
                answer = answers.get(cluster, {})
            if answer.get("delay_ms"):
                time.sleep(answer["delay_ms"] / 1000)
            if answer.get("initial_metadata"):
                context.send_initial_metadata([tuple(p) for p in answer["initial_metadata"]])
            message = base64.b64decode(answer.get("body_b64", ""))
            if message:
                yield message
            if answer.get("trailers"):
                context.set_trailing_metadata([tuple(p) for p in answer["trailers"]])
            status = answer.get("status", 0)
            if status != 0:
                context.set_code(next(c for c in grpc.StatusCode if c.value[0] == status))
            if answer.get("message"):
                context.set_details(answer["message"])

        return grpc.stream_stream_rpc_method_handler(handle)


def reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    servers = []
    for line in sys.stdin:
        command = json.loads(line)
        if "clusters" in command:
            ports = {}
            for name in command["clusters"]:
                server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
                server.add_generic_rpc_handlers((Handler(name),))
                ports[name] = server.add_insecure_port("127.0.0.1:0")
                server.start()
                servers.append(server)
            reply({"ports": ports})
        elif "answers" in command:
            with lock:
                answers.update(command["answers"])
            reply({"ok": True})
        elif "take" in command:
            with lock:
                taken = list(calls)
                calls.clear()
            reply({"calls": taken})
    for server in servers:
        server.stop(0)


if __name__ == "__main__":
    main()
