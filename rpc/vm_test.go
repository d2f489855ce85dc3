package rpc

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/rand"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
	"testing"
	"time"

	"matchlock.dev/matchlock/kernel"
	"matchlock.dev/matchlock/sandbox"
)

// The VM tier: real sandboxes booted under QEMU from a busybox disk built
// in-process (no image store). Skipped with -short; a missing kernel fails.

// dirSource is an in-process ImageSource: /bin/busybox and a few applets
// made into an ext4 disk with mkfs.ext4 -d, built once per test binary.
type dirSource struct {
	once sync.Once
	path string
	err  error
}

var testApplets = []string{"sh", "echo", "cat", "ls", "sleep", "true", "false", "id", "head", "sha256sum",
	"wc", "ps", "stty", "tty", "env", "pwd", "kill", "dd", "mkdir", "test", "grep", "hostname", "tr", "httpd"}

func (d *dirSource) Rootfs(ctx context.Context, ref string) (string, sandbox.ImageConfig, error) {
	d.once.Do(func() {
		dir, err := os.MkdirTemp("", "matchlock-rpctest-")
		if err != nil {
			d.err = err
			return
		}
		root := filepath.Join(dir, "root")
		for _, sub := range []string{"bin", "etc", "tmp", "proc", "sys", "dev", "run", "root"} {
			os.MkdirAll(filepath.Join(root, sub), 0o755)
		}
		bb, err := os.ReadFile("/bin/busybox")
		if err != nil {
			d.err = fmt.Errorf("%w (apt-get install busybox-static)", err)
			return
		}
		os.WriteFile(filepath.Join(root, "bin", "busybox"), bb, 0o755)
		for _, app := range testApplets {
			os.Symlink("busybox", filepath.Join(root, "bin", app))
		}
		os.WriteFile(filepath.Join(root, "etc", "passwd"), []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n"), 0o644)
		os.WriteFile(filepath.Join(root, "etc", "group"), []byte("root:x:0:\nnogroup:x:65534:\n"), 0o644)
		d.path = filepath.Join(dir, "root.ext4")
		out, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", root, d.path, "64M").CombinedOutput()
		if err != nil {
			d.err = fmt.Errorf("mkfs.ext4: %v: %s", err, out)
		}
	})
	return d.path, sandbox.ImageConfig{Env: []string{"PATH=/bin"}, WorkingDir: "/root"}, d.err
}

var testImages = &dirSource{}

var testAgent = sync.OnceValues(func() (string, error) {
	_, file, _, _ := runtime.Caller(0)
	out := filepath.Join(os.TempDir(), fmt.Sprintf("matchlock-rpctest-guest-%d", os.Getpid()))
	cmd := exec.Command("go", "build", "-o", out, "./cmd/matchlock-guest")
	cmd.Dir = filepath.Join(filepath.Dir(file), "..")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build guest agent: %v: %s", err, b)
	}
	return out, nil
})

// vmSession starts a session that boots real VMs; it returns the client and
// the session's MATCHLOCK_HOME.
func vmSession(t *testing.T) (*tclient, string) {
	t.Helper()
	if testing.Short() {
		t.Skip("boots VMs")
	}
	if _, err := kernel.Find(""); err != nil {
		t.Fatalf("%v (build it with `make kernel`, or set %s)", err, kernel.Env)
	}
	agent, err := testAgent()
	if err != nil {
		t.Fatal(err)
	}
	home := t.TempDir()
	t.Setenv("MATCHLOCK_HOME", home)
	c := startSession(t, Config{Images: testImages, Agent: agent})
	return c, home
}

func vmCreate(t *testing.T, c *tclient, extra map[string]any) string {
	t.Helper()
	p := map[string]any{"image": "busybox", "memory_mib": 256, "disk_size_mib": 64}
	for k, v := range extra {
		p[k] = v
	}
	t0 := time.Now()
	id := create(t, c, p)
	t.Logf("create %s: %v", id, time.Since(t0).Round(time.Millisecond))
	return id
}

func vmExec(t *testing.T, c *tclient, id, cmd string) execOut {
	t.Helper()
	var r execOut
	c.must("exec", map[string]any{"id": id, "command": cmd}, &r)
	return r
}

// qemuWith lists QEMU processes whose command line mentions dir.
func qemuWith(dir string) []string {
	var found []string
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		if bytes.Contains(b, []byte(dir)) && bytes.Contains(b, []byte("qemu")) {
			found = append(found, p)
		}
	}
	return found
}

func TestVMEveryMethod(t *testing.T) {
	c, _ := vmSession(t)
	shared := t.TempDir()
	os.WriteFile(filepath.Join(shared, "from-host.txt"), []byte("host data\n"), 0o644)
	id := vmCreate(t, c, map[string]any{"env": map[string]string{"GREETING": "hi"}, "hostname": "rpcbox",
		"mounts": []any{map[string]any{"guest_path": "/mnt/host", "host_path": shared}}})

	r := vmExec(t, c, id, `echo "$GREETING from $(hostname) in $(pwd)"; echo oops >&2; exit 3`)
	if string(r.Stdout) != "hi from rpcbox in /root\n" || string(r.Stderr) != "oops\n" || r.ExitCode != 3 {
		t.Fatalf("exec: %q %q %d", r.Stdout, r.Stderr, r.ExitCode)
	}
	c.must("exec", map[string]any{"id": id, "argv": []string{"id", "-u"}, "user": "nobody", "workdir": "/tmp"}, &r)
	if string(r.Stdout) != "65534\n" {
		t.Fatalf("exec as nobody: %q %q", r.Stdout, r.Stderr)
	}
	c.must("exec", map[string]any{"id": id, "argv": []string{"cat"}, "stdin": []byte("via params")}, &r)
	if string(r.Stdout) != "via params" {
		t.Fatalf("exec with stdin: %q", r.Stdout)
	}
	c.fails(CodeNotFound, "exec", map[string]any{"id": id, "argv": []string{"/no/such/program"}})

	// exec_stream
	var out streamed
	_, ch := c.start("exec_stream", map[string]any{"id": id, "command": "for i in 1 2 3; do echo out$i; echo err$i >&2; done"}, out.note)
	m := c.wait(ch, time.Minute)
	json.Unmarshal(m.Result, &r)
	if m.Error != nil || string(out.stdout) != "out1\nout2\nout3\n" || string(out.stderr) != "err1\nerr2\nerr3\n" || r.ExitCode != 0 {
		t.Fatalf("exec_stream: %v %s", m.Error, &out)
	}

	// exec_pipe: 1 MiB through cat and sha256sum.
	data := make([]byte, 1<<20)
	rand.New(rand.NewSource(1)).Read(data)
	sum := sha256.Sum256(data)
	out = streamed{}
	rid, ch := c.start("exec_pipe", map[string]any{"id": id, "command": "cat | sha256sum"}, out.note)
	for off := 0; off < len(data); off += 200000 {
		c.must("stdin", map[string]any{"request_id": json.RawMessage(rid), "data": data[off:min(off+200000, len(data))]}, nil)
	}
	c.must("stdin", map[string]any{"request_id": json.RawMessage(rid), "eof": true}, nil)
	m = c.wait(ch, time.Minute)
	if m.Error != nil || !strings.HasPrefix(string(out.stdout), hex.EncodeToString(sum[:])) {
		t.Fatalf("exec_pipe: %v %s", m.Error, &out)
	}

	// exec_tty: a terminal, its size, and a resize while running.
	out = streamed{}
	rid, ch = c.start("exec_tty", map[string]any{"id": id, "command": "tty; stty size; read x; stty size", "rows": 30, "cols": 100}, out.note)
	waitFor(t, &out, "30 100")
	c.must("resize", map[string]any{"request_id": json.RawMessage(rid), "rows": 40, "cols": 120}, nil)
	time.Sleep(200 * time.Millisecond) // the resize is asynchronous with respect to stdin
	c.must("stdin", map[string]any{"request_id": json.RawMessage(rid), "data": []byte("\n")}, nil)
	m = c.wait(ch, time.Minute)
	if m.Error != nil || !strings.Contains(string(out.stdout), "/dev/pts/") || !strings.Contains(string(out.stdout), "40 120") {
		t.Fatalf("exec_tty: %v %s", m.Error, &out)
	}

	// signal
	out = streamed{}
	rid, ch = c.start("exec_stream", map[string]any{"id": id, "command": "echo ready; exec sleep 100"}, out.note)
	waitFor(t, &out, "ready")
	c.must("signal", map[string]any{"request_id": json.RawMessage(rid), "signal": "TERM"}, nil)
	m = c.wait(ch, time.Minute)
	json.Unmarshal(m.Result, &r)
	if m.Error != nil || r.ExitCode != 143 || r.Signal != 15 {
		t.Fatalf("signal: %v %+v", m.Error, r)
	}

	// files
	var h struct{ Handle string }
	c.must("write_file_open", map[string]any{"id": id, "path": "/tmp/hello.txt", "mode": 0o640}, &h)
	c.must("write_file_chunk", map[string]any{"handle": h.Handle, "data": []byte("hello ")}, nil)
	c.must("write_file_chunk", map[string]any{"handle": h.Handle, "data": []byte("world\n")}, nil)
	c.must("write_file_close", map[string]any{"handle": h.Handle}, nil)
	r = vmExec(t, c, id, "cat /tmp/hello.txt; ls -l /tmp/hello.txt")
	if !strings.HasPrefix(string(r.Stdout), "hello world\n-rw-r-----") {
		t.Fatalf("written file: %q", r.Stdout)
	}
	out = streamed{}
	_, ch = c.start("read_file", map[string]any{"id": id, "path": "/tmp/hello.txt"}, out.note)
	if m := c.wait(ch, time.Minute); m.Error != nil || string(out.stdout) != "hello world\n" {
		t.Fatalf("read_file: %v %s", m.Error, &out)
	}
	c.fails(CodeNotFound, "read_file", map[string]any{"id": id, "path": "/tmp/nope"})
	var ls struct {
		Files []sandbox.FileInfo `json:"files"`
	}
	c.must("list_files", map[string]any{"id": id, "path": "/tmp"}, &ls)
	if len(ls.Files) != 1 || ls.Files[0].Name != "hello.txt" || ls.Files[0].Size != 12 || ls.Files[0].Mode != 0o640 {
		t.Fatalf("list_files: %+v", ls.Files)
	}
	c.fails(CodeNotFound, "list_files", map[string]any{"id": id, "path": "/nope"})

	// mounts: both ways through a host directory
	r = vmExec(t, c, id, "cat /mnt/host/from-host.txt && echo guest data > /mnt/host/from-guest.txt")
	if string(r.Stdout) != "host data\n" || r.ExitCode != 0 {
		t.Fatalf("mount: %q %q", r.Stdout, r.Stderr)
	}
	if b, err := os.ReadFile(filepath.Join(shared, "from-guest.txt")); err != nil || string(b) != "guest data\n" {
		t.Fatalf("file written in the guest, on the host: %q %v", b, err)
	}

	// allow list
	var al struct {
		AllowHosts []string `json:"allow_hosts"`
	}
	c.must("allow_list_add", map[string]any{"id": id, "hosts": []string{"example.com", "*.example.org"}}, &al)
	if strings.Join(al.AllowHosts, ",") != "example.com,*.example.org" {
		t.Fatalf("allow_list_add: %v", al.AllowHosts)
	}
	c.must("allow_list_delete", map[string]any{"id": id, "hosts": []string{"example.com"}}, &al)
	if strings.Join(al.AllowHosts, ",") != "*.example.org" {
		t.Fatalf("allow_list_delete: %v", al.AllowHosts)
	}
	c.fails(CodeInvalidParams, "allow_list_delete", map[string]any{"id": id, "hosts": []string{"never-added.com"}})
	c.fails(CodeInvalidParams, "allow_list_add", map[string]any{"id": id, "hosts": []string{"bad host!"}})

	// port_forward to busybox httpd in the guest
	vmExec(t, c, id, "mkdir -p /tmp/www && echo served > /tmp/www/index.html")
	httpd, httpdCh := c.start("exec_stream", map[string]any{"id": id, "command": "exec httpd -f -p 8080 -h /tmp/www"}, func(*tmsg) {})
	var pf struct {
		HostAddr string `json:"host_addr"`
	}
	c.must("port_forward", map[string]any{"id": id, "guest_port": 8080}, &pf)
	if !strings.HasPrefix(pf.HostAddr, "127.0.0.1:") {
		t.Fatalf("port_forward: %+v", pf)
	}
	var body []byte
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get("http://" + pf.HostAddr + "/index.html")
		if err == nil {
			body, _ = io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET through the forward: %v %q", err, body)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if string(body) != "served\n" {
		t.Fatalf("through the forward: %q", body)
	}
	c.notify("cancel", map[string]any{"request_id": json.RawMessage(httpd)})
	c.wait(httpdCh, time.Minute)
	c.fails(CodeInvalidParams, "port_forward", map[string]any{"id": id, "guest_port": 80, "host_addr": "localhost"})

	c.must("close", map[string]any{"id": id}, nil)
	c.fails(CodeUnknownSandbox, "exec", map[string]any{"id": id, "command": "true"})
}

func waitFor(t *testing.T, s *streamed, text string) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !strings.Contains(s.String(), text) {
		if time.Now().After(deadline) {
			t.Fatalf("no %q in output: %s", text, s)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// sleeping succeeds while a "sleep 1000" runs in the guest (busybox-static
// has no pgrep; the brackets keep grep from matching itself).
const sleeping = `ps | grep -q "[s]leep 1000"`

// TestVMCancel: cancel kills the guest process within a second.
func TestVMCancel(t *testing.T) {
	c, _ := vmSession(t)
	id := vmCreate(t, c, map[string]any{"no_network": true})
	// Without a NIC the network methods are refused.
	c.fails(CodeNotSupported, "allow_list_add", map[string]any{"id": id, "hosts": []string{"example.com"}})
	c.fails(CodeNotSupported, "port_forward", map[string]any{"id": id, "guest_port": 80})
	for _, method := range []string{"exec", "exec_stream", "exec_pipe"} {
		vmExec(t, c, id, "echo > /tmp/started")
		rid, ch := c.start(method, map[string]any{"id": id, "command": "rm /tmp/started; exec sleep 1000"}, func(*tmsg) {})
		for vmExec(t, c, id, "test -e /tmp/started").ExitCode == 0 {
			time.Sleep(20 * time.Millisecond)
		}
		if vmExec(t, c, id, sleeping).ExitCode != 0 {
			t.Fatalf("%s: the sleep is not running before the cancel", method)
		}
		t0 := time.Now()
		c.notify("cancel", map[string]any{"request_id": json.RawMessage(rid)})
		m := c.wait(ch, 5*time.Second)
		if m.Error == nil || m.Error.Code != CodeCancelled {
			t.Fatalf("%s: cancelled: %+v", method, m)
		}
		answered := time.Since(t0)
		for vmExec(t, c, id, sleeping).ExitCode == 0 {
			if time.Since(t0) > time.Second {
				t.Fatalf("%s: sleep still running %v after cancel", method, time.Since(t0))
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Logf("%s: cancel answered in %v, process gone in %v", method, answered.Round(time.Millisecond), time.Since(t0).Round(time.Millisecond))
	}
}

func TestVMConcurrentExecs(t *testing.T) {
	c, _ := vmSession(t)
	id := vmCreate(t, c, nil)
	var wg sync.WaitGroup
	errs := make(chan string, 16)
	t0 := time.Now()
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var r execOut
			res, e := c.call("exec", map[string]any{"id": id, "command": fmt.Sprintf("head -c %d /dev/zero | wc -c", (i+1)<<17)})
			if e == nil {
				json.Unmarshal(res, &r)
			}
			if e != nil || strings.TrimSpace(string(r.Stdout)) != fmt.Sprint((i+1)<<17) {
				errs <- fmt.Sprintf("exec %d: %v %q", i, e, r.Stdout)
			}
		}()
	}
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var out streamed
			_, ch := c.start("exec_stream", map[string]any{"id": id, "command": fmt.Sprintf("for j in 1 2 3 4 5; do echo %d-$j; done", i)}, out.note)
			m := c.wait(ch, time.Minute)
			want := ""
			for j := 1; j <= 5; j++ {
				want += fmt.Sprintf("%d-%d\n", i, j)
			}
			if m.Error != nil || string(out.stdout) != want {
				errs <- fmt.Sprintf("stream %d: %v %s", i, m.Error, &out)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	t.Logf("12 concurrent execs: %v", time.Since(t0).Round(time.Millisecond))
}

// TestVMLargeFile moves 64 MiB each way and checks it by hash, and that the
// host's heap stays far below the file's size while doing so.
func TestVMLargeFile(t *testing.T) {
	c, _ := vmSession(t)
	id := vmCreate(t, c, map[string]any{"disk_size_mib": 256})
	const size = 64 << 20
	const chunk = 1 << 20

	// Collect eagerly so that the sampled heap is close to what is live.
	defer debug.SetGCPercent(debug.SetGCPercent(10))
	var peak heapPeak
	peak.start()
	defer peak.stop()

	t0 := time.Now()
	var h struct{ Handle string }
	c.must("write_file_open", map[string]any{"id": id, "path": "/root/big", "mode": 0o600}, &h)
	src := rand.New(rand.NewSource(42))
	want := sha256.New()
	buf := make([]byte, chunk)
	var window []chan *tmsg
	for off := 0; off < size; off += chunk {
		src.Read(buf)
		want.Write(buf)
		_, ch := c.start("write_file_chunk", map[string]any{"handle": h.Handle, "data": buf}, nil)
		window = append(window, ch)
		if len(window) == 4 { // keep four chunks in flight
			if m := c.wait(window[0], time.Minute); m.Error != nil {
				t.Fatalf("chunk: %v", m.Error)
			}
			window = window[1:]
		}
	}
	for _, ch := range window {
		if m := c.wait(ch, time.Minute); m.Error != nil {
			t.Fatalf("chunk: %v", m.Error)
		}
	}
	var closed struct {
		Size   int64
		SHA256 string
	}
	c.must("write_file_close", map[string]any{"handle": h.Handle}, &closed)
	wantSum := hex.EncodeToString(want.Sum(nil))
	if closed.Size != size || closed.SHA256 != wantSum {
		t.Fatalf("write: %+v, want sha256 %s", closed, wantSum)
	}
	wrote := time.Since(t0)
	if r := vmExec(t, c, id, "sha256sum /root/big"); !strings.HasPrefix(string(r.Stdout), wantSum) {
		t.Fatalf("guest sha256sum: %q", r.Stdout)
	}

	t0 = time.Now()
	got := sha256.New()
	var n int64
	var mu sync.Mutex
	_, ch := c.start("read_file", map[string]any{"id": id, "path": "/root/big"}, func(m *tmsg) {
		var p noteParams
		json.Unmarshal(m.Params, &p)
		mu.Lock()
		got.Write(p.Data)
		n += int64(len(p.Data))
		mu.Unlock()
	})
	m := c.wait(ch, 5*time.Minute)
	if m.Error != nil {
		t.Fatal(m.Error)
	}
	var rr struct {
		Size   int64
		SHA256 string
	}
	json.Unmarshal(m.Result, &rr)
	mu.Lock()
	gotSum := hex.EncodeToString(got.Sum(nil))
	mu.Unlock()
	if n != size || gotSum != wantSum || rr.SHA256 != wantSum || rr.Size != size {
		t.Fatalf("read: %d bytes, sha256 %s (server says %+v), want %s", n, gotSum, rr, wantSum)
	}
	read := time.Since(t0)
	peak.stop()
	mib := func(d time.Duration) string { return fmt.Sprintf("%.1f MiB/s", float64(size)/(1<<20)/d.Seconds()) }
	t.Logf("64 MiB write %v (%s), read %v (%s); peak heap %d MiB (client and server together)",
		wrote.Round(time.Millisecond), mib(wrote), read.Round(time.Millisecond), mib(read), peak.max()>>20)
	// The bound guarded: both ends together hold far less than the file.
	if peak.max() > 48<<20 {
		t.Errorf("peak heap %d MiB while moving a 64 MiB file: data is being buffered", peak.max()>>20)
	}
}

// heapPeak samples the heap in use.
type heapPeak struct {
	mu   sync.Mutex
	peak uint64
	done chan struct{}
	wg   sync.WaitGroup
	once sync.Once
}

func (h *heapPeak) start() {
	h.done = make(chan struct{})
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		var ms runtime.MemStats
		for {
			runtime.ReadMemStats(&ms)
			h.mu.Lock()
			h.peak = max(h.peak, ms.HeapInuse)
			h.mu.Unlock()
			select {
			case <-h.done:
				return
			case <-time.After(25 * time.Millisecond):
			}
		}
	}()
}

func (h *heapPeak) stop() {
	h.once.Do(func() { close(h.done); h.wg.Wait() })
}

func (h *heapPeak) max() uint64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.peak
}

// TestVMTwoSandboxesAndEOF: two sandboxes in one session are separate
// machines; EOF on the input closes both, with an exec still running, and
// leaves no QEMU process and no sandbox directory behind.
func TestVMTwoSandboxesAndEOF(t *testing.T) {
	c, home := vmSession(t)
	var ids [2]string
	var wg sync.WaitGroup
	t0 := time.Now()
	for i := range ids {
		wg.Add(1)
		go func() { defer wg.Done(); ids[i] = vmCreate(t, c, nil) }()
	}
	wg.Wait()
	t.Logf("two sandboxes booted concurrently in %v", time.Since(t0).Round(time.Millisecond))
	if ids[0] == ids[1] {
		t.Fatal("same id twice")
	}
	vmExec(t, c, ids[0], "echo one > /tmp/mark")
	if r := vmExec(t, c, ids[1], "cat /tmp/mark"); r.ExitCode == 0 {
		t.Fatalf("a file written in %s is visible in %s", ids[0], ids[1])
	}
	if r := vmExec(t, c, ids[0], "cat /tmp/mark"); string(r.Stdout) != "one\n" {
		t.Fatalf("mark: %q", r.Stdout)
	}
	if n := len(qemuWith(home)); n != 2 {
		t.Fatalf("%d QEMU processes for this session, want 2", n)
	}
	_, ch := c.start("exec_stream", map[string]any{"id": ids[1], "command": "exec sleep 1000"}, func(*tmsg) {})
	time.Sleep(200 * time.Millisecond)

	t0 = time.Now()
	if err := c.end(time.Minute); err != nil {
		t.Fatal(err)
	}
	t.Logf("teardown after EOF: %v", time.Since(t0).Round(time.Millisecond))
	if m := c.wait(ch, time.Second); m.Error == nil || m.Error.Code != CodeSessionEnded {
		t.Fatalf("exec at EOF: %+v", m)
	}
	if left := qemuWith(home); len(left) > 0 {
		t.Fatalf("QEMU still running after EOF: %v", left)
	}
	ents, _ := os.ReadDir(filepath.Join(home, "sandboxes"))
	if len(ents) > 0 {
		t.Fatalf("sandbox directories left: %v", ents)
	}
}
