"""The fast tier: the client against a scripted server (tests/fake_matchlock)."""

import io
import os
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import matchlock  # noqa: E402
from matchlock import Client, Config, Sandbox  # noqa: E402

FAKE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_matchlock")


def fake_client() -> Client:
    return Client(Config(binary_path=FAKE))


class BuilderTest(unittest.TestCase):
    def test_params(self):
        sb = (Sandbox("alpine:latest")
              .allow_host("dl-cdn.alpinelinux.org", "api.anthropic.com")
              .add_secret("ANTHROPIC_API_KEY", "sk-x", "api.anthropic.com")
              .with_env("A", "1").with_cpus(2).with_memory(1024).with_disk_size(2048)
              .with_workdir("/w").with_user("user").with_hostname("h").allow_private("10.0.0.1"))
        self.assertEqual(sb.to_params(), {
            "image": "alpine:latest", "cpus": 2, "memory_mib": 1024, "disk_size_mib": 2048,
            "workdir": "/w", "user": "user", "hostname": "h", "env": {"A": "1"},
            "allow_hosts": ["dl-cdn.alpinelinux.org", "api.anthropic.com"], "allow_private": ["10.0.0.1"],
            "secrets": [{"name": "ANTHROPIC_API_KEY", "value": "sk-x", "hosts": ["api.anthropic.com"]}],
        })
        self.assertEqual(Sandbox("x").without_network().to_params(), {"image": "x", "no_network": True})
        with self.assertRaises(ValueError):
            Sandbox("")


class ClientTest(unittest.TestCase):
    def setUp(self):
        self.client = fake_client()
        self.addCleanup(self.client.close)

    def test_exec_before_launch(self):
        with self.assertRaises(matchlock.NoSandboxError):
            self.client.exec("echo hi")

    def test_exec(self):
        sid = self.client.launch(Sandbox("img"))
        self.assertEqual(self.client.current, sid)
        r = self.client.exec("echo hello")
        self.assertEqual((r.stdout, r.exit_code, r.ok), ("hello\n", 0, True))
        r = self.client.exec("fail 3")
        self.assertEqual((r.exit_code, r.stderr, r.ok), (3, "failed\n", False))
        r = self.client.exec(["env"], env={"B": "2", "A": "1"})
        self.assertEqual(r.stdout, "A=1\nB=2\n")
        with self.assertRaises(matchlock.NotFoundError) as cm:
            self.client.exec("nosuch")
        self.assertEqual(cm.exception.code, -32006)

    def test_exec_stream_writers(self):
        self.client.launch(Sandbox("img"))
        text, errs = io.StringIO(), io.StringIO()
        self.client.exec_stream("utf8", stdout=text, stderr=errs)
        self.assertEqual(text.getvalue(), "h\u00e9llo w\u00f6rld\n")  # split UTF-8 reassembled
        self.assertEqual(errs.getvalue(), "err\n")
        raw = io.BytesIO()
        self.client.exec_stream("echo bytes", stdout=raw)
        self.assertEqual(raw.getvalue(), b"bytes\n")
        got = []
        self.client.exec_stream("echo cb", stdout=got.append)
        self.assertEqual(b"".join(got), b"cb\n")

    def test_exec_pipe(self):
        self.client.launch(Sandbox("img"))
        data = os.urandom(matchlock.CHUNK_SIZE * 2 + 17)
        out = io.BytesIO()
        r = self.client.exec_pipe("cat", data, stdout=out)
        self.assertEqual((r.exit_code, out.getvalue()), (0, data))
        out = io.BytesIO()
        self.client.exec_pipe("cat", io.BytesIO(b"from a file"), stdout=out)
        self.assertEqual(out.getvalue(), b"from a file")
        out = io.BytesIO()
        self.client.exec_pipe("cat", [b"a", b"b", "c"], stdout=out)
        self.assertEqual(out.getvalue(), b"abc")

    def test_timeout_cancels(self):
        self.client.launch(Sandbox("img"))
        t0 = time.monotonic()
        with self.assertRaises(matchlock.TimeoutError):
            self.client.exec("sleep 100", timeout=0.2)
        self.assertLess(time.monotonic() - t0, 2.0)
        self.assertIsInstance(matchlock.TimeoutError("x"), TimeoutError)
        # The session is still usable.
        self.assertEqual(self.client.exec("echo ok").stdout, "ok\n")

    def test_files(self):
        self.client.launch(Sandbox("img"))
        data = os.urandom(300000)
        self.assertEqual(self.client.write_file("/tmp/a.bin", data), len(data))
        self.assertEqual(self.client.read_file("/tmp/a.bin"), data)
        dest = io.BytesIO()
        self.assertEqual(self.client.read_file("/tmp/a.bin", dest), len(data))
        self.assertEqual(dest.getvalue(), data)
        self.client.write_file("/tmp/b.txt", "text")
        self.assertEqual([f.name for f in self.client.list_files("/tmp")], ["a.bin", "b.txt"])
        with self.assertRaises(matchlock.NotFoundError):
            self.client.read_file("/tmp/none")

    def test_not_supported(self):
        self.client.launch(Sandbox("img"))
        with self.assertRaises(matchlock.NotSupportedError):
            self.client.allow_list_add("example.com")
        with self.assertRaises(matchlock.NotSupportedError):
            self.client.port_forward(80)
        with self.assertRaises(matchlock.NotSupportedError):
            self.client.launch(Sandbox("img").mount("/w", "/tmp"))

    def test_threads(self):
        self.client.launch(Sandbox("img"))
        results, errs = {}, []

        def worker(i):
            try:
                results[i] = self.client.exec("echo %d" % i).stdout
            except Exception as e:  # pragma: no cover - reported below
                errs.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errs, [])
        self.assertEqual(results, {i: "%d\n" % i for i in range(16)})

    def test_server_dies(self):
        self.client.launch(Sandbox("img"))
        with self.assertRaises(matchlock.ClientClosedError):
            self.client._call("die", {}, timeout=5)
        with self.assertRaises(matchlock.ClientClosedError):
            self.client.exec("echo x")

    def test_context_manager(self):
        with fake_client() as c:
            c.launch(Sandbox("img"))
        with self.assertRaises(matchlock.ClientClosedError):
            c.exec("echo x")


class StartupTest(unittest.TestCase):
    def test_missing_binary(self):
        with self.assertRaises(matchlock.MatchlockError):
            Client(Config(binary_path="/nonexistent/matchlock"))


if __name__ == "__main__":
    unittest.main()
