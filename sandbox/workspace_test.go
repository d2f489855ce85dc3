package sandbox

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"matchlock.dev/matchlock/workspace"
)

// newShareSandbox boots a VM with opts' mounts. MATCHLOCK_HOME must be set
// by the caller when volumes are used across sandboxes.
func newShareSandbox(t testing.TB, opts Options) *Sandbox {
	t.Helper()
	opts.Image, opts.Images = "test", source
	if opts.MemoryMiB == 0 {
		opts.MemoryMiB = 256
	}
	if opts.DiskSizeMiB == 0 {
		opts.DiskSizeMiB = 256
	}
	opts.NoNetwork = true
	return bootTestSandbox(t, opts)
}

// gsh runs a busybox shell script in the guest and returns its output.
func gsh(t testing.TB, sb *Sandbox, script string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	out, errOut, st, _, err := sb.Output(ctx, ExecOptions{Argv: []string{"/bin/sh", "-c", script}, Env: []string{"PATH=/bin"}})
	if err != nil {
		t.Fatalf("exec: %v", err)
	}
	return string(out) + string(errOut), st.Code
}

// mustSh is gsh that fails the test on a nonzero exit.
func mustSh(t testing.TB, sb *Sandbox, script string) string {
	t.Helper()
	out, code := gsh(t, sb, script)
	if code != 0 {
		t.Fatalf("script exited %d:\n%s\n--- script:\n%s", code, out, script)
	}
	return out
}

// guestCheck is the static test program of workspace/internal/guestcheck.
var guestCheck = sync.OnceValues(func() (string, error) {
	_, file, _, _ := runtime.Caller(0)
	out := filepath.Join(os.TempDir(), "matchlock-guestcheck")
	cmd := exec.Command("go", "build", "-o", out, "./workspace/internal/guestcheck")
	cmd.Dir = filepath.Join(filepath.Dir(file), "..")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", &exec.Error{Name: string(b), Err: err}
	}
	return out, nil
})

// installGuestCheck copies the test program to /bin/guestcheck.
func installGuestCheck(t testing.TB, sb *Sandbox) {
	t.Helper()
	p, err := guestCheck()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sb.WriteFile(context.Background(), "/bin/guestcheck", bytes.NewReader(b), 0o755); err != nil {
		t.Fatal(err)
	}
}

func TestShareSmoke(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "hello"), []byte("from the host\n"), 0o644)
	sb := newShareSandbox(t, Options{Mounts: []Mount{{Source: dir, Target: "/workspace"}}})
	out := mustSh(t, sb, "cat /workspace/hello; echo guest > /workspace/new; ls -l /workspace/hello; grep ' /workspace ' /proc/mounts")
	if !strings.Contains(out, "from the host") || !strings.Contains(out, "root     root") || !strings.Contains(out, "fuse.matchlock") {
		t.Fatalf("guest output:\n%s", out)
	}
	b, err := os.ReadFile(filepath.Join(dir, "new"))
	if err != nil || string(b) != "guest\n" {
		t.Fatalf("host sees %q, %v", b, err)
	}

	// Reads come through the shared memory window, intact.
	big := make([]byte, 5<<20+123)
	for i := range big {
		big[i] = byte(i*7 + i>>13)
	}
	os.WriteFile(filepath.Join(dir, "big"), big, 0o644)
	sum := fmt.Sprintf("%x", sha256.Sum256(big))
	if out := mustSh(t, sb, "sha256sum /workspace/big"); !strings.HasPrefix(out, sum) {
		t.Fatalf("guest md5 %q, host %s", out, sum)
	}
	sb.mnt.mu.Lock()
	st := sb.mnt.servers[0].Stats()
	sb.mnt.mu.Unlock()
	if st.WindowReads == 0 || st.StreamReads > st.WindowReads {
		t.Fatalf("no read used the window: %+v", st)
	}
	t.Logf("reads: %d through the window, %d on the stream", st.WindowReads, st.StreamReads)
}

