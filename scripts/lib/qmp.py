"""A minimal QMP client (qemu's JSON machine protocol) over a unix socket: enough to stop a
machine, migrate it to a file, and start a restored one."""

import json
import socket
import time

from .common import HarnessError


class QmpError(HarnessError):
    pass


class Qmp:
    """`Qmp(path)` connects (retrying while qemu creates the socket) and negotiates
    capabilities; `cmd(name, **arguments)` returns the command's `return` value."""

    def __init__(self, path, timeout=10.0, alive=lambda: True):
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline or not alive():
                    raise QmpError(f"qemu's QMP socket {path} did not come up") from None
                time.sleep(0.01)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rb")
        self.events = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise QmpError(f"unexpected QMP greeting: {greeting}")
        self.cmd("qmp_capabilities")

    def _read(self):
        try:
            line = self.file.readline()
        except (socket.timeout, OSError) as e:
            raise QmpError(f"QMP: {e}") from None
        if not line:
            raise QmpError("QMP: qemu closed the connection")
        return json.loads(line)

    def cmd(self, name, **arguments):
        msg = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            raise QmpError(f"QMP {name}: {e}") from None
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise QmpError(f"QMP {name}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def wait_status(self, want, timeout, alive=lambda: True, interval=0.01):
        """Poll query-status until the run state is one of `want`; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.cmd("query-status")["status"]
            if status in want:
                return status
            if time.monotonic() > deadline or not alive():
                raise QmpError(f"qemu stayed in state {status!r} (waited for {', '.join(want)})")
            time.sleep(interval)

    def close(self):
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass
