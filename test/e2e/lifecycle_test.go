package e2e

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// qemuPidsUsing lists QEMU processes whose command line mentions dir.
func qemuPidsUsing(dir string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		cl := string(b)
		if strings.Contains(cl, "qemu-system") && strings.Contains(cl, dir) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// waitExit blocks until pid has exited (all its threads: its pidfd polls
// readable), using a pidfd (no polling loop); a poll interrupted by a
// signal is retried.
func waitExit(t *testing.T, pid int, timeout time.Duration) {
	t.Helper()
	fd, err := unix.PidfdOpen(pid, 0)
	if err == unix.ESRCH {
		return
	}
	if err != nil {
		t.Fatalf("pidfd_open %d: %v", pid, err)
	}
	defer unix.Close(fd)
	deadline := time.Now().Add(timeout)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			t.Fatalf("process %d still alive after %s", pid, timeout)
		}
		n, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, int(left.Milliseconds())+1)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			t.Fatalf("poll pidfd of %d: %v", pid, err)
		}
		if n > 0 {
			return
		}
	}
}

func TestNoLeftoversAfterRm(t *testing.T) {
	before := sandboxDirs(t)
	qemuBefore := qemuPidsUsing(stateDir)
	mustRun(t, "run", "--image", "busybox", "sh", "-c", "echo x > /written")
	if left := newSandboxDirs(t, before); len(left) != 0 {
		t.Fatalf("sandbox dirs left: %v", left)
	}
	if pids := newPids(qemuBefore, qemuPidsUsing(stateDir)); len(pids) != 0 {
		t.Fatalf("QEMU processes left: %v", pids)
	}
}

func newPids(before, after []int) []int {
	old := map[int]bool{}
	for _, p := range before {
		old[p] = true
	}
	var out []int
	for _, p := range after {
		if !old[p] {
			out = append(out, p)
		}
	}
	return out
}

func TestNoOrphanQEMUAfterSIGKILL(t *testing.T) {
	qemuBefore := qemuPidsUsing(stateDir)
	before := sandboxDirs(t)
	cmd := exec.Command(bin, "run", "--image", "busybox", "sh", "-c", "echo ready; sleep 1000")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || line != "ready\n" {
		t.Fatalf("waiting for ready: %q %v", line, err)
	}
	pids := newPids(qemuBefore, qemuPidsUsing(stateDir))
	if len(pids) != 1 {
		t.Fatalf("want one QEMU, found %v", pids)
	}
	cmd.Process.Signal(unix.SIGKILL)
	cmd.Wait()
	waitExit(t, pids[0], 10*time.Second)
	// The sandbox dir stays (nothing ran to delete it): the lifecycle
	// commands reclaim it; here only the process matters.
	for _, d := range newSandboxDirs(t, before) {
		os.RemoveAll(filepath.Join(stateDir, "sandboxes", d))
	}
}

// imageDiskHashes hashes every converted root disk in the image cache.
func imageDiskHashes(t *testing.T) map[string]string {
	t.Helper()
	sums := map[string]string{}
	filepath.WalkDir(filepath.Join(cacheDir, "images"), func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(p, ".ext4") {
			return nil
		}
		f, err := os.Open(p)
		if err != nil {
			return nil
		}
		defer f.Close()
		h := sha256.New()
		io.Copy(h, f)
		sums[p] = hex.EncodeToString(h.Sum(nil))
		return nil
	})
	return sums
}

func TestCopyOnWriteIsolation(t *testing.T) {
	mustRun(t, "run", "--image", "busybox", "true") // make sure the disk is converted
	before := imageDiskHashes(t)
	if len(before) == 0 {
		t.Fatal("no converted image disk found in the cache")
	}

	type sb struct {
		cmd   *exec.Cmd
		stdin io.WriteCloser
		out   *bufio.Reader
	}
	script := `echo "$0" > /etc/marker-$0; rm -f /bin/vi; echo ready; cat >/dev/null; ls /etc | grep marker; ls /bin/vi 2>&1 | head -1`
	start := func(id string) *sb {
		cmd := exec.Command(bin, "run", "-i", "--image", "busybox", "sh", "-c", script, id)
		stdin, _ := cmd.StdinPipe()
		stdout, _ := cmd.StdoutPipe()
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		return &sb{cmd, stdin, bufio.NewReader(stdout)}
	}
	a, b := start("A"), start("B")
	for _, s := range []*sb{a, b} {
		if l, err := s.out.ReadString('\n'); l != "ready\n" {
			t.Fatalf("ready: %q %v", l, err)
		}
	}
	// Both are running and have written; now let them look.
	var wg sync.WaitGroup
	outs := make([]string, 2)
	for i, s := range []*sb{a, b} {
		wg.Add(1)
		go func(i int, s *sb) {
			defer wg.Done()
			s.stdin.Close()
			rest, _ := io.ReadAll(s.out)
			s.cmd.Wait()
			outs[i] = string(rest)
		}(i, s)
	}
	wg.Wait()
	for i, id := range []string{"A", "B"} {
		lines := strings.Split(strings.TrimSpace(outs[i]), "\n")
		if len(lines) != 2 || lines[0] != "marker-"+id || !strings.Contains(lines[1], "No such file") {
			t.Errorf("sandbox %s saw %q", id, outs[i])
		}
	}
	// A fresh sandbox sees the pristine image, and the disk is unchanged.
	r := mustRun(t, "run", "--image", "busybox", "sh", "-c", "ls /etc | grep -c marker; ls /bin/vi")
	if r.stdout != "0\n/bin/vi\n" {
		t.Errorf("fresh sandbox saw %q", r.stdout)
	}
	after := imageDiskHashes(t)
	for p, h := range before {
		if after[p] != h {
			t.Errorf("image disk %s changed: %s -> %s", p, h, after[p])
		}
	}
}

var _ = context.Background
