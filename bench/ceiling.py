"""Baselines for bench/run.py, run as their own processes.

``ceiling``: the same Bottle + waitress configuration as the listener (built by
the listener's own create_http_server from the same ini) whose route reads the
body and answers 200 without verifying or storing. The listener cannot beat it.

``canned``: a bare socket server that answers every request with a fixed 200;
it shows how many requests/s the load generator can drive on its own.

    python3 bench/ceiling.py ceiling CONFIG PORT_FILE
    python3 bench/ceiling.py canned PORT_FILE
"""

from __future__ import annotations

import selectors
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def ceiling(config: str, port_file: str) -> None:
    import bottle
    import noyo_listener

    settings = noyo_listener.load_settings(config)
    app = bottle.Bottle()

    @app.post(settings["server"]["path"])
    def hook():
        environ = bottle.request.environ
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        return bottle.HTTPResponse(body=b'{"ok": true}', status=200, headers=[("Content-Type", "application/json")])

    server = noyo_listener.create_http_server(settings, app)
    Path(port_file).write_text(str(server.effective_port))
    server.run()


def canned(port_file: str) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nContent-Type: application/json\r\n\r\n{\"ok\": true}"
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    listener.setblocking(False)
    Path(port_file).write_text(str(listener.getsockname()[1]))
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    buffers: dict[socket.socket, bytes] = {}
    while True:
        for key, _ in selector.select():
            if key.data is None:
                conn, _ = listener.accept()
                conn.setblocking(False)
                selector.register(conn, selectors.EVENT_READ, True)
                buffers[conn] = b""
                continue
            conn = key.fileobj
            try:
                data = conn.recv(65536)
            except OSError:
                data = b""
            if not data:
                selector.unregister(conn)
                conn.close()
                buffers.pop(conn, None)
                continue
            buffer = buffers[conn] + data
            while True:  # answer every complete request in the buffer
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    break
                head = buffer[:end + 2].lower()  # keep the last header's CRLF
                at = head.find(b"content-length:")
                length = int(head[at + 15:head.find(b"\r\n", at)]) if at >= 0 else 0
                if len(buffer) < end + 4 + length:
                    break
                buffer = buffer[end + 4 + length:]
                conn.sendall(answer)
            buffers[conn] = buffer


if __name__ == "__main__":
    if sys.argv[1] == "ceiling":
        ceiling(sys.argv[2], sys.argv[3])
    else:
        canned(sys.argv[2])
