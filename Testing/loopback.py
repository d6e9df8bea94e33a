"""A loopback HTTP file host for download tests: plain files with Range support, dropped
connections, and Google Drive's two confirmation flows (nothing leaves 127.0.0.1)."""

from __future__ import annotations

import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Server:
    """A loopback file host; `requests` logs (path, headers) of everything it was asked."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.requests: list[tuple[str, dict]] = []
        self.drop_after: int | None = None  # next file response stops after this many bytes
        self.ignore_range = False
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, dict(self.headers)))
                parts = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(parts.query))
                cookie = self.headers.get("Cookie", "")
                if parts.path.startswith("/files/") and parts.path[7:] in server.files:
                    return self.send_file(server.files[parts.path[7:]])
                if parts.path == "/drive/uc":  # new style: a form posting to drive.usercontent
                    return self.send_page(
                        f'<html><body><p>Google Drive can\'t scan this file for viruses.</p>'
                        f'<form id="download-form" action="{server.url("/drive/download")}" method="get">'
                        f'<input type="submit" value="Download anyway"/>'
                        f'<input type="hidden" name="id" value="{query.get("id")}">'
                        f'<input type="hidden" name="export" value="download">'
                        f'<input type="hidden" name="confirm" value="t">'
                        f'<input type="hidden" name="uuid" value="u-123"></form></body></html>',
                        "NID=drive-session",
                    )
                if parts.path == "/drive/download":
                    if query.get("confirm") == "t" and query.get("uuid") == "u-123" and "NID=drive-session" in cookie:
                        return self.send_file(server.files[query["id"]])
                    return self.send_error(403)
                if parts.path == "/old/uc":  # old style: a confirm= link and a download_warning cookie
                    if query.get("confirm") == "AbC1" and "download_warning_x=AbC1" in cookie:
                        return self.send_file(server.files[query["id"]])
                    return self.send_page(
                        f'<html><a id="uc-download-link" href="/old/uc?export=download&amp;confirm=AbC1&amp;id={query.get("id")}">'
                        f"Download anyway</a></html>",
                        "download_warning_x=AbC1",
                    )
                if parts.path == "/quota":
                    return self.send_page("<html>Too many users have viewed or downloaded this file recently.</html>")
                self.send_error(404)

            def send_page(self, html: str, cookie: str | None = None):
                body = html.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                if cookie:
                    self.send_header("Set-Cookie", f"{cookie}; Path=/")
                self.end_headers()
                self.wfile.write(body)

            def send_file(self, data: bytes):
                start = 0
                wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if wanted and not server.ignore_range:
                    start = int(wanted.group(1))
                    if start >= len(data):
                        return self.send_error(416)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.drop_after is not None:
                    body, server.drop_after = body[: server.drop_after], None
                    self.close_connection = True
                self.wfile.write(body)

        return Handler

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
