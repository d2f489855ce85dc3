package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// snapshotSource starts a long-lived busybox sandbox with state in RAM
// (a tmpfs file), on its disk, and a running counter process (which
// replaces its file atomically: a snapshot may freeze it at any point).
func snapshotSource(t *testing.T) string {
	t.Helper()
	r := mustRun(t, "run", "-d", "--memory", "256", "--image", "busybox")
	id := strings.TrimSpace(r.stdout)
	t.Cleanup(func() { ml(t, nil, "rm", "-f", id) })
	mustRun(t, "exec", id, "sh", "-c", `echo in-ram > /tmp/kept; echo on-disk > /kept
(i=0; while true; do i=$((i+1)); echo $i > /run/counter.new; mv /run/counter.new /run/counter; usleep 20000; done) >/dev/null 2>&1 &
echo $! > /run/counter.pid`)
	// The counter process starts in the background: its file appears
	// only after its first round, which a loaded machine may delay.
	waitFor(t, "the counter to start", func() bool {
		r := ml(t, nil, "exec", id, "cat", "/run/counter")
		n, err := strconv.Atoi(strings.TrimSpace(r.stdout))
		return r.code == 0 && err == nil && n > 2
	})
	return id
}

func readInt(t *testing.T, id, path string) int {
	t.Helper()
	r := mustRun(t, "exec", id, "cat", path)
	n, err := strconv.Atoi(strings.TrimSpace(r.stdout))
	if err != nil {
		t.Fatalf("%s in %s: %q", path, id, r.stdout)
	}
	return n
}

// waitFor polls cond until it holds. The deadline only bounds a test that
// would otherwise hang: it is generous for a slow, loaded machine.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func exists(path string) bool { _, err := os.Stat(path); return err == nil }

// waitStopped waits until every thread of pid is stopped (SIGSTOP): from
// then on the process changes nothing until SIGCONT.
func waitStopped(t *testing.T, pid int) {
	t.Helper()
	waitFor(t, fmt.Sprintf("process %d to stop", pid), func() bool {
		tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
		if err != nil {
			t.Fatalf("process %d: %v", pid, err)
		}
		for _, task := range tasks {
			b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/stat", pid, task.Name()))
			if err != nil {
				continue // a thread that exited
			}
			f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
			if len(f) == 0 || (f[0] != "T" && f[0] != "t") {
				return false
			}
		}
		return true
	})
}

func snapshotCreate(t *testing.T, id, name string) {
	t.Helper()
	mustRun(t, "snapshot", "create", id, "--name", name)
	t.Cleanup(func() { ml(t, nil, "snapshot", "rm", name) })
}

// restoreDetached starts n sandboxes from snapshot name at once.
func restoreDetached(t *testing.T, name string, n int) []string {
	t.Helper()
	ids := make([]string, n)
	outs := make([]result, n)
	var wg sync.WaitGroup
	for i := range ids {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			outs[i] = ml(t, nil, "run", "-d", "--snapshot", name)
			ids[i] = strings.TrimSpace(outs[i].stdout)
		}(i)
	}
	wg.Wait()
	for i, id := range ids {
		if outs[i].code != 0 || !strings.HasPrefix(id, "vm-") {
			t.Fatalf("run -d --snapshot %s: exit %d: %q %q", name, outs[i].code, outs[i].stdout, outs[i].stderr)
		}
		t.Cleanup(func() { ml(t, nil, "rm", "-f", id) })
	}
	return ids
}

type snapEntry struct {
	Name   string           `json:"name"`
	Auto   bool             `json:"auto"`
	Size   int64            `json:"size"`
	Source string           `json:"source"`
	Files  map[string]int64 `json:"files"`
	Users  []struct {
		Holder string `json:"holder"`
	} `json:"users"`
}

func snapshots(t *testing.T) map[string]snapEntry {
	t.Helper()
	r := mustRun(t, "snapshot", "ls", "--json")
	var es []snapEntry
	if err := json.Unmarshal([]byte(r.stdout), &es); err != nil {
		t.Fatalf("snapshot ls --json: %v: %s", err, r.stdout)
	}
	m := map[string]snapEntry{}
	for _, e := range es {
		m[e.Name] = e
	}
	return m
}

