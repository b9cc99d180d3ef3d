#!/usr/bin/env python3
"""Many HTTP/1.1 downloads from one process: an unmodified client, like curl, for drills
with hundreds of connections (one curl per download does not fit on a small machine).

Standard library only, one file, nothing imported from tcpcp, no privileges. One process,
one ``selectors`` loop, plain non-blocking sockets. Each download is a ``GET`` with
``Connection: close``; its body is written to its own file as it arrives (like
``curl -o FILE``: the file is created when the first body byte arrives and grows with every
``recv``). Bodies must carry a ``Content-Length`` (what checkpointd.apps.httpstream
serves); a chunked (or length-less) response is refused with a clear error.

Usage:
    python3 peers/http_fetch.py --url 'http://10.0.0.1:8080/stream?len=N&seed={i}' \\
        --count 500 --output '/tmp/d/download-{i}.bin' --max-time 60 --json
    python3 peers/http_fetch.py --url-file urls.txt --output '/tmp/d/{i}.bin'
        (one URL per line; ``{i}`` in --output is the line's index, from 0)

A download succeeds when the status is 2xx and exactly Content-Length body bytes arrived
before the server closed or reset the connection (the connection is closed, as curl does,
once they are all there). Exit status 0 only when every download succeeded; 1 otherwise;
2 for bad arguments. ``--json`` prints one JSON object at the end: ``ok``, ``completed``,
``failed``, ``resets`` and ``downloads``, one entry per download: ``i``, ``url``,
``file``, ``status``, ``content_length``, ``bytes``, ``reset``, ``error`` (None when it
succeeded), ``rc`` (the exit code curl would have given: 0 ok, 7 connect failed, 8 bad
reply, 18 partial body, 22 HTTP error status, 28 timeout, 56 receive failure or reset) and
``ms`` (from the start of its connect to its end), ``first_byte_ms`` (to its first body
byte).
"""

import argparse
import errno
import json
import os
import selectors
import socket
import sys
import time
import urllib.parse

MAX_HEAD = 16384
RECV = 65536

# The exit codes curl gives for the same failures (per download, in the report).
RC_OK, RC_CONNECT, RC_WEIRD, RC_PARTIAL, RC_HTTP, RC_TIMEOUT, RC_RECV = 0, 7, 8, 18, 22, 28, 56