// TestShareExecFromShare starts programs that live on a share, in a
// working directory on the share, as the exec'd process itself (not from a
// shell). The agent forks them, and this once deadlocked: the kernel's
// FUSE requests for the child's chdir and exec wait for the agent, which
// could not run until the exec was done (guest/agent startProcess).
func TestShareExecFromShare(t *testing.T) {
	dir := t.TempDir()
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"bin", "sub/deeper"} {
		os.MkdirAll(filepath.Join(dir, d), 0o755)
	}
	os.WriteFile(filepath.Join(dir, "bin", "busybox"), bb, 0o755)
	os.WriteFile(filepath.Join(dir, "bin", "run.sh"), []byte("#!/bin/sh\necho script in $(pwd)\n"), 0o755)
	sb := newShareSandbox(t, Options{Mounts: []Mount{{Source: dir, Target: "/w"}}})
	// Rounds, since the garbage collector's part of the deadlock needs a
	// collection to start during a fork.
	for round := 0; round < 5; round++ {
		for _, c := range []struct {
			argv []string
			dir  string
			want string
		}{
			{[]string{"/w/bin/busybox", "pwd"}, "/w/sub/deeper", "/w/sub/deeper\n"},
			{[]string{"/w/bin/run.sh"}, "/w/sub", "script in /w/sub\n"},
			{[]string{"/bin/pwd"}, "/w/sub/deeper", "/w/sub/deeper\n"},
		} {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			out, errOut, st, _, err := sb.Output(ctx, ExecOptions{Argv: c.argv, Dir: c.dir, Env: []string{"PATH=/bin"}})
			cancel()
			if err != nil || st.Code != 0 || string(out) != c.want {
				t.Fatalf("round %d: %v in %s: %q %q, exit %d, %v", round, c.argv, c.dir, out, errOut, st.Code, err)
			}
		}
	}
}

// TestShareSemantics runs the syscall checks in the guest on a read-write
// share, then looks at the result from the host.
func TestShareSemantics(t *testing.T) {
	dir := t.TempDir()
	sb := newShareSandbox(t, Options{Mounts: []Mount{{Source: dir, Target: "/workspace"}}})
	installGuestCheck(t, sb)
	out, code := gsh(t, sb, "guestcheck semantics /workspace")
	t.Log(out)
	if code != 0 {
		t.Fatalf("guestcheck failed")
	}
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(dir, "suid"), &st); err != nil || st.Mode&0o7777 != 0o6755 {
		t.Errorf("host: suid file mode %o (%v)", st.Mode, err)
	}
	if err := syscall.Stat(filepath.Join(dir, "sticky"), &st); err != nil || st.Mode&0o7777 != 0o1777 {
		t.Errorf("host: sticky dir mode %o (%v)", st.Mode, err)
	}
	if err := syscall.Stat(filepath.Join(dir, "big"), &st); err != nil || st.Size != 5<<30+127 || st.Blocks*512 > 64<<20 {
		t.Errorf("host: sparse file size %d blocks %d (%v)", st.Size, st.Blocks, err)
	}
	if err := syscall.Stat(filepath.Join(dir, "times"), &st); err != nil {
		t.Error(err)
	}
	if l, err := os.Readlink(filepath.Join(dir, "sl")); err != nil || l != "target" {
		t.Errorf("host: symlink %q %v", l, err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "mm")); len(b) < 17 || string(b[10:17]) != "WRITTEN" {
		t.Errorf("host: mmap write not visible")
	}
	if fi, err := os.Lstat(filepath.Join(dir, "fifo")); err != nil || fi.Mode()&os.ModeNamedPipe == 0 {
		t.Errorf("host: fifo %v %v", fi, err)
	}
	if _, err := os.Lstat(filepath.Join(dir, "dev")); err == nil {
		t.Errorf("host: a device node was created")
	}
}

