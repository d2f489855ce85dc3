"""The VM tier: a real `matchlock rpc` built from this tree, booting real VMs.

setUpModule builds matchlock and its guest agent with `go build`, points
them at a private cache and state directory, and imports busybox:latest
from scripts/mkimage-busybox.sh; the tests launch $MATCHLOCK_TEST_IMAGE
(default busybox:latest). A missing kernel or toolchain is a failure, not a
skip; set MATCHLOCK_TEST_SHORT=1 to run only the tests that need no VM.
"""

import glob
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import matchlock  # noqa: E402
from matchlock import Client, Config, Sandbox  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
ENV = {}  # what setUpModule prepared
IMAGE = os.environ.get("MATCHLOCK_TEST_IMAGE", "busybox:latest")
_tmp = None


def _kernel():
    k = os.environ.get("MATCHLOCK_KERNEL")
    if k:
        return k
    cache = os.environ.get("MATCHLOCK_CACHE")
    if cache:
        return os.path.join(cache, "kernel", "vmlinux")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "matchlock", "kernel", "vmlinux")


def setUpModule():
    global _tmp
    if os.environ.get("MATCHLOCK_TEST_SHORT"):
        raise unittest.SkipTest("MATCHLOCK_TEST_SHORT is set: no VM tests")
    kernel = _kernel()
    if not os.path.isfile(kernel):
        raise RuntimeError(f"guest kernel not found at {kernel}: build it with `make kernel` (or set MATCHLOCK_KERNEL)")
    if not shutil.which("go"):
        raise RuntimeError("go is not in $PATH: it is needed to build matchlock for these tests")
    _tmp = tempfile.mkdtemp(prefix="matchlock-pytest-")
    bindir = os.path.join(_tmp, "bin")
    for out, pkg, static in (("matchlock", "./cmd/matchlock", False), ("matchlock-guest", "./cmd/matchlock-guest", True)):
        env = dict(os.environ)
        if static:
            env["CGO_ENABLED"] = "0"
        subprocess.run(["go", "build", "-o", os.path.join(bindir, out), pkg], cwd=REPO, env=env, check=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ENV.update({
        "MATCHLOCK_KERNEL": os.path.abspath(kernel),
        "MATCHLOCK_CACHE": os.path.join(_tmp, "cache"),
        "MATCHLOCK_HOME": os.path.join(_tmp, "home"),
        "MATCHLOCK_BIN": os.path.join(bindir, "matchlock"),
    })
    os.environ.update(ENV)
    tar = os.path.join(_tmp, "busybox.tar")
    with open(tar, "wb") as f:
        subprocess.run([os.path.join(REPO, "scripts", "mkimage-busybox.sh")], stdout=f, check=True)
    subprocess.run([ENV["MATCHLOCK_BIN"], "image", "import", "busybox:latest", tar], check=True,
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def tearDownModule():
    if _tmp:
        shutil.rmtree(_tmp, ignore_errors=True)


def qemu_left():
    home = ENV["MATCHLOCK_HOME"].encode()
    found = []
    for p in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(p, "rb") as f:
                b = f.read()
        except OSError:
            continue
        if home in b and b"qemu" in b:
            found.append(p)
    return found


class ProductExampleTest(unittest.TestCase):
    def test_readme_example(self):
        os.environ.setdefault("ANTHROPIC_API_KEY", "sk-test-not-real")
        fake_stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")  # has .buffer, like sys.stdout
        curl_cmd = "echo curl would run here"
        t0 = time.monotonic()
        sandbox = (Sandbox(IMAGE)
                   .allow_host("dl-cdn.alpinelinux.org", "api.anthropic.com")
                   .add_secret("ANTHROPIC_API_KEY", os.environ["ANTHROPIC_API_KEY"], "api.anthropic.com"))
        with Client(Config()) as client:
            client.launch(sandbox)
            launched = time.monotonic() - t0
            client.exec("apk add --no-cache curl")  # busybox has no apk: a failed command, not an error
            client.exec_stream(curl_cmd, stdout=fake_stdout, stderr=sys.stderr)
            r = client.exec("echo $ANTHROPIC_API_KEY")
            self.assertNotIn(os.environ["ANTHROPIC_API_KEY"], r.stdout)
        fake_stdout.flush()
        self.assertEqual(fake_stdout.buffer.getvalue(), b"curl would run here\n")
        print(f"\n    launch {launched * 1000:.0f} ms", file=sys.stderr)


class VMTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.client = Client(Config())
        t0 = time.monotonic()
        cls.sid = cls.client.launch(Sandbox(IMAGE).with_env("GREETING", "hi").with_memory(256)
                                    .with_disk_size(128).with_hostname("pybox"))
        cls.boot_ms = (time.monotonic() - t0) * 1000

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        left = qemu_left()
        if left:
            raise AssertionError(f"QEMU still running after close: {left}")
        home = os.path.join(ENV["MATCHLOCK_HOME"], "sandboxes")
        if os.path.isdir(home) and os.listdir(home):
            raise AssertionError(f"sandbox directories left: {os.listdir(home)}")

    def test_exec(self):
        c = self.client
        r = c.exec('echo "$GREETING from $(hostname)"; echo oops >&2; exit 4')
        self.assertEqual((r.stdout, r.stderr, r.exit_code), ("hi from pybox\n", "oops\n", 4))
        r = c.exec(["echo", "a b", "$HOME"])
        self.assertEqual(r.stdout, "a b $HOME\n")
        r = c.exec("id -u; pwd; echo $X", user="user", workdir="/tmp", env={"X": "y"})
        self.assertEqual(r.stdout, "1000\n/tmp\ny\n")
        self.assertEqual(c.exec("cat", stdin=b"fed").stdout, "fed")
        with self.assertRaises(matchlock.NotFoundError):
            c.exec(["/no/such/program"])

    def test_stream_and_pipe(self):
        c = self.client
        out, err = io.BytesIO(), io.BytesIO()
        r = c.exec_stream("for i in 1 2 3; do echo o$i; echo e$i >&2; done", stdout=out, stderr=err)
        self.assertEqual((out.getvalue(), err.getvalue(), r.exit_code), (b"o1\no2\no3\n", b"e1\ne2\ne3\n", 0))
        data = os.urandom(2 * 1024 * 1024 + 5)
        out = io.BytesIO()
        c.exec_pipe("sha256sum", data, stdout=out)
        self.assertTrue(out.getvalue().startswith(hashlib.sha256(data).hexdigest().encode()))

    def test_tty(self):
        out = io.BytesIO()
        r = self.client.exec_tty("tty; stty size", stdout=out, rows=33, cols=111)
        self.assertEqual(r.exit_code, 0)
        self.assertIn(b"/dev/pts/", out.getvalue())
        self.assertIn(b"33 111", out.getvalue())

    def test_files(self):
        c = self.client
        data = os.urandom(8 * 1024 * 1024 + 3)
        t0 = time.monotonic()
        self.assertEqual(c.write_file("/root/big.bin", data, mode=0o600), len(data))
        self.assertEqual(c.read_file("/root/big.bin"), data)
        ms = (time.monotonic() - t0) * 1000
        print(f"\n    8 MiB write+read {ms:.0f} ms (boot {self.boot_ms:.0f} ms)", file=sys.stderr)
        self.assertEqual(c.exec("sha256sum /root/big.bin").stdout.split()[0], hashlib.sha256(data).hexdigest())
        files = c.list_files("/root")
        self.assertEqual([(f.name, f.size, f.mode) for f in files], [("big.bin", len(data), 0o600)])
        with self.assertRaises(matchlock.NotFoundError):
            c.read_file("/nope")
        with self.assertRaises(matchlock.NotFoundError):
            c.list_files("/nope")

    def test_timeout_kills(self):
        c = self.client
        sleeping = 'ps | grep -q "[s]leep 1000"'  # busybox-static has no pgrep
        seen = []

        def watch():  # proves the check below can see the process
            end = time.monotonic() + 0.5
            while time.monotonic() < end and not seen:
                if c.exec(sleeping).exit_code == 0:
                    seen.append(True)

        watcher = threading.Thread(target=watch)
        watcher.start()
        with self.assertRaises(matchlock.TimeoutError):
            c.exec("exec sleep 1000", timeout=0.5)
        watcher.join()
        self.assertTrue(seen, "the sleep never showed up in ps")
        t0 = time.monotonic()
        while c.exec(sleeping).exit_code == 0:
            self.assertLess(time.monotonic() - t0, 1.0, "sleep still running a second after the timeout")
            time.sleep(0.02)

    def test_threads(self):
        results, errs = {}, []

        def worker(i):
            try:
                results[i] = self.client.exec(f"echo {i}").stdout
            except Exception as e:  # pragma: no cover - reported below
                errs.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errs, [])
        self.assertEqual(results, {i: f"{i}\n" for i in range(6)})

    def test_network(self):
        c = self.client
        self.assertEqual(c.allow_list_add("example.com", "*.example.org"), ["example.com", "*.example.org"])
        self.assertEqual(c.allow_list_delete("example.com"), ["*.example.org"])
        with self.assertRaises(matchlock.InvalidRequestError):
            c.allow_list_delete("never-added.com")
        c.exec("mkdir -p /tmp/www && echo served > /tmp/www/index.html")
        server = threading.Thread(target=lambda: c.exec_stream("exec httpd -f -p 8080 -h /tmp/www", timeout=30),
                                  daemon=True)
        server.start()
        addr = c.port_forward(8080)
        self.assertTrue(addr.startswith("127.0.0.1:"), addr)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://{addr}/index.html", timeout=5) as resp:
                    body = resp.read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.assertEqual(body, b"served\n")
        c.exec("killall httpd")

    def test_bad_launch_keeps_current(self):
        with self.assertRaises(matchlock.InvalidRequestError):
            self.client.launch(Sandbox(IMAGE).mount("relative", "/tmp"))
        self.assertEqual(self.client.current, self.sid)

    def test_second_sandbox_with_mount(self):
        c = self.client
        shared = tempfile.mkdtemp(prefix="matchlock-pymount-")
        self.addCleanup(shutil.rmtree, shared, True)
        with open(os.path.join(shared, "in.txt"), "w") as f:
            f.write("from the host\n")
        other = c.launch(Sandbox(IMAGE).with_memory(256).mount("/work", shared))
        try:
            self.assertNotEqual(other, self.sid)
            c.exec("echo x > /tmp/mark", sandbox_id=self.sid)
            self.assertNotEqual(c.exec("cat /tmp/mark", sandbox_id=other).exit_code, 0)
            r = c.exec("cat /work/in.txt && echo back > /work/out.txt", sandbox_id=other)
            self.assertEqual((r.stdout, r.exit_code), ("from the host\n", 0))
            with open(os.path.join(shared, "out.txt")) as f:
                self.assertEqual(f.read(), "back\n")
        finally:
            c.close_sandbox(other)
            c.use(self.sid)
        with self.assertRaises(matchlock.UnknownSandboxError):
            c.exec("true", sandbox_id=other)


if __name__ == "__main__":
    unittest.main()
