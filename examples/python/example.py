#!/usr/bin/env python3
"""The Python SDK offline: boot a sandbox from a local image, run commands
(buffered, streaming, with stdin), move files, and time a command out.

    make build && export PATH=$PWD/bin:$PATH
    scripts/mkimage-busybox.sh > /tmp/busybox.tar && matchlock image import busybox:latest /tmp/busybox.tar
    python3 examples/python/example.py        # MATCHLOCK_IMAGE=alpine:latest to use another image

Uses the installed package (pip install ./sdk/python), else the source tree.
"""

import os
import sys
import time

try:
    import matchlock
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "sdk", "python"))
    import matchlock

from matchlock import Client, Config, Sandbox


def main() -> None:
    image = os.environ.get("MATCHLOCK_IMAGE", "busybox:latest")
    # The secret never enters the VM: the guest sees a placeholder, which the
    # host swaps for the real value on HTTPS requests to the allowed host.
    sandbox = (Sandbox(image)
               .with_env("GREETING", "hello from the sandbox")
               .allow_host("api.anthropic.com")
               .add_secret("ANTHROPIC_API_KEY", "sk-ant-example-not-a-real-key", "api.anthropic.com"))
    with Client(Config()) as client:
        t0 = time.monotonic()
        sid = client.launch(sandbox)
        print(f"launched {sid} in {(time.monotonic() - t0) * 1000:.0f} ms")

        # Buffered: a string runs with /bin/sh -c, a list is an argv. A
        # failing command is a result with an exit code, not an exception.
        print(client.exec("echo $GREETING; uname -sr").stdout, end="")
        print(client.exec('echo "secret as the guest sees it: $ANTHROPIC_API_KEY"').stdout, end="")
        print("exit code:", client.exec(["sh", "-c", "exit 3"]).exit_code)

        # Streaming: output arrives as it is written.
        client.exec_stream("for i in 1 2 3; do echo tick $i; sleep 0.2; done; echo done >&2",
                           stdout=sys.stdout, stderr=sys.stderr)

        # Stdin.
        r = client.exec_pipe("tr a-z A-Z", b"piped through the guest\n", stdout=sys.stdout)
        print("tr exited", r.exit_code)

        # Files, any size: they move in chunks, checked by SHA-256.
        client.write_file("/tmp/notes.txt", "written from the host\n")
        print("read back:", client.read_file("/tmp/notes.txt"))
        for f in client.list_files("/tmp"):
            print(f"  {f.name} {f.size} bytes mode {f.mode:o}")
        try:
            client.read_file("/no/such/file")
        except matchlock.NotFoundError as e:
            print("missing file:", e)

        # A timeout bounds a call: when it expires the guest process is killed.
        try:
            client.exec("sleep 60", timeout=0.5)
        except matchlock.TimeoutError:
            print("sleep 60 stopped after 0.5 s")


if __name__ == "__main__":
    main()