func TestShareReadOnly(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "f"), []byte("data\n"), 0o644)
	os.Mkdir(filepath.Join(dir, "d"), 0o755)
	before := treeOf(t, dir)
	sb := newShareSandbox(t, Options{Mounts: []Mount{{Source: dir, Target: "/ro", Mode: MountReadOnly}}})
	out := mustSh(t, sb, `cat /ro/f
for cmd in "touch /ro/new" "mkdir /ro/x" "rm /ro/f" "mv /ro/f /ro/g" "chmod 777 /ro/f" "ln -s f /ro/l" "ln /ro/f /ro/h" "rmdir /ro/d" "truncate -s 0 /ro/f" "touch /ro/f"; do
  if $cmd 2>/dev/null; then echo "WROTE: $cmd"; fi
done
echo x >> /ro/f 2>/dev/null && echo "WROTE: append"
grep ' /ro ' /proc/mounts`)
	if strings.Contains(out, "WROTE") || !strings.Contains(out, "data") {
		t.Fatalf("guest output:\n%s", out)
	}
	// The guest's own read-only flag aside, the host refuses too: remount
	// the guest side read-write and try again.
	out = mustSh(t, sb, `mount -o remount,rw /ro 2>&1; grep ' /ro ' /proc/mounts
touch /ro/new 2>&1; echo x >> /ro/f 2>&1; mkdir /ro/x 2>&1; rm /ro/f 2>&1; true`)
	t.Log(out)
	if after := treeOf(t, dir); after != before {
		t.Fatalf("host directory changed:\n%s\n---\n%s", before, after)
	}
}

func TestShareOverlay(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "keep"), []byte("host\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "edit"), []byte("host\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "gone"), []byte("host\n"), 0o644)
	os.MkdirAll(filepath.Join(dir, "sub", "deep"), 0o755)
	os.WriteFile(filepath.Join(dir, "sub", "deep", "f"), []byte("deep\n"), 0o644)
	before := treeOf(t, dir)
	sb := newShareSandbox(t, Options{Mounts: []Mount{{Source: dir, Target: "/ov", Mode: MountOverlay}}})
	out := mustSh(t, sb, `set -e
cat /ov/keep
echo guest >> /ov/edit
rm /ov/gone
echo new > /ov/new
mv /ov/sub/deep/f /ov/moved
mkdir -p /ov/sub/deep/more && echo x > /ov/sub/deep/more/y
chmod 600 /ov/keep
ln /ov/keep /ov/link
[ "$(stat -c %d:%i:%h /ov/keep)" = "$(stat -c %d:%i:%h /ov/link)" ] && echo same-inode
cat /ov/edit; ls /ov; ls /ov/sub/deep
grep ' /ov ' /proc/mounts`)
	for _, want := range []string{"host\nguest\n", "moved", "new", "more", "overlay", "same-inode"} {
		if !strings.Contains(out, want) {
			t.Fatalf("guest output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(strings.SplitN(out, "guest\n", 2)[1], "gone") {
		t.Fatalf("deleted file still listed:\n%s", out)
	}
	if after := treeOf(t, dir); after != before {
		t.Fatalf("host directory changed:\n%s\n---\n%s", before, after)
	}
}

func TestShareOwner(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "f"), nil, 0o644)
	sb := newShareSandbox(t, Options{Mounts: []Mount{
		{Source: dir, Target: "/as-root"},
		{Source: dir, Target: "/as-app", Owner: "1000:1000"},
		{Source: dir, Target: "/by-name", Owner: "app"},
	}})
	out := mustSh(t, sb, `stat -c '%u:%g %n' /as-root/f /as-app/f /by-name/f
su app -s /bin/sh -c 'echo hi > /as-app/by-app && echo app-wrote'
su app -s /bin/sh -c 'echo hi > /as-root/by-app 2>/dev/null || echo app-refused'
chown 0:0 /as-app/f 2>/dev/null || echo chown-refused`)
	for _, want := range []string{"0:0 /as-root/f", "1000:1000 /as-app/f", "1000:1000 /by-name/f", "app-wrote", "app-refused", "chown-refused"} {
		if !strings.Contains(out, want) {
			t.Fatalf("guest output lacks %q:\n%s", want, out)
		}
	}
}

func TestShareStorm(t *testing.T) {
	dir := t.TempDir()
	sb := newShareSandbox(t, Options{Mounts: []Mount{{Source: dir, Target: "/workspace"}}})
	installGuestCheck(t, sb)
	out, code := gsh(t, sb, "guestcheck storm /workspace 5000")
	t.Log(out)
	if code != 0 {
		t.Fatal("storm failed")
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("host has %d entries left", len(ents))
	}
}

