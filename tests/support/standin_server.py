"""STAND-IN for `edgepack serve` in agent tests that need many fast server starts.

Not the real server: it loads no model. It serves /healthz, /readyz and
/v1/chat/completions for a bundle, and reads its behaviour from the bundle's server.toml
table ``[standin]``: ``ready = false`` never becomes ready, ``crash = true`` exits at once,
``answer = "..."`` is the chat answer (default "Paris"). It verifies the bundle first, like
the real server. The install and rollback tests also run the real `edgepack serve`.

Usage: python standin_server.py BUNDLE --host 127.0.0.1 --port P
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import tomllib


def main(argv: list[str]) -> int:
    bundle = Path(argv[0])
    port = int(argv[argv.index("--port") + 1])
    from edgepack.manifest import verify_bundle

    manifest = verify_bundle(bundle)
    conf = tomllib.loads((bundle / "server.toml").read_text()).get("standin", {})
    if conf.get("crash"):
        return 3

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/healthz":
                self._send(200, {"status": "ok"})
            elif self.path == "/readyz":
                if conf.get("ready", True):
                    self._send(200, {"status": "ready", "version": manifest["bundle"]["version"]})
                else:
                    self._send(503, {"status": "loading"})
            else:
                self._send(404, {"error": {"message": "not found"}})

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            answer = conf.get("answer", "Paris")
            self._send(200, {"choices": [{"message": {"role": "assistant", "content": answer}}]})

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
