package e2e

import (
	"bufio"
	"encoding/json"
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
