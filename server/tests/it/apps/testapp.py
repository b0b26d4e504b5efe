#!/usr/bin/env python3
"""A tiny HTTP/1.1 app for the URL-service tests (server/tests/it/url.rs). Standard library only.

Listens on 127.0.0.1:$PORT. Routes:
  GET  /                 "hello GREETING pid=PID\n" (GREETING from the environment, default "hi")
  GET  /headers          the request headers as JSON (lower-case names)
  GET  /conn             the peer's port of this connection (to see upstream keep-alive reuse)
  GET  /bytes/N          N bytes of a fixed pseudo-random stream (seed 7), with Content-Length
  GET  /chunked/N        the same N bytes, sent chunked (no Content-Length)
  POST /upload           reads the body (Content-Length or chunked); answers {"len": L, "sha256": H}
  POST /stall            never reads the body; answers after $STALL_SECS (default 30) seconds
  GET  /slow             answers after 30 seconds
  GET  /ws               WebSocket echo (text and binary), answers pings, echoes the close
"""
import base64
import hashlib
import http.server
import json
import os
import random
import socketserver
import struct
import sys
import time

GREETING = os.environ.get("GREETING", "hi")
PORT = int(os.environ.get("PORT", "5000"))
CHUNK = 64 * 1024


def stream_bytes(n):
    """Yields n bytes of the fixed stream in chunks."""
    rng = random.Random(7)
    left = n
    while left > 0:
        k = min(CHUNK, left)
        yield rng.randbytes(k)
        left -= k


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        sys.stdout.write("%s %s\n" % (self.command, self.path))
        sys.stdout.flush()

    def send_body(self, status, body, ctype="text/plain"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def read_body(self):
        """Yields the request body in pieces (Content-Length or chunked)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                left = size
                while left > 0:
                    piece = self.rfile.read(min(CHUNK, left))
                    if not piece:
                        raise ConnectionError("body cut short")
                    left -= len(piece)
                    yield piece
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left > 0:
                piece = self.rfile.read(min(CHUNK, left))
                if not piece:
                    raise ConnectionError("body cut short")
                left -= len(piece)
                yield piece

    def do_GET(self):
        if self.path == "/":
            self.send_body(200, ("hello %s pid=%d\n" % (GREETING, os.getpid())).encode())
        elif self.path == "/conn":
            self.send_body(200, ("%d\n" % self.client_address[1]).encode())
        elif self.path == "/headers":
            h = {k.lower(): v for k, v in self.headers.items()}
            self.send_body(200, json.dumps(h).encode(), "application/json")
        elif self.path.startswith("/bytes/"):
            n = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            for piece in stream_bytes(n):
                self.wfile.write(piece)
        elif self.path.startswith("/chunked/"):
            n = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in stream_bytes(n):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/slow":
            time.sleep(30)
            self.send_body(200, b"late\n")
        elif self.path == "/ws":
            self.websocket_echo()
        else:
            self.send_body(404, b"not found\n")

    def do_POST(self):
        if self.path == "/upload":
            h = hashlib.sha256()
            n = 0
            for piece in self.read_body():
                h.update(piece)
                n += len(piece)
            self.send_body(200, json.dumps({"len": n, "sha256": h.hexdigest()}).encode(),
                           "application/json")
        elif self.path == "/stall":
            time.sleep(float(os.environ.get("STALL_SECS", "30")))
            self.close_connection = True
            self.send_body(200, b"stalled\n")
        else:
            self.send_body(404, b"not found\n")

    def websocket_echo(self):
        key = self.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(
            hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        r, w = self.rfile, self.wfile
        while True:
            head = r.read(2)
            if len(head) < 2:
                return
            op = head[0] & 0x0F
            masked = head[1] & 0x80
            ln = head[1] & 0x7F
            if ln == 126:
                ln = struct.unpack(">H", r.read(2))[0]
            elif ln == 127:
                ln = struct.unpack(">Q", r.read(8))[0]
            mask = r.read(4) if masked else b"\0\0\0\0"
            data = bytearray(r.read(ln))
            for i in range(len(data)):
                data[i] ^= mask[i % 4]
            reply_op = {1: 1, 2: 2, 8: 8, 9: 10}.get(op)
            if reply_op is None:
                continue
            if len(data) < 126:
                hdr = bytes([0x80 | reply_op, len(data)])
            elif len(data) < 65536:
                hdr = bytes([0x80 | reply_op, 126]) + struct.pack(">H", len(data))
            else:
                hdr = bytes([0x80 | reply_op, 127]) + struct.pack(">Q", len(data))
            w.write(hdr + bytes(data))
            w.flush()
            if op == 8:
                return


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512


if __name__ == "__main__":
    srv = Server(("127.0.0.1", PORT), Handler)
    sys.stdout.write("testapp listening on 127.0.0.1:%d pid=%d\n" % (PORT, os.getpid()))
    sys.stdout.flush()
    srv.serve_forever()