class Download:
    """One URL, one connection, one output file."""

    def __init__(self, i, url, path):
        self.i, self.url, self.path = i, url, path
        u = urllib.parse.urlsplit(url)
        if u.scheme != "http":
            raise ValueError("%s: only http:// URLs" % url)
        if not u.hostname:
            raise ValueError("%s: no host" % url)
        self.host, self.port = u.hostname, u.port or 80
        target = u.path or "/"
        if u.query:
            target += "?" + u.query
        hosthdr = u.netloc.rsplit("@", 1)[-1]
        self.request = ("GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: tcpcp-http-fetch\r\n"
                        "Accept: */*\r\nConnection: close\r\n\r\n" % (target, hosthdr)).encode()
        self.sock = None
        self.fd = None            # the output file, opened at the first body byte
        self.state = "pending"    # pending, connecting, sending, head, body, done
        self.head = bytearray()
        self.status = None
        self.content_length = None
        self.received = 0
        self.reset = False
        self.error = None
        self.rc = None
        self.started = self.ended = self.first_byte = None
        self.sent = 0

    # -- outcome ----------------------------------------------------------------------------
    def fail(self, rc, text, reset=False):
        if self.rc is None:
            self.rc, self.error = rc, text
            self.reset = self.reset or reset
        self.finish()

    def succeed(self):
        if self.rc is None:
            self.rc = RC_OK
        self.finish()

    def finish(self):
        if self.ended is None:
            self.ended = time.monotonic()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.state = "done"

    def report(self):
        return {"i": self.i, "url": self.url, "file": self.path, "status": self.status,
                "content_length": self.content_length, "bytes": self.received,
                "reset": self.reset, "error": self.error, "rc": self.rc,
                "ms": round((self.ended - self.started) * 1000, 1)
                if self.started is not None and self.ended is not None else None,
                "first_byte_ms": round((self.first_byte - self.started) * 1000, 1)
                if self.first_byte is not None else None}

    # -- the response -----------------------------------------------------------------------
    def write_body(self, data):
        if not data:
            return
        if self.fd is None:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self.first_byte = time.monotonic()
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def on_data(self, data):
        """Bytes from the socket. Returns True when the download is over."""
        if self.state == "head":
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > MAX_HEAD:
                    self.fail(RC_WEIRD, "response head longer than %d bytes" % MAX_HEAD)
                    return True
                return False
            err = self.parse_head(bytes(self.head[:end]))
            if err:
                self.fail(RC_WEIRD, err)
                return True
            rest = bytes(self.head[end + 4:])
            self.head = bytearray()
            self.state = "body"
            if self.content_length == 0 and not rest:
                self.write_body(b"")
                return self.body_complete()
            data = rest
        if self.state == "body":
            want = self.content_length - self.received
            self.write_body(data[:want])
            self.received += min(len(data), want)
            if len(data) > want:
                # Like curl ("Excess found"), but a drill must not let it pass.
                self.fail(RC_WEIRD, "%d bytes beyond Content-Length %d"
                          % (len(data) - want, self.content_length))
                return True
            if self.received == self.content_length:
                return self.body_complete()
        return False

    def body_complete(self):
        if self.fd is None:     # an empty body still makes a file, like curl -o
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        if not 200 <= self.status < 300:
            self.fail(RC_HTTP, "HTTP status %d" % self.status)
        else:
            self.succeed()
        return True

    def parse_head(self, head):
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            return "bad status line %r" % lines[0][:80]
        self.status = int(parts[1])
        fields = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                return "bad header line %r" % line[:80]
            name = name.strip().lower()
            value = value.strip()
            if name in fields and name == "content-length" and fields[name] != value:
                return "conflicting Content-Length headers"
            fields[name] = value
        te = fields.get("transfer-encoding")
        if te is not None and te.lower() != "identity":
            return ("Transfer-Encoding %r is not supported (this client handles Content-Length "
                    "bodies only)" % te)
        cl = fields.get("content-length")
        if cl is None:
            return "no Content-Length (this client handles Content-Length bodies only)"
        if not cl.isdigit():
            return "bad Content-Length %r" % cl
        self.content_length = int(cl)
        return None


