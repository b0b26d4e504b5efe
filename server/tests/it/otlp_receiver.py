# An OTLP/HTTP log receiver for server/tests/it/log_export.rs: decodes every request with the
# OFFICIAL protobuf definitions (PyPI `opentelemetry-proto`), so a wrong field number or type in
# the server's exporter shows up here, not in a copy of our own code.
#
#   python3 otlp_receiver.py OUT MODE_FILE [PORT] [CERT KEY]
#
# Listens on 127.0.0.1:PORT (0: any free port; the port is printed as the first stdout line),
# over TLS if CERT and KEY are given. Every request is one JSON line in OUT:
#   {"kind": "request", "path", "content_type", "authorization", "records", "status"}
# and, when it is answered 200, each of its log records one more:
#   {"kind": "record", "resource": {k: v}, "scope": name, "attributes": {k: v}, "body",
#    "time", "observed", "severity_number", "severity_text"}
# MODE_FILE (read at each request; missing = "ok") says how to answer: `ok` (200 with an
# ExportLogsServiceResponse), `status N` (N, e.g. 400 or 503, records not kept), `hang` (read
# the request, never answer).
import json
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)

OUT, MODE_FILE = sys.argv[1], sys.argv[2]
PORT = int(sys.argv[3]) if len(sys.argv) > 3 else 0
CERT_KEY = (sys.argv[4], sys.argv[5]) if len(sys.argv) > 5 else None
LOCK = threading.Lock()


def value(v):
    kind = v.WhichOneof("value")
    if kind == "bytes_value":
        return {"bytes": v.bytes_value.hex()}
    return getattr(v, kind) if kind else None


def attrs(kvs):
    return {kv.key: value(kv.value) for kv in kvs}


def write(rows):
    with LOCK, open(OUT, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a collector does

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        try:
            with open(MODE_FILE) as f:
                mode = f.read().split()
        except FileNotFoundError:
            mode = ["ok"]
        status = 200 if mode[0] == "ok" else (int(mode[1]) if mode[0] == "status" else 0)
        req = ExportLogsServiceRequest()
        req.ParseFromString(body)  # raises on anything that is not a valid request
        records = []
        for rl in req.resource_logs:
            res = attrs(rl.resource.attributes)
            for sl in rl.scope_logs:
                for r in sl.log_records:
                    records.append({
                        "kind": "record",
                        "resource": res,
                        "scope": sl.scope.name,
                        "scope_version": sl.scope.version,
                        "attributes": attrs(r.attributes),
                        "body": value(r.body),
                        "time": r.time_unix_nano,
                        "observed": r.observed_time_unix_nano,
                        "severity_number": r.severity_number,
                        "severity_text": r.severity_text,
                    })
        write([{
            "kind": "request",
            "path": self.path,
            "content_type": self.headers.get("Content-Type"),
            "authorization": self.headers.get("Authorization"),
            "records": len(records),
            "status": status,
        }] + (records if status == 200 else []))
        if mode[0] == "hang":
            time.sleep(3600)
            return
        if status == 200:
            out = ExportLogsServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
        else:
            out = json.dumps({"code": status, "message": "test receiver says no"}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


srv = Server(("127.0.0.1", PORT), Handler)
if CERT_KEY:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*CERT_KEY)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.serve_forever()
