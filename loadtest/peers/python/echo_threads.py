"""The echo server of the `websockets` documentation on its threading
implementation (`websockets.sync.server.serve`): a thread per connection
(websockets adds a reader thread and a keepalive thread to each), the
Python counterpart of a thread-per-connection server. Host and port come
from the command line, as for echo.py.

When a thread cannot be started, `threading` raises RuntimeError out of
`serve_forever` and the server stops: that is the library's behaviour and
is left alone; the `thread_spawn_failed` line printed first is what run.sh
counts."""

import sys
import threading

from websockets.sync.server import serve


def echo(websocket):
    for message in websocket:
        websocket.send(message)


def main(host, port):
    with serve(echo, host, port) as server:
        name = server.socket.getsockname()
        print(f"listening on {name[0]}:{name[1]}", flush=True)
        try:
            server.serve_forever()
        except RuntimeError as e:
            print(f'thread_spawn_failed error="{e}" live_threads={threading.active_count()}', file=sys.stderr, flush=True)
            raise


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1", int(sys.argv[2]) if len(sys.argv) > 2 else 8765)