func snapshotFiles(t *testing.T) []string {
	t.Helper()
	ents, _ := os.ReadDir(filepath.Join(stateDir, "snapshots"))
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

func TestSnapshotRestoreContinuesExactly(t *testing.T) {
	src := snapshotSource(t)
	pid := readInt(t, src, "/run/counter.pid")
	// The counter is stopped across the snapshot, so that its value there
	// is known exactly; the source and the copy each continue it.
	mustRun(t, "exec", src, "kill", "-STOP", strconv.Itoa(pid))
	frozen := readInt(t, src, "/run/counter")
	snapshotCreate(t, src, "exact")
	if n := readInt(t, src, "/run/counter"); n != frozen {
		t.Fatalf("stopped counter moved from %d to %d during the snapshot", frozen, n)
	}
	mustRun(t, "exec", src, "kill", "-CONT", strconv.Itoa(pid))

	e := snapshots(t)["exact"]
	if e.Source != src || e.Files["memory"] == 0 || e.Files["upper.ext4"] == 0 || e.Size < e.Files["memory"] {
		t.Fatalf("snapshot ls: %+v", e)
	}
	// The source goes on.
	waitFor(t, "the source's counter to move on", func() bool { return readInt(t, src, "/run/counter") > frozen+5 })

	// A --rm run from the snapshot sees the RAM file, the disk file and
	// the counter process, same pid, at the value it had.
	r := mustRun(t, "run", "--snapshot", "exact", "sh", "-c", "cat /tmp/kept /kept /run/counter.pid; cat /run/counter; kill -CONT $(cat /run/counter.pid); usleep 300000; cat /run/counter; kill -0 $(cat /run/counter.pid) && echo alive")
	lines := strings.Fields(r.stdout)
	if len(lines) != 6 || lines[0] != "in-ram" || lines[1] != "on-disk" || lines[2] != strconv.Itoa(pid) || lines[5] != "alive" {
		t.Fatalf("restored state: %q", r.stdout)
	}
	c0, _ := strconv.Atoi(lines[3])
	c1, _ := strconv.Atoi(lines[4])
	if c0 != frozen {
		t.Fatalf("restored counter %d, want %d (its value at the snapshot)", c0, frozen)
	}
	if c1 <= c0 {
		t.Fatalf("restored counter process does not run: %d then %d", c0, c1)
	}
	// The --rm run left nothing behind and holds no reference.
	if u := snapshots(t)["exact"].Users; len(u) != 0 {
		t.Fatalf("users after a --rm run: %+v", u)
	}
}

func TestSnapshotForksDiverge(t *testing.T) {
	src := snapshotSource(t)
	snapshotCreate(t, src, "diverge")
	ids := restoreDetached(t, "diverge", 2)
	if ids[0] == ids[1] || ids[0] == src {
		t.Fatalf("ids %v (source %s)", ids, src)
	}
	type ident struct{ host, mac, addr string }
	var got []ident
	for _, id := range append([]string{src}, ids...) {
		r := mustRun(t, "exec", id, "sh", "-c", "hostname; cat /sys/class/net/eth0/address; ip addr show eth0 | grep 'inet ' | awk '{print $2}'")
		f := strings.Fields(r.stdout)
		if len(f) != 3 {
			t.Fatalf("%s identity: %q", id, r.stdout)
		}
		got = append(got, ident{f[0], f[1], f[2]})
	}
	for i, id := range ids {
		g := got[i+1]
		if g.host != id {
			t.Fatalf("fork %s has hostname %q", id, g.host)
		}
		if g.addr != "10.213.0.2/24" {
			t.Fatalf("fork %s has address %q", id, g.addr)
		}
		for j, o := range got {
			if j != i+1 && o.mac == g.mac {
				t.Fatalf("fork %s shares MAC %s with %v", id, g.mac, o)
			}
		}
	}
	mustRun(t, "exec", ids[0], "sh", "-c", "echo changed > /tmp/kept; echo changed > /kept")
	for _, id := range []string{ids[1], src} {
		if r := mustRun(t, "exec", id, "cat", "/tmp/kept", "/kept"); r.stdout != "in-ram\non-disk\n" {
			t.Fatalf("a write in fork %s shows in %s: %q", ids[0], id, r.stdout)
		}
	}
	// Kernel random output right after restore differs between copies.
	outs := make([]string, 2)
	var wg sync.WaitGroup
	for i := range outs {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			outs[i] = ml(t, nil, "run", "--snapshot", "diverge", "sh", "-c", "head -c 16 /dev/urandom | od -x").stdout
		}(i)
	}
	wg.Wait()
	if outs[0] == "" || outs[0] == outs[1] {
		t.Fatalf("random bytes of two restored copies: %q %q", outs[0], outs[1])
	}
}

func TestSnapshotRestoreSetsClock(t *testing.T) {
	src := snapshotSource(t)
	snapshotCreate(t, src, "clock")
	time.Sleep(3 * time.Second)
	r := mustRun(t, "run", "--snapshot", "clock", "date", "+%s")
	guest, err := strconv.ParseInt(strings.TrimSpace(r.stdout), 10, 64)
	if err != nil {
		t.Fatalf("date: %q", r.stdout)
	}
	if d := time.Now().Unix() - guest; d < -1 || d > 1 {
		t.Fatalf("restored guest clock off by %d s", d)
	}
}

