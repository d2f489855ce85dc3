package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

type listEntry struct {
	ID, Name, Status, Image string
	SupervisorPID           int `json:"supervisor_pid"`
	QEMUPID                 int `json:"qemu_pid"`
}

func list(t *testing.T) map[string]listEntry {
	t.Helper()
	r := mustRun(t, "list", "--json")
	var es []listEntry
	if err := json.Unmarshal([]byte(r.stdout), &es); err != nil {
		t.Fatalf("list --json: %v: %s", err, r.stdout)
	}
	m := map[string]listEntry{}
	for _, e := range es {
		m[e.ID] = e
	}
	return m
}

func TestLongLivedLifecycle(t *testing.T) {
	r := mustRun(t, "run", "-d", "--name", "web", "--image", "busybox")
	id := strings.TrimSpace(r.stdout)
	if !strings.HasPrefix(id, "vm-") || len(id) != 11 {
		t.Fatalf("run -d printed %q, want vm-XXXXXXXX", r.stdout)
	}
	defer ml(t, nil, "rm", "--force", id)
	if e := list(t)[id]; e.Status != "running" || e.Name != "web" || e.Image != "busybox" {
		t.Fatalf("list: %+v", e)
	}
	// exec by name and by id, with run semantics.
	r = mustRun(t, "exec", "web", "sh", "-c", "echo hi > /state; echo out; echo err >&2")
	if r.stdout != "out\n" || !strings.Contains(r.stderr, "err") {
		t.Fatalf("exec: %q %q", r.stdout, r.stderr)
	}
	r = mustRun(t, "exec", id, "cat", "/state")
	if r.stdout != "hi\n" {
		t.Fatalf("state across execs: %q", r.stdout)
	}
	if r := ml(t, nil, "exec", id, "sh", "-c", "exit 7"); r.code != 7 {
		t.Fatalf("exec exit code %d", r.code)
	}
	r = ml(t, strings.NewReader("piped\n"), "exec", "-i", "web", "cat")
	if r.stdout != "piped\n" {
		t.Fatalf("exec -i: %q", r.stdout)
	}
	// A background process outlives the exec that started it.
	mustRun(t, "exec", id, "sh", "-c", "(sleep 1000 &) ; echo started")
	r = mustRun(t, "exec", id, "sh", "-c", "ps | grep -c '[s]leep 1000'")
	if strings.TrimSpace(r.stdout) != "1" {
		t.Fatalf("background process gone: %q", r.stdout)
	}
	// Duplicate name.
	if r := ml(t, nil, "run", "-d", "--name", "web", "--image", "busybox"); r.code == 0 || !strings.Contains(r.stderr, "already used") {
		t.Fatalf("duplicate name: %d %q", r.code, r.stderr)
	}
	// rm of a running sandbox is refused.
	if r := ml(t, nil, "rm", id); r.code == 0 || !strings.Contains(r.stderr, "kill") {
		t.Fatalf("rm running: %d %q", r.code, r.stderr)
	}
	r = mustRun(t, "inspect", "web")
	if !strings.Contains(r.stdout, `"status": "running"`) || !strings.Contains(r.stdout, `"qemu_pid"`) {
		t.Fatalf("inspect: %s", r.stdout)
	}
	mustRun(t, "kill", "web")
	if e := list(t)[id]; e.Status != "stopped" {
		t.Fatalf("after kill: %+v", e)
	}
	if r := ml(t, nil, "exec", id, "true"); r.code == 0 || !strings.Contains(r.stderr, "not running") {
		t.Fatalf("exec into stopped: %d %q", r.code, r.stderr)
	}
	mustRun(t, "rm", id)
	if _, ok := list(t)[id]; ok {
		t.Fatal("still listed after rm")
	}
	if r := ml(t, nil, "exec", id, "true"); r.code == 0 || !strings.Contains(r.stderr, "no sandbox") {
		t.Fatalf("unknown id: %d %q", r.code, r.stderr)
	}
	if _, err := os.Stat(stateDir + "/sandboxes/" + id); !os.IsNotExist(err) {
		t.Fatalf("sandbox dir left after rm: %v", err)
	}
}

