package e2e

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"strings"
	"testing"
)

func TestExitCodes(t *testing.T) {
	for _, tc := range []struct {
		script string
		want   int
	}{
		{"exit 0", 0},
		{"exit 1", 1},
		{"exit 7", 7},
		{"kill -9 $$", 128 + 9},
	} {
		r := ml(t, nil, "run", "--image", "busybox", "sh", "-c", tc.script)
		if r.code != tc.want {
			t.Errorf("%q: exit %d, want %d (stderr %q)", tc.script, r.code, tc.want, r.stderr)
		}
	}
}

func TestStdoutStderrSeparate(t *testing.T) {
	r := mustRun(t, "run", "--image", "busybox", "sh", "-c", "echo out; echo err >&2; echo out2")
	if r.stdout != "out\nout2\n" {
		t.Errorf("stdout = %q", r.stdout)
	}
	if !strings.Contains(r.stderr, "err\n") || strings.Contains(r.stderr, "out") {
		t.Errorf("stderr = %q", r.stderr)
	}
}

func TestBinaryStdoutIntact(t *testing.T) {
	// 8 MiB of random bytes; the guest reports their hash on stderr.
	r := mustRun(t, "run", "--image", "busybox", "sh", "-c",
		"head -c 8388608 /dev/urandom > /tmp/blob && sha256sum /tmp/blob >&2 && cat /tmp/blob")
	if len(r.stdout) != 8<<20 {
		t.Fatalf("got %d bytes, want %d", len(r.stdout), 8<<20)
	}
	sum := sha256.Sum256([]byte(r.stdout))
	if !strings.Contains(r.stderr, hex.EncodeToString(sum[:])) {
		t.Fatalf("checksum mismatch: host %x, guest said %q", sum, r.stderr)
	}
}

func TestStdin(t *testing.T) {
	in := bytes.Repeat([]byte("line of input\n"), 100000) // 1.4 MB
	r := ml(t, bytes.NewReader(in), "run", "-i", "--image", "busybox", "sha256sum")
	if r.code != 0 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	sum := sha256.Sum256(in)
	if !strings.HasPrefix(r.stdout, hex.EncodeToString(sum[:])) {
		t.Fatalf("stdin hash: guest %q, host %x", r.stdout, sum)
	}
	// Without -i the command sees EOF at once.
	r = mustRun(t, "run", "--image", "busybox", "wc", "-c")
	if strings.TrimSpace(r.stdout) != "0" {
		t.Fatalf("stdin without -i: %q", r.stdout)
	}
}

func TestArgvNotShell(t *testing.T) {
	// argv runs directly: no shell expands $HOME or splits words.
	r := mustRun(t, "run", "--image", "busybox", "echo", "$HOME", "a  b")
	if r.stdout != "$HOME a  b\n" {
		t.Fatalf("stdout = %q", r.stdout)
	}
	// flags after the command word belong to the command.
	r = mustRun(t, "run", "--image", "busybox", "ls", "-d", "/etc")
	if r.stdout != "/etc\n" {
		t.Fatalf("stdout = %q", r.stdout)
	}
}

func TestImageConfig(t *testing.T) {
	r := mustRun(t, "run", "--image", "configured:1")
	if r.stdout != "default-cmd\n" {
		t.Errorf("default CMD: %q", r.stdout)
	}
	r = mustRun(t, "run", "--image", "configured:1", `pwd; id -u; id -g; echo $FOO; echo $HOME`)
	if r.stdout != "/home/user\n1000\n1000\nfrom-image\n/home/user\n" {
		t.Errorf("image workdir/user/env: %q", r.stdout)
	}
	r = mustRun(t, "run", "-e", "FOO=override", "-e", "BAR=2", "-w", "/tmp", "-u", "root", "--image", "configured:1", `pwd; id -u; echo $FOO $BAR`)
	if r.stdout != "/tmp\n0\noverride 2\n" {
		t.Errorf("overrides: %q", r.stdout)
	}
	r = mustRun(t, "run", "-u", "nobody:users", "--image", "configured:1", `id -u; id -g`)
	if r.stdout != "65534\n100\n" {
		t.Errorf("user:group: %q", r.stdout)
	}
	r = mustRun(t, "run", "--entrypoint", "/bin/echo", "--image", "configured:1", "hi", "there")
	if r.stdout != "hi there\n" {
		t.Errorf("--entrypoint: %q", r.stdout)
	}
}