func TestSnapshotRefusedWhileExecStreams(t *testing.T) {
	src := snapshotSource(t)
	cmd := exec.Command(bin, "exec", src, "sh", "-c", "while true; do echo tick; usleep 20000; done")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	ticking := make(chan struct{})
	go func() {
		b := make([]byte, 64)
		if n, _ := stdout.Read(b); bytes.Contains(b[:n], []byte("tick")) {
			close(ticking)
		}
		io.Copy(io.Discard, stdout)
	}()
	select {
	case <-ticking:
	case <-time.After(30 * time.Second):
		t.Fatal("the exec never streamed")
	}
	r := ml(t, nil, "snapshot", "create", src, "--name", "busy")
	if r.code == 0 || !strings.Contains(r.stderr, "in flight") {
		t.Fatalf("snapshot while an exec streams: exit %d, %q", r.code, r.stderr)
	}
	if _, ok := snapshots(t)["busy"]; ok {
		t.Fatal("a refused snapshot is listed")
	}
	cmd.Process.Kill()
	cmd.Wait()
	// Once the stream is gone the snapshot works, and the sandbox is fine.
	waitFor(t, "the exec stream to end", func() bool { return ml(t, nil, "snapshot", "create", src, "--name", "busy").code == 0 })
	t.Cleanup(func() { ml(t, nil, "snapshot", "rm", "busy") })
	if r := mustRun(t, "exec", src, "echo", "ok"); r.stdout != "ok\n" {
		t.Fatalf("after snapshot: %q", r.stdout)
	}
}

func TestSnapshotRmRefusedWhileInUse(t *testing.T) {
	src := snapshotSource(t)
	snapshotCreate(t, src, "inuse")
	ids := restoreDetached(t, "inuse", 1)
	r := ml(t, nil, "snapshot", "rm", "inuse")
	if r.code == 0 || !strings.Contains(r.stderr, "in use") || !strings.Contains(r.stderr, ids[0]) {
		t.Fatalf("rm of a snapshot in use: exit %d, %q", r.code, r.stderr)
	}
	if _, err := os.Stat(filepath.Join(stateDir, "snapshots", "inuse", "memory")); err != nil {
		t.Fatalf("files of a snapshot in use: %v", err)
	}
	mustRun(t, "kill", ids[0])
	mustRun(t, "snapshot", "rm", "inuse")
	if _, err := os.Stat(filepath.Join(stateDir, "snapshots", "inuse")); !os.IsNotExist(err) {
		t.Fatalf("snapshot dir after rm: %v", err)
	}
	if r := ml(t, nil, "run", "--snapshot", "inuse", "true"); r.code == 0 || !strings.Contains(r.stderr, "no snapshot") {
		t.Fatalf("run from a removed snapshot: %d %q", r.code, r.stderr)
	}
}

// stallEnv (snapshot.StallEnv) makes a supervisor wait that long between
// writing a snapshot and committing it.
const stallEnv = "MATCHLOCK_TEST_SNAPSHOT_STALL"

func TestSnapshotKilledMidwayLeavesNothing(t *testing.T) {
	// The supervisor takes the snapshot. Midway here means: written in
	// full (sandbox.json, the last file, is in the temporary directory)
	// and not committed. Make the supervisor stall before committing for
	// longer than any test runs, so that only the kill ends the stall:
	// however slowly the test gets to see the file, the snapshot is still
	// uncommitted when it is killed.
	t.Setenv(stallEnv, "1h")
	src := snapshotSource(t)
	os.Unsetenv(stallEnv)
	sup := list(t)[src].SupervisorPID
	if sup == 0 {
		t.Fatalf("no supervisor pid for %s", src)
	}
	cmd := exec.Command(bin, "snapshot", "create", src, "--name", "killed")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill() })
	tmp := filepath.Join(stateDir, "snapshots", ".tmp-killed")
	waitFor(t, "the snapshot to be written", func() bool { return exists(filepath.Join(tmp, "sandbox.json")) })
	syscall.Kill(sup, syscall.SIGKILL)
	// The checks below judge the creator dead by its process: wait until
	// it is (the client can see its connection end a moment before).
	waitExit(t, sup, 3*time.Minute)
	if err := cmd.Wait(); err == nil {
		t.Fatal("snapshot create succeeded although its supervisor was killed")
	}
	if _, ok := snapshots(t)["killed"]; ok {
		t.Fatal("an interrupted snapshot is listed")
	}
	for _, n := range snapshotFiles(t) {
		if strings.Contains(n, "killed") {
			t.Fatalf("an interrupted snapshot left %s", n)
		}
	}
	if r := ml(t, nil, "run", "--snapshot", "killed", "true"); r.code == 0 {
		t.Fatal("restored an interrupted snapshot")
	}
	// The name is free again.
	src2 := snapshotSource(t)
	snapshotCreate(t, src2, "killed")
}

