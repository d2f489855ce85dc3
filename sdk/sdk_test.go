package sdk

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"matchlock.dev/matchlock/kernel"
)

// The VM tier: a real `matchlock rpc` built from this tree, booting real
// VMs from busybox:latest (imported from scripts/mkimage-busybox.sh into a
// private store) or from $MATCHLOCK_TEST_IMAGE.

var (
	testImage string // what the tests launch
	testHome  string // the server's MATCHLOCK_HOME
	setupErr  error  // why the VM tier cannot run
)

func TestMain(m *testing.M) {
	flag.Parse()
	var cleanup func()
	if !testing.Short() {
		cleanup, setupErr = setupVMTier()
	}
	code := m.Run()
	if cleanup != nil {
		cleanup()
	}
	os.Exit(code)
}

func setupVMTier() (func(), error) {
	_, file, _, _ := runtime.Caller(0)
	repo := filepath.Join(filepath.Dir(file), "..")
	k, err := kernel.Find("")
	if err != nil {
		return nil, fmt.Errorf("%v (build it with `make kernel`)", err)
	}
	tmp, err := os.MkdirTemp("", "matchlock-sdktest-")
	if err != nil {
		return nil, err
	}
	cleanup := func() { os.RemoveAll(tmp) }
	bin := filepath.Join(tmp, "bin", "matchlock")
	for _, b := range []struct {
		out, pkg string
		static   bool
	}{{bin, "./cmd/matchlock", false}, {filepath.Join(tmp, "bin", "matchlock-guest"), "./cmd/matchlock-guest", true}} {
		cmd := exec.Command("go", "build", "-o", b.out, b.pkg)
		cmd.Dir = repo
		cmd.Env = os.Environ()
		if b.static {
			cmd.Env = append(cmd.Env, "CGO_ENABLED=0")
		}
		if out, err := cmd.CombinedOutput(); err != nil {
			return cleanup, fmt.Errorf("go build %s: %v\n%s", b.pkg, err, out)
		}
	}
	testHome = filepath.Join(tmp, "home")
	os.Setenv(kernel.Env, k)
	os.Setenv("MATCHLOCK_CACHE", filepath.Join(tmp, "cache"))
	os.Setenv("MATCHLOCK_HOME", testHome)
	os.Setenv("MATCHLOCK_BIN", bin)

	// busybox:latest, imported from the plain rootfs tar of the script.
	tarPath := filepath.Join(tmp, "busybox.tar")
	f, err := os.Create(tarPath)
	if err != nil {
		return cleanup, err
	}
	mk := exec.Command(filepath.Join(repo, "scripts", "mkimage-busybox.sh"))
	mk.Stdout, mk.Stderr = f, os.Stderr
	err = mk.Run()
	f.Close()
	if err != nil {
		return cleanup, fmt.Errorf("mkimage-busybox.sh: %w", err)
	}
	if out, err := exec.Command(bin, "image", "import", "busybox:latest", tarPath).CombinedOutput(); err != nil {
		return cleanup, fmt.Errorf("matchlock image import: %v: %s", err, out)
	}
	testImage = os.Getenv("MATCHLOCK_TEST_IMAGE")
	if testImage == "" {
		testImage = "busybox:latest"
	}
	return cleanup, nil
}

