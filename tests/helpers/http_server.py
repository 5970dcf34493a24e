"""A local HTTP server for remote shards: counts requests, can cut connections."""

from __future__ import annotations

import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Server:
    """A folder served on 127.0.0.1 from a thread, that logs every request and, per path,
    can answer 503 to the next ``fail[path]`` requests or close the connection after
    ``cut[path]`` bytes of a response that announced the whole file (of the next
    ``cuts_left[path]`` responses, when set)."""

    def __init__(self, root: Path) -> None:
        self.root, self.requests = root, []
        self.fail: dict[str, int] = {}
        self.cut: dict[str, int] = {}
        self.cuts_left: dict[str, int] = {}  # how many responses to cut (default: all)
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                if self.answered("HEAD"):
                    super().do_HEAD()

            def do_GET(self):
                if not self.answered("GET"):
                    return
                if self.path in server.cut and server.cuts_left.get(self.path, 1) > 0:
                    if self.path in server.cuts_left:
                        server.cuts_left[self.path] -= 1
                    data = (root / self.path.lstrip("/")).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: server.cut[self.path]])
                    self.close_connection = True  # the rest never comes
                    return
                super().do_GET()

            def answered(self, method: str) -> bool:
                server.requests.append((method, self.path))
                if server.fail.get(self.path, 0) > 0:
                    server.fail[self.path] -= 1
                    self.send_error(503, "busy, try later")
                    return False
                return True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def reset(self) -> None:
        self.requests.clear()
        self.fail.clear()
        self.cut.clear()
        self.cuts_left.clear()

    def gets(self, ending: str) -> int:
        return sum(method == "GET" and path.endswith(ending) for method, path in self.requests)