func TestSnapshotClientKilledMidwayCompletesOrNothing(t *testing.T) {
	// The stall keeps the snapshot uncommitted a little longer, so that
	// the test sees it under way; nothing below depends on its length.
	t.Setenv(stallEnv, "1s")
	src := snapshotSource(t)
	os.Unsetenv(stallEnv)
	sup := list(t)[src].SupervisorPID
	if sup == 0 {
		t.Fatalf("no supervisor pid for %s", src)
	}
	cmd := exec.Command(bin, "snapshot", "create", src, "--name", "orphan")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() { cmd.Process.Kill(); ml(t, nil, "snapshot", "rm", "orphan") })

	// Midway: the supervisor has started the snapshot (its "creating" row
	// and temporary directory exist: from here it takes, writes and
	// commits) and not committed it (the directory is renamed on commit).
	// Kill the client as early as that, while the supervisor is stopped,
	// so that the client is gone before the commit however the machine
	// schedules the two.
	tmp := filepath.Join(stateDir, "snapshots", ".tmp-orphan")
	waitFor(t, "the snapshot to start", func() bool {
		select {
		case err := <-exited:
			t.Fatalf("snapshot create ended (%v) before the test saw the snapshot under way", err)
		default:
		}
		return exists(tmp)
	})
	if err := syscall.Kill(sup, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := true
	cont := func() {
		if stopped {
			syscall.Kill(sup, syscall.SIGCONT)
			stopped = false
		}
	}
	t.Cleanup(cont)
	waitStopped(t, sup)
	if !exists(tmp) {
		// Committed (or failed) between the check and the stop: not
		// midway after all.
		cont()
		t.Fatal("the snapshot ended before the test could stop its supervisor midway")
	}
	cmd.Process.Kill()
	if err := <-exited; err == nil {
		t.Fatal("snapshot create succeeded although it was killed before the snapshot was committed")
	}
	cont()

	// The supervisor finishes the snapshot on its own: whole, or not at all.
	waitFor(t, "the supervisor to finish the snapshot", func() bool { return !exists(tmp) })
	if _, ok := snapshots(t)["orphan"]; !ok {
		log, _ := os.ReadFile(filepath.Join(stateDir, "sandboxes", src, "supervisor.log"))
		t.Fatalf("the supervisor dropped the snapshot of a client that went away; its log:\n%s", log)
	}
	// The source goes on as if its client had stayed.
	c := readInt(t, src, "/run/counter")
	waitFor(t, "the source's counter to move on", func() bool { return readInt(t, src, "/run/counter") > c })
	if r := mustRun(t, "run", "--snapshot", "orphan", "cat", "/tmp/kept"); r.stdout != "in-ram\n" {
		t.Fatalf("restore: %q", r.stdout)
	}
	for _, n := range snapshotFiles(t) {
		if strings.HasPrefix(n, ".tmp-") {
			t.Fatalf("temporary dir %s left", n)
		}
	}
}

func TestForkLive(t *testing.T) {
	src := snapshotSource(t)
	r := mustRun(t, "fork", src, "-n", "2")
	ids := strings.Fields(r.stdout)
	if len(ids) != 2 {
		t.Fatalf("fork -n 2 printed %q", r.stdout)
	}
	for _, id := range ids {
		t.Cleanup(func() { ml(t, nil, "rm", "-f", id) })
	}
	after := readInt(t, src, "/run/counter")
	waitFor(t, "the source to continue", func() bool { return readInt(t, src, "/run/counter") > after+5 })
	for _, id := range ids {
		if r := mustRun(t, "exec", id, "cat", "/tmp/kept", "/kept"); r.stdout != "in-ram\non-disk\n" {
			t.Fatalf("fork %s: %q", id, r.stdout)
		}
		c := readInt(t, id, "/run/counter")
		waitFor(t, "the fork's counter to run", func() bool { return readInt(t, id, "/run/counter") > c })
		if st := list(t)[id].Status; st != "running" {
			t.Fatalf("fork %s is %s", id, st)
		}
	}
	var auto string
	for n, e := range snapshots(t) {
		if e.Auto && e.Source == src {
			auto = n
			if len(e.Users) != 2 {
				t.Fatalf("fork snapshot users: %+v", e.Users)
			}
		}
	}
	if auto == "" {
		t.Fatal("no fork snapshot listed")
	}
	mustRun(t, "rm", "-f", ids[0], ids[1])
	if _, ok := snapshots(t)[auto]; ok {
		t.Fatal("the fork snapshot outlived its forks")
	}
	if _, err := os.Stat(filepath.Join(stateDir, "snapshots", auto)); !os.IsNotExist(err) {
		t.Fatalf("fork snapshot files left: %v", err)
	}
}