// TestShareEscape: dot-dot, symlinks planted on the host (absolute,
// relative, to /), hardlinks of them, and a directory flipped with a
// symlink to the outside while the guest hammers it: the guest never sees
// the file next to the share.
func TestShareEscape(t *testing.T) {
	base := t.TempDir()
	share, outside := filepath.Join(base, "share"), filepath.Join(base, "outside")
	os.MkdirAll(share, 0o755)
	os.MkdirAll(outside, 0o755)
	const token = "TOKEN-7f3a9c"
	os.WriteFile(filepath.Join(outside, "secret"), []byte(token), 0o644)
	os.Symlink(outside, filepath.Join(share, "up"))
	os.Symlink("../outside", filepath.Join(share, "rel"))
	os.Symlink("/", filepath.Join(share, "root"))
	os.Symlink(filepath.Join(outside, "secret"), filepath.Join(share, "file"))
	os.Symlink(filepath.Join(outside, "secret"), filepath.Join(share, "abs"))
	flip := filepath.Join(share, "flip")
	os.Mkdir(flip, 0o755)
	os.WriteFile(filepath.Join(flip, "secret"), []byte("inside"), 0o644)

	sb := newShareSandbox(t, Options{Mounts: []Mount{{Source: share, Target: "/workspace"}}})
	installGuestCheck(t, sb)
	out, _ := gsh(t, sb, "guestcheck find /workspace "+token+"; cat /workspace/../outside/secret /workspace/up/secret /workspace/rel/secret /workspace/file 2>&1")
	t.Log(out)
	if strings.Contains(out, "FAIL") || !strings.Contains(out, "ok find") || strings.Contains(strings.ReplaceAll(out, "find "+token, ""), token) {
		t.Fatal("the guest reached the outside file")
	}

	var stop atomic.Bool
	var flips atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		tmp, aside := filepath.Join(share, "flip.tmp"), filepath.Join(share, "flip.dir")
		for !stop.Load() {
			os.Remove(tmp)
			os.Symlink(outside, tmp)
			os.Rename(flip, aside)
			os.Rename(tmp, flip)
			os.Rename(flip, tmp)
			os.Rename(aside, flip)
			flips.Add(1)
		}
	}()
	out, code := gsh(t, sb, "guestcheck race /workspace 3000")
	stop.Store(true)
	<-done
	t.Logf("%s(%d flips on the host)", out, flips.Load())
	if code != 0 || strings.Contains(out, token) {
		t.Fatal("the race reached the outside file")
	}
	ents, _ := os.ReadDir(outside)
	if b, _ := os.ReadFile(filepath.Join(outside, "secret")); len(ents) != 1 || string(b) != token {
		t.Fatalf("the outside directory changed: %v %q", ents, b)
	}
}

func TestVolumes(t *testing.T) {
	t.Setenv("MATCHLOCK_HOME", t.TempDir())
	if _, err := workspace.CreateVolume(context.Background(), "data", 64); err != nil {
		t.Fatal(err)
	}
	a := newShareSandbox(t, Options{Volumes: []VolumeMount{{Name: "data", Target: "/data"}}})
	mustSh(t, a, "echo persisted > /data/f; mkdir /data/d; grep ' /data ' /proc/mounts")
	// One sandbox at a time.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	agent, _ := agentOnce()
	_, err := New(ctx, Options{Image: "test", Images: source, Agent: agent, MemoryMiB: 256, DiskSizeMiB: 64, NoNetwork: true,
		Volumes: []VolumeMount{{Name: "data", Target: "/data"}}})
	if !errors.Is(err, workspace.ErrVolumeInUse) {
		t.Fatalf("second attach: %v", err)
	}
	if err := workspace.RemoveVolume("data"); !errors.Is(err, workspace.ErrVolumeInUse) {
		t.Fatalf("rm of an attached volume: %v", err)
	}
	a.Close()
	b := newShareSandbox(t, Options{Volumes: []VolumeMount{{Name: "data", Target: "/mnt/v", ReadOnly: true}}})
	out := mustSh(t, b, "cat /mnt/v/f; ls -d /mnt/v/d; touch /mnt/v/x 2>/dev/null || echo read-only")
	if !strings.Contains(out, "persisted") || !strings.Contains(out, "read-only") {
		t.Fatalf("second sandbox sees:\n%s", out)
	}
	b.Close()
	if err := workspace.RemoveVolume("data"); err != nil {
		t.Fatal(err)
	}
}

