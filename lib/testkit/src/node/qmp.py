#!/usr/bin/env python3
"""Runs QMP commands on a QEMU monitor socket, in order, each answered before the next:

    qmp.py SOCKET COMMAND...        e.g. qmp.py /tmp/x/qmp.sock system_reset cont

Exits non-zero (saying why) if the socket cannot be reached or QEMU refuses a command. The
board path's self-test (ember_testkit::node::QemuBoard) uses it as the flash, reset, halt and
resume commands of a QEMU that plays a real board.
"""
import json
import socket
import sys


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(20)
    try:
        sock.connect(sys.argv[1])
    except OSError as e:
        sys.exit(f"cannot reach QEMU's QMP socket {sys.argv[1]}: {e}")
    f = sock.makefile("rw")

    def reply(what: str) -> dict:
        while True:
            line = f.readline()
            if not line:
                sys.exit(f"QMP closed while waiting for {what}")
            msg = json.loads(line)
            # Events (RESET, STOP, RESUME) interleave with replies.
            if "event" not in msg:
                return msg

    try:
        reply("the greeting")
        for cmd in ["qmp_capabilities"] + sys.argv[2:]:
            f.write(json.dumps({"execute": cmd}) + "\n")
            f.flush()
            r = reply(cmd)
            if "return" not in r:
                sys.exit(f"QMP {cmd} failed: {r}")
    except OSError as e:
        sys.exit(f"QMP connection to {sys.argv[1]} failed: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