class Fetcher:
    def __init__(self, downloads, connect_timeout, max_time, parallel_connects):
        self.downloads = downloads
        self.connect_timeout, self.max_time = connect_timeout, max_time
        self.parallel_connects = parallel_connects
        self.sel = selectors.DefaultSelector()
        self.buf = bytearray(RECV)
        self._ended = False       # a download ended since the last sweep of the live set
        self._connects = False    # connects may be in progress

    def start(self, d):
        d.started = time.monotonic()
        try:
            infos = socket.getaddrinfo(d.host, d.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            d.fail(6, "resolve %s: %s" % (d.host, exc))
            return
        fam, typ, proto, _, addr = infos[0]
        s = socket.socket(fam, typ, proto)
        s.setblocking(False)
        d.sock = s
        err = s.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS):
            self.close(d)
            d.fail(RC_CONNECT, "connect: %s" % os.strerror(err))
            return
        d.state = "connecting"
        self.sel.register(s, selectors.EVENT_WRITE, d)

    def close(self, d):
        if d.sock is not None:
            try:
                self.sel.unregister(d.sock)
            except (KeyError, ValueError):
                pass
            d.sock.close()
            d.sock = None

    def end(self, d, rc=None, text=None, reset=False):
        self.close(d)
        if rc is None:
            d.finish()
        else:
            d.fail(rc, text, reset)

    def on_writable(self, d):
        s = d.sock
        if d.state == "connecting":
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.end(d, RC_CONNECT, "connect: %s" % os.strerror(err),
                         reset=err == errno.ECONNRESET)
                return
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            d.state = "sending"
        try:
            d.sent += s.send(d.request[d.sent:])
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.end(d, RC_RECV, "send: %s" % exc, reset=exc.errno == errno.ECONNRESET)
            return
        if d.sent == len(d.request):
            d.state = "head"
            self.sel.modify(s, selectors.EVENT_READ, d)

    def on_readable(self, d):
        try:
            n = d.sock.recv_into(self.buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            reset = exc.errno == errno.ECONNRESET
            self.end(d, RC_RECV, "recv: %s" % (os.strerror(exc.errno) if exc.errno else exc), reset=reset)
            return
        if n == 0:
            if d.state == "head":
                self.end(d, RC_RECV if not d.head else RC_WEIRD,
                         "the server closed before the response head was complete")
            else:
                self.end(d, RC_PARTIAL, "the server closed after %d of %d body bytes"
                         % (d.received, d.content_length))
            return
        if d.on_data(bytes(self.buf[:n])):
            self.close(d)

    def run(self):
        deadline = time.monotonic() + self.max_time if self.max_time else None
        waiting = list(reversed(self.downloads))
        live = set()          # started, not done
        while True:
            if live:
                live = {d for d in live if d.state != "done"} if self._ended else live
                self._ended = False
            connecting = [d for d in live if d.state == "connecting"] if waiting or self._connects else ()
            self._connects = bool(connecting)
            n = len(connecting)
            # connects in progress are limited, established downloads are not
            while waiting and n < self.parallel_connects:
                d = waiting.pop()
                self.start(d)
                if d.state != "done":
                    live.add(d)
                    n += 1
                    self._connects = True
                else:
                    self._ended = True
            if not live and not waiting:
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                for d in self.downloads:
                    if d.state != "done":
                        self.end(d, RC_TIMEOUT, "max-time %g s reached after %d bytes"
                                 % (self.max_time, d.received))
                break
            for d in connecting:
                if d.state == "connecting" and now - d.started >= self.connect_timeout:
                    self.end(d, RC_TIMEOUT, "connect timeout %g s" % self.connect_timeout)
            timeout = 0.1 if deadline is None else max(0.0, min(0.1, deadline - now))
            for key, mask in self.sel.select(timeout):
                d = key.data
                if d.state == "done":
                    continue
                if mask & selectors.EVENT_WRITE and d.state in ("connecting", "sending"):
                    self.on_writable(d)
                elif mask & selectors.EVENT_READ:
                    self.on_readable(d)
                if d.state == "done":
                    self._ended = True
        self.sel.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", metavar="TEMPLATE", help="URL; {i} is replaced by the download's index")
    src.add_argument("--url-file", metavar="FILE", help="one URL per line")
    ap.add_argument("--count", type=int, default=1, help="downloads of --url (i = 0 .. count-1)")
    ap.add_argument("--output", required=True, metavar="TEMPLATE",
                    help="output file of each download; {i} is its index")
    ap.add_argument("--connect-timeout", type=float, default=10.0, help="seconds per connect")
    ap.add_argument("--max-time", type=float, default=0.0,
                    help="seconds for everything; unfinished downloads fail (0: no limit)")
    ap.add_argument("--parallel-connects", type=int, default=256,
                    help="connects in progress at once (established downloads do not count)")
    ap.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = ap.parse_args(argv)
    if args.url is not None:
        if args.count < 1:
            ap.error("--count must be at least 1")
        urls = [args.url.replace("{i}", str(i)) for i in range(args.count)]
    else:
        with open(args.url_file) as f:
            urls = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    if len(urls) > 1 and "{i}" not in args.output:
        ap.error("--output needs {i} for more than one download")
    try:
        downloads = [Download(i, u, args.output.replace("{i}", str(i))) for i, u in enumerate(urls)]
    except ValueError as exc:
        ap.error(str(exc))
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        need = 2 * len(downloads) + 64
        if soft < need:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))
    except (ImportError, ValueError, OSError):
        pass
    Fetcher(downloads, args.connect_timeout, args.max_time, max(1, args.parallel_connects)).run()
    failed = [d for d in downloads if d.rc != RC_OK]
    for d in failed:
        print("http_fetch: download %d (%s): %s" % (d.i, d.url, d.error), file=sys.stderr)
    report = {"ok": not failed, "downloads_total": len(downloads),
              "completed": len(downloads) - len(failed), "failed": len(failed),
              "resets": sum(d.reset for d in downloads),
              "bytes": sum(d.received for d in downloads),
              "downloads": [d.report() for d in downloads]}
    if args.json:
        print(json.dumps(report), flush=True)
    else:
        print("%d of %d downloads complete, %d bytes, %d resets"
              % (report["completed"], len(downloads), report["bytes"], report["resets"]), flush=True)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
