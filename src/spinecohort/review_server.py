"""The review page served on a cluster's login node (`spinecohort review`), for a reviewer behind an ssh tunnel.

A login node is shared: the server binds to 127.0.0.1 only, serves nothing but the page and the snapshots it
links (an allow-list made from the page itself; any other path is 404, whatever `..` or encoding it uses), and
takes decisions (POST /decisions) only with the session's token, which the page gets in its URL's fragment
(never sent in a request line, so not in any log). Accepted decisions are checked as the workflow reads them
(`review.read_decisions`) and written atomically to the decisions file that `qc.decisions` names.
"""

from __future__ import annotations

import hmac
import posixpath
import secrets
import tempfile
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from . import io, layout
from .cohort_qc import page_rows
from .review import DecisionsError, read_decisions

CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".png": "image/png"}
MAX_DECISIONS_BYTES = 64 * 1024 * 1024  # 90,000 rows with notes are a few MB


def allowed_files(summary: Path) -> dict[str, Path]:
    """URL path -> file: the review page and every snapshot its rows link (relative to the summary folder; the URL
    path is the one a browser asks for, `..` resolved at the server's root)."""
    page = summary / layout.QC_REVIEW
    rows = page_rows(page.read_text())
    files = {"/" + layout.QC_REVIEW: page}
    for row in rows:
        if snapshot := str(row["snapshot"]):
            files[posixpath.normpath("/" + snapshot)] = (summary / snapshot).resolve()
    return files


def make_server(summary: Path, decisions: Path, port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """A server for `summary`'s review page on 127.0.0.1:`port` (0: any free port) and its token."""
    files, token = allowed_files(summary), secrets.token_urlsafe(24)

    class Review(BaseHTTPRequestHandler):
        def _send(self, status: HTTPStatus, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = unquote(urlsplit(self.path).path)
            if path == "/":
                path = "/" + layout.QC_REVIEW
            target = files.get(path)
            if target is None or not target.is_file():
                self._send(HTTPStatus.NOT_FOUND, b"not part of the review\n")
                return
            self._send(HTTPStatus.OK, target.read_bytes(), CONTENT_TYPES.get(target.suffix, "application/octet-stream"))

        def do_POST(self) -> None:  # noqa: N802
            url = urlsplit(self.path)
            given = parse_qs(url.query).get("token", [""])[0]
            if url.path != "/decisions" or not hmac.compare_digest(given.encode(), token.encode()):
                self._send(HTTPStatus.FORBIDDEN, b"decisions need this session's token\n")
                return
            length = int(self.headers.get("Content-Length", 0))
            if length > MAX_DECISIONS_BYTES:
                self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, b"too large\n")
                return
            body = self.rfile.read(length)
            with tempfile.NamedTemporaryFile("wb", suffix=".tsv") as tmp:
                tmp.write(body)
                tmp.flush()
                try:
                    table = read_decisions(tmp.name)
                except DecisionsError as exc:
                    self._send(HTTPStatus.BAD_REQUEST, (str(exc).replace(tmp.name, "the decisions") + "\n").encode())
                    return
            io.write_tsv(decisions, table)
            self._send(HTTPStatus.OK, f"{len(table)} decisions written to {decisions}\n".encode())

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            return  # no request lines in the login node's terminal

    return ThreadingHTTPServer(("127.0.0.1", port), Review), token