func TestEnvFromHost(t *testing.T) {
	t.Setenv("MATCHLOCK_E2E_VALUE", "from-host")
	r := mustRun(t, "run", "-e", "MATCHLOCK_E2E_VALUE", "--image", "busybox", "sh", "-c", "echo $MATCHLOCK_E2E_VALUE")
	if r.stdout != "from-host\n" {
		t.Fatalf("stdout = %q", r.stdout)
	}
	r = ml(t, nil, "run", "-e", "MATCHLOCK_E2E_UNSET_VAR", "--image", "busybox", "true")
	if r.code == 0 || !strings.Contains(r.stderr, "MATCHLOCK_E2E_UNSET_VAR is not set") {
		t.Fatalf("unset -e: exit %d, %q", r.code, r.stderr)
	}
}

func TestTimeout(t *testing.T) {
	before := sandboxDirs(t)
	r := ml(t, nil, "run", "--timeout", "2", "--image", "busybox", "sleep", "100")
	if r.code != 124 || !strings.Contains(r.stderr, "timed out") {
		t.Fatalf("exit %d, stderr %q", r.code, r.stderr)
	}
	if left := newSandboxDirs(t, before); len(left) != 0 {
		t.Fatalf("sandboxes left after timeout: %v", left)
	}
}

func TestDiskSizeENOSPC(t *testing.T) {
	r := ml(t, nil, "run", "--disk-size", "32", "--image", "busybox", "sh", "-c",
		"dd if=/dev/zero of=/big bs=1M count=64 2>&1; sync")
	if r.code == 0 && !strings.Contains(r.stdout, "No space left on device") {
		t.Fatalf("writing 64 MiB into a 32 MiB layer succeeded: %q", r.stdout)
	}
	if !strings.Contains(r.stdout, "No space left on device") {
		t.Fatalf("want ENOSPC, got exit %d: %q %q", r.code, r.stdout, r.stderr)
	}
}

func TestBadInput(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"run", "--image", "no-such-image:v9", "true"}, "no-such-image"},
		{[]string{"run", "--memory", "1", "--image", "busybox", "true"}, "--memory"},
		{[]string{"run", "--cpus", "0", "--image", "busybox", "true"}, "--cpus"},
		{[]string{"run", "--accel", "warp", "--image", "busybox", "true"}, "--accel"},
		{[]string{"run", "--kernel", "/nonexistent/vmlinux", "--image", "busybox", "true"}, "/nonexistent/vmlinux"},
		{[]string{"run", "true"}, "--image is required"},
		{[]string{"run", "--bogus-flag", "--image", "busybox"}, "unknown flag"},
		{[]string{"run", "--image", "busybox", "/no/such/binary"}, "/no/such/binary"},
	} {
		r := ml(t, nil, tc.args...)
		lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
		if r.code == 0 || !strings.Contains(r.stderr, tc.want) || len(lines) != 1 {
			t.Errorf("%v: exit %d, stderr %q; want one line mentioning %q", tc.args, r.code, r.stderr, tc.want)
		}
		if strings.Contains(r.stderr, "goroutine") || strings.Contains(r.stderr, "panic") {
			t.Errorf("%v: stack trace in output: %s", tc.args, r.stderr)
		}
	}
	if r := ml(t, nil, "run", "--image", "busybox", "/no/such/binary"); r.code != 127 {
		t.Errorf("missing binary: exit %d, want 127", r.code)
	}
}