// TestShare9P mounts the same directory over QEMU's virtio-9p (what the
// bench compares against).
func TestShare9P(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "f"), []byte("nine\n"), 0o644)
	sb := newShareSandbox(t, Options{Mounts: []Mount{
		{Source: dir, Target: "/fuse"},
		{Source: dir, Target: "/9p", Transport: "9p"},
	}})
	// (9p with cache=loose keeps its writes in the guest's page cache for a
	// while: write through the FUSE share, read through 9p.)
	out := mustSh(t, sb, "cat /9p/f /fuse/f; echo w > /fuse/g; cat /9p/g; grep -E ' /(9p|fuse) ' /proc/mounts")
	if strings.Count(out, "nine") != 2 || !strings.Contains(out, "w\n") || !strings.Contains(out, " 9p ") {
		t.Fatalf("guest output:\n%s", out)
	}
}

// treeOf describes every entry under dir: names, modes, sizes, mtimes,
// link targets, contents' hashes.
func treeOf(t testing.TB, dir string) string {
	var b strings.Builder
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		fmt.Fprintf(&b, "%s %v %d %d", rel, fi.Mode(), fi.Size(), fi.ModTime().UnixNano())
		if fi.Mode().IsRegular() {
			c, _ := os.ReadFile(p)
			fmt.Fprintf(&b, " %x", sha256.Sum256(c))
		}
		b.WriteString("\n")
		return nil
	})
	return b.String()
}

func TestParseMountFlag(t *testing.T) {
	for _, c := range []struct {
		in  string
		m   *Mount
		v   *VolumeMount
		bad bool
	}{
		{in: "/src:/workspace", m: &Mount{Source: "/src", Target: "/workspace"}},
		{in: "./rel:/w:ro", m: &Mount{Source: "./rel", Target: "/w", Mode: MountReadOnly}},
		{in: "/src:/w:overlay,uid=1000,gid=100", m: &Mount{Source: "/src", Target: "/w", Mode: MountOverlay, Owner: "1000:100"}},
		{in: "/src:/w:uid=7", m: &Mount{Source: "/src", Target: "/w", Owner: "7"}},
		{in: "@cache:/root/.cache", v: &VolumeMount{Name: "cache", Target: "/root/.cache"}},
		{in: "@cache:/c:ro", v: &VolumeMount{Name: "cache", Target: "/c", ReadOnly: true}},
		{in: "/src", bad: true},
		{in: ":/w", bad: true},
		{in: "/src:", bad: true},
		{in: "/src:/w:ro,overlay", bad: true},
		{in: "/src:/w:uid=x", bad: true},
		{in: "/src:/w:bogus", bad: true},
		{in: "@v:/w:overlay", bad: true},
	} {
		m, v, err := ParseMountFlag(c.in)
		if c.bad {
			if err == nil {
				t.Errorf("%q: accepted", c.in)
			}
			continue
		}
		if err != nil {
			t.Errorf("%q: %v", c.in, err)
			continue
		}
		if (c.m == nil) != (m == nil) || (c.m != nil && *c.m != *m) || (c.v == nil) != (v == nil) || (c.v != nil && *c.v != *v) {
			t.Errorf("%q: got %+v %+v", c.in, m, v)
		}
	}
	for _, target := range []string{"relative", "/", "/proc", "/sys/x", "/dev/shm"} {
		if _, err := checkTarget(target); err == nil {
			t.Errorf("target %q accepted", target)
		}
	}
}