func TestRunRmFalseAndLogs(t *testing.T) {
	r := mustRun(t, "run", "--rm=false", "--image", "busybox", "sh", "-c", "echo first > /f; echo ran")
	if r.stdout != "ran\n" {
		t.Fatalf("stdout %q", r.stdout)
	}
	id := ""
	for _, w := range strings.Fields(r.stderr) {
		if strings.HasPrefix(w, "vm-") {
			id = strings.Trim(w, "'")
			break
		}
	}
	if id == "" {
		t.Fatalf("no id in %q", r.stderr)
	}
	defer ml(t, nil, "rm", "-f", id)
	if r := mustRun(t, "exec", id, "cat", "/f"); r.stdout != "first\n" {
		t.Fatalf("kept sandbox lost state: %q", r.stdout)
	}
	// -d with a command: its output goes to the log.
	r = mustRun(t, "run", "-d", "--image", "busybox", "sh", "-c", "echo logged-line")
	id2 := strings.TrimSpace(r.stdout)
	defer ml(t, nil, "rm", "-f", id2)
	deadline := time.Now().Add(60 * time.Second)
	for {
		if r := mustRun(t, "logs", id2); strings.Contains(r.stdout, "logged-line") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("command output never reached the log")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestFiveConcurrentSandboxes(t *testing.T) {
	var wg sync.WaitGroup
	ids := make([]string, 5)
	errs := make([]string, 5)
	for i := range ids {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			r := ml(t, nil, "run", "-d", "--memory", "256", "--image", "busybox")
			ids[i], errs[i] = strings.TrimSpace(r.stdout), r.stderr
		}(i)
	}
	wg.Wait()
	for i, id := range ids {
		if !strings.HasPrefix(id, "vm-") {
			t.Fatalf("sandbox %d: %q %q", i, id, errs[i])
		}
	}
	defer mustRun(t, append([]string{"rm", "-f"}, ids...)...)
	l := list(t)
	for _, id := range ids {
		if l[id].Status != "running" {
			t.Errorf("%s: %+v", id, l[id])
		}
		if r := mustRun(t, "exec", id, "hostname"); strings.TrimSpace(r.stdout) != id {
			t.Errorf("hostname of %s: %q", id, r.stdout)
		}
	}
}

func TestSupervisorSIGKILLThenGC(t *testing.T) {
	r := mustRun(t, "run", "-d", "--image", "busybox")
	id := strings.TrimSpace(r.stdout)
	e := list(t)[id]
	if e.SupervisorPID == 0 || e.QEMUPID == 0 {
		t.Fatalf("no pids recorded: %+v", e)
	}
	if err := unix.Kill(e.SupervisorPID, unix.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitExit(t, e.SupervisorPID, 10*time.Second)
	waitExit(t, e.QEMUPID, 10*time.Second) // QEMU dies with its owner
	if e := list(t)[id]; e.Status != "crashed" {
		t.Fatalf("after SIGKILL: %+v", e)
	}
	r = mustRun(t, "gc")
	if !strings.Contains(r.stdout, id) {
		t.Fatalf("gc output %q", r.stdout)
	}
	if _, ok := list(t)[id]; ok {
		t.Fatal("crashed sandbox still listed after gc")
	}
	if _, err := os.Stat(stateDir + "/sandboxes/" + id); !os.IsNotExist(err) {
		t.Fatalf("files left after gc: %v", err)
	}
}

var _ = bufio.NewReader
var _ = exec.Command

// freePort returns a TCP port free on 127.0.0.1 right now.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func httpGet(url string) (string, error) {
	c := &http.Client{Timeout: 10 * time.Second}
	r, err := c.Get(url)
	if err != nil {
		return "", err
	}
	defer r.Body.Close()
	b, err := io.ReadAll(r.Body)
	return string(b), err
}

func TestPortForward(t *testing.T) {
	port := freePort(t)
	r := mustRun(t, "run", "-d", "-p", fmt.Sprintf("127.0.0.1:%d:8080", port), "--image", "busybox")
	id := strings.TrimSpace(r.stdout)
	defer ml(t, nil, "rm", "-f", id)
	mustRun(t, "exec", id, "sh", "-c", "mkdir -p /www && echo hello-from-guest > /www/index.html && (httpd -p 8080 -h /www &)")
	body, err := httpGet(fmt.Sprintf("http://127.0.0.1:%d/", port))
	if err != nil || body != "hello-from-guest\n" {
		t.Fatalf("published port: %q %v", body, err)
	}
	// port-forward on a running sandbox, with a port picked for us.
	r = mustRun(t, "port-forward", id, "0:8080")
	addr := strings.Fields(r.stdout)[0]
	if body, err := httpGet("http://" + addr + "/"); err != nil || body != "hello-from-guest\n" {
		t.Fatalf("port-forward %s: %q %v", addr, body, err)
	}
	// The port is taken now: a clear error.
	r = ml(t, nil, "port-forward", id, fmt.Sprintf("%d:8080", port))
	if r.code == 0 || !strings.Contains(r.stderr, "address already in use") {
		t.Fatalf("port in use: %d %q", r.code, r.stderr)
	}
	r = ml(t, nil, "run", "-p", fmt.Sprintf("%d:80", port), "--image", "busybox", "true")
	if r.code == 0 || !strings.Contains(r.stderr, "address already in use") {
		t.Fatalf("run -p on a used port: %d %q", r.code, r.stderr)
	}
}

// guestHTTPClient copies a static HTTP client into the sandbox (busybox's
// wget needs glibc NSS at run time, which the image lacks).
func guestHTTPClient(t *testing.T, id string) {
	t.Helper()
	f, err := os.Open(netprobe(t))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if r := ml(t, f, "exec", "-i", id, "sh", "-c", "cat > /bin/netprobe && chmod +x /bin/netprobe"); r.code != 0 {
		t.Fatalf("copy netprobe: %s", r.stderr)
	}
}

func TestAllowListLive(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "upstream-ok") }))
	defer srv.Close()
	port := srv.Listener.Addr().(*net.TCPAddr).Port
	r := mustRun(t, "run", "-d", "--add-host", "api.test:127.0.0.1", "--allow-private", fmt.Sprintf("api.test:%d", port), "--image", "busybox")
	id := strings.TrimSpace(r.stdout)
	defer ml(t, nil, "rm", "-f", id)
	guestHTTPClient(t, id)
	url := fmt.Sprintf("http://api.test:%d/", port)
	if r := ml(t, nil, "exec", id, "netprobe", "get", url); r.code == 0 {
		t.Fatalf("reached a host that is not allowed: %q", r.stdout)
	}
	mustRun(t, "allow-list", "add", id, fmt.Sprintf("api.test:%d", port))
	if r := mustRun(t, "exec", id, "netprobe", "get", url); !strings.Contains(r.stdout, "upstream-ok") {
		t.Fatalf("after allow-list add: %q", r.stdout)
	}
	if r := mustRun(t, "allow-list", "ls", id); !strings.Contains(r.stdout, fmt.Sprintf("api.test:%d", port)) {
		t.Fatalf("allow-list ls: %q", r.stdout)
	}
	mustRun(t, "allow-list", "rm", id, fmt.Sprintf("api.test:%d", port))
	if r := ml(t, nil, "exec", id, "netprobe", "get", url); r.code == 0 {
		t.Fatalf("still reachable after allow-list rm: %q", r.stdout)
	}
}
