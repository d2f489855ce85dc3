package sandbox

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"matchlock.dev/matchlock/kernel"
)

// busyboxSource is an in-process ImageSource: a tree with every busybox
// applet and a non-root user (app, 1000), made into an ext4 disk with
// mkfs.ext4 -d. It lets this package's tests boot real VMs without the
// image store.
type busyboxSource struct {
	once sync.Once
	path string
	err  error
}

func (d *busyboxSource) Rootfs(ctx context.Context, ref string) (string, ImageConfig, error) {
	d.once.Do(func() {
		dir := agentDir // removed by TestMain
		root := filepath.Join(dir, "root")
		for _, sub := range []string{"bin", "etc", "tmp", "proc", "sys", "dev", "run", "root"} {
			os.MkdirAll(filepath.Join(root, sub), 0o755)
		}
		bb, err := os.ReadFile("/bin/busybox")
		if err != nil {
			d.err = err
			return
		}
		os.WriteFile(filepath.Join(root, "bin", "busybox"), bb, 0o755)
		list, err := exec.Command("/bin/busybox", "--list").Output()
		if err != nil {
			d.err = err
			return
		}
		for _, app := range strings.Fields(string(list)) {
			if app != "busybox" {
				os.Symlink("busybox", filepath.Join(root, "bin", app))
			}
		}
		os.WriteFile(filepath.Join(root, "etc", "passwd"), []byte("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/tmp:/bin/sh\n"), 0o644)
		os.WriteFile(filepath.Join(root, "etc", "group"), []byte("root:x:0:\napp:x:1000:\n"), 0o644)
		d.path = filepath.Join(dir, "root.ext4")
		out, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", root, d.path, "64M").CombinedOutput()
		if err != nil {
			d.err = &exec.Error{Name: string(out), Err: err}
		}
	})
	return d.path, ImageConfig{Env: []string{"PATH=/bin"}}, d.err
}

var source = &busyboxSource{}

// agentDir holds the guest agent and the image this test binary builds (per process:
// test binaries of other trees may run at the same time).
var agentDir string

func TestMain(m *testing.M) {
	var err error
	if agentDir, err = os.MkdirTemp("", "matchlock-sbtest-"); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(agentDir)
	os.Exit(code)
}

var agentOnce = sync.OnceValues(func() (string, error) {
	_, file, _, _ := runtime.Caller(0)
	out := filepath.Join(agentDir, "matchlock-guest")
	cmd := exec.Command("go", "build", "-o", out, "./cmd/matchlock-guest")
	cmd.Dir = filepath.Join(filepath.Dir(file), "..")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", &exec.Error{Name: string(b), Err: err}
	}
	return out, nil
})

func newTestSandbox(t testing.TB) *Sandbox {
	t.Helper()
	return bootTestSandbox(t, Options{Image: "test", Images: source, MemoryMiB: 256, DiskSizeMiB: 64})
}

// bootTestSandbox boots a VM with opts and this test binary's guest agent,
// closed when the test ends. Unless the test set MATCHLOCK_HOME (volumes
// shared between its sandboxes), state goes to a fresh directory.
func bootTestSandbox(t testing.TB, opts Options) *Sandbox {
	t.Helper()
	if testing.Short() {
		t.Skip("boots a VM")
	}
	if _, err := kernel.Find(""); err != nil {
		t.Fatalf("%v (run `make kernel`)", err)
	}
	agent, err := agentOnce()
	if err != nil {
		t.Fatal(err)
	}
	if os.Getenv("MATCHLOCK_HOME") == "" {
		t.Setenv("MATCHLOCK_HOME", t.TempDir())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	opts.Agent = agent
	sb, err := New(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sb.Close() })
	return sb
}

func TestExecAndFiles(t *testing.T) {
	sb := newTestSandbox(t)
	ctx := context.Background()
	out, errOut, st, _, err := sb.Output(ctx, ExecOptions{Argv: []string{"sh", "-c", "echo hi; echo oops >&2; exit 3"}, Env: []string{"PATH=/bin"}})
	if err != nil {
		t.Fatal(err)
	}
	if string(out) != "hi\n" || string(errOut) != "oops\n" || st.Code != 3 {
		t.Fatalf("got %q %q %+v", out, errOut, st)
	}
	data := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB
	if _, err := sb.WriteFile(ctx, "/tmp/f", bytes.NewReader(data), 0o600); err != nil {
		t.Fatal(err)
	}
	var got bytes.Buffer
	if _, err := sb.ReadFile(ctx, "/tmp/f", &got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.Bytes(), data) {
		t.Fatalf("round trip: %d bytes back", got.Len())
	}
	if _, err := sb.ReadFile(ctx, "/nonexistent", &got); err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Fatalf("read of missing file: %v", err)
	}
	files, err := sb.ListFiles(ctx, "/tmp")
	if err != nil || len(files) != 1 || files[0].Name != "f" || files[0].Size != int64(len(data)) {
		t.Fatalf("list: %+v %v", files, err)
	}
}

func TestConcurrentExecs(t *testing.T) {
	sb := newTestSandbox(t)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			out, _, st, _, err := sb.Output(context.Background(), ExecOptions{Argv: []string{"sh", "-c", "head -c 1048576 /dev/zero | wc -c"}})
			if err != nil || st.Code != 0 || strings.TrimSpace(string(out)) != "1048576" {
				errs <- &exec.Error{Name: string(out), Err: err}
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func BenchmarkControlRoundTrip(b *testing.B) {
	sb := newTestSandbox(b)
	ctx := context.Background()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := sb.Ping(ctx); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
}