// TestShareListings: LOOKUPs of many names in one directory are answered
// from one listing (few host LOOKUPs, absent names included), a guest write
// drops the listing (no stale size after the kernel forgets the inode), and
// names the host creates or changes show up within the cache time.
func TestShareListings(t *testing.T) {
	slow, fast := t.TempDir(), t.TempDir()
	os.Mkdir(filepath.Join(slow, "sub"), 0o755)
	for i := 0; i < 100; i++ {
		os.WriteFile(filepath.Join(slow, fmt.Sprintf("f%d", i)), []byte("x\n"), 0o644)
		os.WriteFile(filepath.Join(slow, "sub", fmt.Sprintf("f%d", i%20)), []byte("x\n"), 0o644)
	}
	for _, n := range []string{"a", "b", "c"} {
		os.WriteFile(filepath.Join(fast, n), []byte("x\n"), 0o644)
	}
	sb := newShareSandbox(t, Options{Mounts: []Mount{
		{Source: slow, Target: "/slow", CacheTTL: time.Minute},
		{Source: fast, Target: "/fast", CacheTTL: 300 * time.Millisecond},
	}})
	lookups := func() uint64 {
		sb.mnt.mu.Lock()
		defer sb.mnt.mu.Unlock()
		var n uint64
		for _, srv := range sb.mnt.servers {
			n += srv.Stats().Lookups
		}
		return n
	}
	before := lookups()
	mustSh(t, sb, `cd /slow; i=0; while [ $i -lt 100 ]; do [ -e f$i ] || echo missing f$i; [ -e nope$i ] && echo present nope$i; i=$((i+1)); done`)
	if n := lookups() - before; n > 10 {
		t.Errorf("200 names looked up with %d host LOOKUPs", n)
	}
	// Changes through the share keep the listing true.
	out := mustSh(t, sb, `cd /slow; rm f1; mv f2 g2; echo new > f1; mkdir d; for n in f1 f2 g2 d f3 zz; do [ -e $n ] && echo $n; done; true`)
	if got := strings.Fields(out); strings.Join(got, " ") != "f1 g2 d f3" {
		t.Errorf("after rm, mv, create, mkdir the guest sees %q", got)
	}
	// Two misses list sub with f0..f19 unhanded; ls -l gives the kernel
	// the inodes another way; the append must not leave the listing's size.
	out = mustSh(t, sb, `cd /slow/sub; [ -e g1 ]; [ -e g2 ]; ls -l >/dev/null
echo more >> f9; echo 2 > /proc/sys/vm/drop_caches; stat -c %s f9`)
	if strings.TrimSpace(out) != "7" {
		t.Errorf("size after a guest append and a cache drop: %q, want 7", out)
	}

	// Names the host makes or removes in a listed directory show up long
	// before its minute of cache time: the host watches it and says so.
	os.WriteFile(filepath.Join(slow, "hostnew"), []byte("h\n"), 0o644)
	os.Remove(filepath.Join(slow, "f50"))
	out = mustSh(t, sb, `cd /slow; t0=$(cut -d' ' -f1 /proc/uptime)
while ! [ -e hostnew ] || [ -e f50 ]; do usleep 20000; done
echo $t0 $(cut -d' ' -f1 /proc/uptime)`)
	var t0, t1 float64
	if _, err := fmt.Sscan(out, &t0, &t1); err != nil || t1-t0 > 5 {
		t.Errorf("host create/remove in a listed directory seen after %.2f s (%q)", t1-t0, out)
	}

	mustSh(t, sb, `cd /fast; [ -e a ] && [ -e b ] && [ -e c ] && [ ! -e new ]`)
	os.WriteFile(filepath.Join(fast, "new"), []byte("host\n"), 0o644)
	os.WriteFile(filepath.Join(fast, "a"), []byte("longer\n"), 0o644)
	out = mustSh(t, sb, `cd /fast; t0=$(cut -d' ' -f1 /proc/uptime)
while ! [ -e new ] || [ "$(stat -c %s a)" != 7 ]; do usleep 20000; done
echo $t0 $(cut -d' ' -f1 /proc/uptime)`)
	if _, err := fmt.Sscan(out, &t0, &t1); err != nil || t1-t0 > 2 {
		t.Errorf("host changes seen after %.2f s with a 0.3 s cache time (%q)", t1-t0, out)
	}
}
