package sandbox

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

func sh(t *testing.T, sb *Sandbox, script string) string {
	t.Helper()
	out, errOut, st, _, err := sb.Output(context.Background(), ExecOptions{Argv: []string{"/bin/busybox", "sh", "-c", script}, Env: []string{"PATH=/bin"}})
	if err != nil || st.Code != 0 {
		t.Fatalf("%q: %v, status %+v, stderr %q", script, err, st, errOut)
	}
	return string(out)
}

func counter(t *testing.T, sb *Sandbox) int {
	t.Helper()
	n, err := strconv.Atoi(strings.TrimSpace(sh(t, sb, "cat /run/counter")))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestSnapshotRestoreFork(t *testing.T) {
	sb := newTestSandbox(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	sh(t, sb, "echo in-ram > /tmp/kept; echo on-disk > /kept")
	sh(t, sb, "(i=0; while true; do i=$((i+1)); echo $i > /run/counter.new; busybox mv /run/counter.new /run/counter; busybox usleep 20000; done) >/dev/null 2>&1 &")
	time.Sleep(200 * time.Millisecond)

	dir := filepath.Join(t.TempDir(), "snap")
	os.Mkdir(dir, 0o700)
	t0 := time.Now()
	info, err := sb.Snapshot(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("snapshot in %v (paused %v)", time.Since(t0), info.Paused)
	total, files := DiskUsage(dir)
	t.Logf("snapshot files %v, %d bytes", files, total)

	// The source continues.
	c0 := counter(t, sb)
	time.Sleep(150 * time.Millisecond)
	if c1 := counter(t, sb); c1 <= c0 {
		t.Fatalf("source counter stuck at %d after the snapshot", c1)
	}

	const n = 2
	forks := make([]*Sandbox, n)
	var wg sync.WaitGroup
	errs := make([]error, n)
	t0 = time.Now()
	for i := range forks {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			forks[i], errs[i] = New(ctx, Options{RestoreFrom: dir})
		}(i)
	}
	wg.Wait()
	t.Logf("%d restores in %v", n, time.Since(t0))
	for i, err := range errs {
		if err != nil {
			t.Fatalf("restore %d: %v", i, err)
		}
		t.Cleanup(func() { forks[i].Close() })
	}
	rnd := map[string]bool{}
	for i, f := range forks {
		if got := sh(t, f, "cat /tmp/kept /kept"); got != "in-ram\non-disk\n" {
			t.Fatalf("fork %d: files %q", i, got)
		}
		c0 := counter(t, f)
		time.Sleep(150 * time.Millisecond)
		if c1 := counter(t, f); c1 <= c0 {
			t.Fatalf("fork %d: counter stuck at %d", i, c1)
		}
		if h := strings.TrimSpace(sh(t, f, "cat /proc/sys/kernel/hostname")); h != f.ID {
			t.Fatalf("fork %d: hostname %q, want %q", i, h, f.ID)
		}
		r := sh(t, f, "busybox head -c 16 /dev/urandom | busybox od -x")
		if rnd[r] {
			t.Fatalf("fork %d: same random bytes as another fork: %s", i, r)
		}
		rnd[r] = true
		now, _ := strconv.ParseInt(strings.TrimSpace(sh(t, f, "busybox date +%s")), 10, 64)
		if d := time.Now().Unix() - now; d > 1 || d < -1 {
			t.Fatalf("fork %d: clock off by %ds", i, d)
		}
	}
	sh(t, forks[0], "echo mine > /tmp/kept; echo mine > /kept")
	if got := sh(t, forks[1], "cat /tmp/kept /kept"); got != "in-ram\non-disk\n" {
		t.Fatalf("a write in fork 0 shows in fork 1: %q", got)
	}
	if got := sh(t, sb, "cat /tmp/kept /kept"); got != "in-ram\non-disk\n" {
		t.Fatalf("a write in fork 0 shows in the source: %q", got)
	}

	// A fork can be snapshotted in turn (its RAM is a private mapping: the
	// snapshot carries RAM in the stream) and restored.
	dir2 := filepath.Join(t.TempDir(), "snap2")
	os.Mkdir(dir2, 0o700)
	if _, err := forks[0].Snapshot(ctx, dir2); err != nil {
		t.Fatal(err)
	}
	g, err := New(ctx, Options{RestoreFrom: dir2})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if got := sh(t, g, "cat /tmp/kept /kept"); got != "mine\nmine\n" {
		t.Fatalf("fork of a fork: %q", got)
	}
}

func TestSnapshotRefusedWhileStreaming(t *testing.T) {
	sb := newTestSandbox(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	p, err := sb.Exec(ctx, ExecOptions{Argv: []string{"/bin/busybox", "sh", "-c", "while true; do echo tick; busybox usleep 10000; done"}})
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		buf := make([]byte, 4096)
		for {
			if _, err := p.Stdout().Read(buf); err != nil {
				return
			}
		}
	}()
	dir := t.TempDir()
	_, err = sb.Snapshot(ctx, dir)
	if !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), "in flight") {
		t.Fatalf("snapshot while streaming: %v", err)
	}
	p.Signal(9)
	p.Wait(ctx)
	p.Close()
	if got := sh(t, sb, "echo still"); got != "still\n" {
		t.Fatalf("after a refused snapshot: %q", got)
	}
	if _, err := sb.Snapshot(ctx, dir); err != nil {
		t.Fatalf("snapshot once idle: %v", err)
	}
}