func vmClient(t *testing.T) *Client {
	t.Helper()
	if testing.Short() {
		t.Skip("boots VMs")
	}
	if setupErr != nil {
		t.Fatal(setupErr)
	}
	c, err := NewClient(DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func qemuLeft() []string {
	var found []string
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, _ := os.ReadFile(p)
		if bytes.Contains(b, []byte(testHome)) && bytes.Contains(b, []byte("qemu")) {
			found = append(found, p)
		}
	}
	return found
}

// TestProductExample is the README's example, offline: busybox has no apk
// (that exec fails) and secrets are placeholders once the network lands.
func TestProductExample(t *testing.T) {
	client := vmClient(t)
	sandbox := New(testImage).
		AllowHost("dl-cdn.alpinelinux.org", "api.anthropic.com").
		AddSecret("ANTHROPIC_API_KEY", "sk-test-not-real", "api.anthropic.com")
	t0 := time.Now()
	if _, err := client.Launch(sandbox); err != nil {
		t.Fatal(err)
	}
	t.Logf("launch: %v", time.Since(t0).Round(time.Millisecond))
	client.Exec("apk add --no-cache curl")
	result, err := client.Exec("echo $ANTHROPIC_API_KEY")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(result.Stdout, "sk-test-not-real") {
		t.Fatalf("the real secret reached the guest: %q", result.Stdout)
	}
	var out, errOut bytes.Buffer
	if _, err := client.ExecStream("echo streamed; echo warned >&2", &out, &errOut); err != nil {
		t.Fatal(err)
	}
	if out.String() != "streamed\n" || errOut.String() != "warned\n" {
		t.Fatalf("stream: %q %q", out.String(), errOut.String())
	}
}

func TestSDKAgainstVM(t *testing.T) {
	client := vmClient(t)
	id, err := client.Launch(New(testImage).WithEnv("GREETING", "hello").WithMemory(256).WithDiskSize(128).WithHostname("sdkbox"))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()

	t.Run("exec", func(t *testing.T) {
		res, err := client.Exec(`echo "$GREETING from $(hostname)"; echo oops >&2; exit 7`)
		if err != nil || res.Stdout != "hello from sdkbox\n" || res.Stderr != "oops\n" || res.ExitCode != 7 {
			t.Fatalf("%+v %v", res, err)
		}
		res, err = client.ExecArgv([]string{"echo", "a b", "$HOME"})
		if err != nil || res.Stdout != "a b $HOME\n" {
			t.Fatalf("argv: %+v %v", res, err)
		}
		res, err = client.ExecArgv([]string{"/no/such/thing"})
		if !errors.Is(err, ErrNotFound) || res == nil {
			t.Fatalf("missing program: %v", err)
		}
		res, err = client.Run(ctx, &Cmd{Argv: []string{"sh", "-c", "id -u; pwd; echo $X"}, User: "user", Dir: "/tmp", Env: map[string]string{"X": "y"}})
		if err != nil || res.Stdout != "1000\n/tmp\ny\n" {
			t.Fatalf("run: %+v %v", res, err)
		}
	})

	t.Run("pipe", func(t *testing.T) {
		in := make([]byte, 3<<20)
		rand.New(rand.NewSource(7)).Read(in)
		var out bytes.Buffer
		res, err := client.ExecPipe("sha256sum", bytes.NewReader(in), &out, nil)
		want := fmt.Sprintf("%x", sha256.Sum256(in))
		if err != nil || res.ExitCode != 0 || !strings.HasPrefix(out.String(), want) {
			t.Fatalf("%+v %v %q", res, err, out.String())
		}
		// The process may exit without reading its stdin.
		pr, pw := io.Pipe()
		defer pw.Close()
		res, err = client.ExecPipe("echo early", pr, &out, nil)
		if err != nil || res.ExitCode != 0 {
			t.Fatalf("early exit: %+v %v", res, err)
		}
	})

	t.Run("files", func(t *testing.T) {
		if err := client.WriteFile("/tmp/small.txt", []byte("small\n")); err != nil {
			t.Fatal(err)
		}
		if b, err := client.ReadFile("/tmp/small.txt"); err != nil || string(b) != "small\n" {
			t.Fatalf("%q %v", b, err)
		}
		big := make([]byte, 8<<20+123)
		rand.New(rand.NewSource(8)).Read(big)
		t0 := time.Now()
		n, err := client.WriteFileFrom(ctx, "/root/big.bin", bytes.NewReader(big), 0o600)
		if err != nil || n != int64(len(big)) {
			t.Fatalf("write: %d %v", n, err)
		}
		var back bytes.Buffer
		if _, err := client.ReadFileTo(ctx, "/root/big.bin", &back); err != nil || !bytes.Equal(back.Bytes(), big) {
			t.Fatalf("read back: %d bytes, %v", back.Len(), err)
		}
		t.Logf("8 MiB write+read: %v", time.Since(t0).Round(time.Millisecond))
		files, err := client.ListFiles("/root")
		if err != nil || len(files) != 1 || files[0].Name != "big.bin" || files[0].Size != int64(len(big)) || files[0].Mode != 0o600 {
			t.Fatalf("list: %+v %v", files, err)
		}
		if _, err := client.ReadFile("/nope"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("missing file: %v", err)
		}
		if _, err := client.ListFiles("/nope"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("missing dir: %v", err)
		}
	})

	t.Run("cancel", func(t *testing.T) {
		const sleeping = `ps | grep -q "[s]leep 1000"` // busybox-static has no pgrep
		ctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		defer cancel()
		watched := make(chan struct{})
		go func() {
			// Proves the check below can see the process.
			defer close(watched)
			for {
				if res, _ := client.Exec(sleeping); res.ExitCode == 0 {
					return
				}
				if ctx.Err() != nil {
					t.Error("the sleep never showed up in ps")
					return
				}
			}
		}()
		_, err := client.ExecContext(ctx, "exec sleep 1000")
		<-watched
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("cancelled exec: %v", err)
		}
		t0 := time.Now()
		for {
			res, _ := client.Exec(sleeping)
			if res.ExitCode != 0 {
				break
			}
			if time.Since(t0) > time.Second {
				t.Fatal("sleep still running a second after the context expired")
			}
		}
	})

	t.Run("tty", func(t *testing.T) {
		pr, pw := io.Pipe()
		var out syncBuffer
		proc, err := client.Start(ctx, &Cmd{Command: "stty size; read x; stty size", TTY: true, Rows: 25, Cols: 90, Stdin: pr, Stdout: &out})
		if err != nil {
			t.Fatal(err)
		}
		waitText(t, &out, "25 90")
		if err := proc.Resize(50, 160); err != nil {
			t.Fatal(err)
		}
		time.Sleep(200 * time.Millisecond)
		pw.Write([]byte("\n"))
		res, err := proc.Wait()
		if err != nil || res.ExitCode != 0 || !strings.Contains(out.String(), "50 160") {
			t.Fatalf("%+v %v %q", res, err, out.String())
		}
	})

	t.Run("signal", func(t *testing.T) {
		var out syncBuffer
		proc, err := client.Start(ctx, &Cmd{Command: "echo up; exec sleep 1000", Stdout: &out})
		if err != nil {
			t.Fatal(err)
		}
		waitText(t, &out, "up")
		if err := proc.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		res, err := proc.Wait()
		if err != nil || res.ExitCode != 143 || res.Signal != 15 {
			t.Fatalf("%+v %v", res, err)
		}
	})

	t.Run("concurrent", func(t *testing.T) {
		var wg sync.WaitGroup
		for i := 0; i < 6; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				res, err := client.Exec(fmt.Sprintf("echo %d", i))
				if err != nil || res.Stdout != fmt.Sprintf("%d\n", i) {
					t.Errorf("exec %d: %+v %v", i, res, err)
				}
			}()
		}
		wg.Wait()
	})

	t.Run("bad launch", func(t *testing.T) {
		if _, err := client.Launch(New(testImage).Mount("relative", MountConfig{HostPath: "/tmp"})); !errors.Is(err, ErrInvalid) {
			t.Fatalf("bad mount: %v", err)
		}
		if client.Current().ID() != id {
			t.Fatal("a failed launch changed the current sandbox")
		}
	})

	t.Run("network", func(t *testing.T) {
		vm := client.Current()
		list, err := vm.AllowListAdd(ctx, "example.com")
		if err != nil || strings.Join(list, ",") != "example.com" {
			t.Fatalf("allow_list_add: %v %v", list, err)
		}
		if list, err = vm.AllowListDelete(ctx, "example.com"); err != nil || len(list) != 0 {
			t.Fatalf("allow_list_delete: %v %v", list, err)
		}
		if _, err := vm.AllowListDelete(ctx, "example.com"); !errors.Is(err, ErrInvalid) {
			t.Fatalf("deleting a pattern not in the list: %v", err)
		}
		client.Exec("mkdir -p /tmp/www && echo served > /tmp/www/index.html")
		srvCtx, stop := context.WithCancel(ctx)
		defer stop()
		if _, err := client.Start(srvCtx, &Cmd{Command: "exec httpd -f -p 8080 -h /tmp/www", Stdout: io.Discard}); err != nil {
			t.Fatal(err)
		}
		addr, err := vm.PortForward(ctx, 8080, "")
		if err != nil || !strings.HasPrefix(addr, "127.0.0.1:") {
			t.Fatalf("port_forward: %q %v", addr, err)
		}
		deadline := time.Now().Add(30 * time.Second)
		for {
			resp, err := http.Get("http://" + addr + "/index.html")
			if err == nil {
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if string(body) == "served\n" {
					break
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("GET through the forward: %v", err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	})
}

// TestTwoSandboxesAndClose: a host directory mounted read-only, two VMs on
// one client, each closed its own way; nothing is left after Close.
func TestTwoSandboxesAndClose(t *testing.T) {
	client := vmClient(t)
	ctx := context.Background()
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "input.txt"), []byte("from the host\n"), 0o644)
	a, err := client.LaunchVM(ctx, New(testImage).WithMemory(256).Mount("/src", MountConfig{HostPath: dir, ReadOnly: true}))
	if err != nil {
		t.Fatal(err)
	}
	if res, err := a.Exec("cat /src/input.txt; echo x > /src/new.txt"); err != nil || res.Stdout != "from the host\n" || res.ExitCode == 0 {
		t.Fatalf("read-only mount: %+v %v", res, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "new.txt")); err == nil {
		t.Fatal("a read-only mount was written")
	}
	b, err := client.LaunchVM(ctx, New(testImage).WithMemory(256))
	if err != nil {
		t.Fatal(err)
	}
	if client.Current().ID() != b.ID() {
		t.Fatal("current is not the last launched")
	}
	a.WriteFile("/tmp/mark", []byte("a"))
	if _, err := b.ReadFile("/tmp/mark"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("sandboxes share files: %v", err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Exec("true"); !errors.Is(err, ErrUnknownSandbox) {
		t.Fatalf("exec on a closed sandbox: %v", err)
	}
	_, running := b.Start(ctx, &Cmd{Command: "exec sleep 1000", Stdout: io.Discard})
	if running != nil {
		t.Fatal(running)
	}
	time.Sleep(100 * time.Millisecond)
	if err := client.Close(); err != nil {
		t.Fatal(err)
	}
	if left := qemuLeft(); len(left) > 0 {
		t.Fatalf("QEMU left after Close: %v", left)
	}
	if ents, _ := os.ReadDir(filepath.Join(testHome, "sandboxes")); len(ents) > 0 {
		t.Fatalf("sandbox directories left after Close: %v", ents)
	}
	if _, err := b.Exec("true"); !errors.Is(err, ErrClosed) {
		t.Fatalf("exec after Close: %v", err)
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func waitText(t *testing.T, b *syncBuffer, text string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(b.String(), text) {
		if time.Now().After(deadline) {
			t.Fatalf("no %q in %q", text, b.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}
