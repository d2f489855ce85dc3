package workspace

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"matchlock.dev/matchlock/guest/proto/fsproto"
)

// These tests forge requests directly against the server, as a hostile
// guest agent could: none may reach the directory next to the share.

func TestEscapeNames(t *testing.T) {
	c := newTC(t, Config{})
	os.Mkdir(filepath.Join(c.dir, "sub"), 0o755)
	// Names are checked by the decoder, and again by the server for
	// requests that did not come through it.
	for _, name := range []string{"..", ".", "../outside", "sub/..", "/etc", "a\x00b", "", strings.Repeat("x", 256)} {
		for _, op := range []fsproto.Op{fsproto.OpLookup, fsproto.OpMkdir, fsproto.OpCreate, fsproto.OpUnlink, fsproto.OpSymlink} {
			r := &fsproto.Request{Op: op, Node: RootNode, Name: name, Name2: "t", OFlags: unix.O_RDWR, Mode: 0o644}
			if _, err := fsproto.DecodeRequest(fsproto.AppendRequest(nil, r)[4:]); err == nil {
				t.Errorf("decoder accepted %s %q", op, name)
			}
			if _, e := c.s.Handle(r); e != unix.EINVAL {
				t.Errorf("server ran %s %q: %v", op, name, e)
			}
		}
		r := &fsproto.Request{Op: fsproto.OpRename, Node: RootNode, Name: "sub", Node2: RootNode, Name2: name}
		if _, e := c.s.Handle(r); e != unix.EINVAL {
			t.Errorf("rename to %q: %v", name, e)
		}
	}
	c.checkOutside()
}

func TestEscapeSymlinks(t *testing.T) {
	c := newTC(t, Config{})
	// Planted by someone on the host, or made by the guest: absolute,
	// relative and to the root.
	links := map[string]string{"abs": c.out, "rel": "../outside", "root": "/", "file": filepath.Join(c.out, "secret")}
	for name, target := range links {
		if err := os.Symlink(target, filepath.Join(c.dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	for name, target := range links {
		n, a, e := c.lookup(RootNode, name)
		if e != 0 || a.Mode&unix.S_IFMT != unix.S_IFLNK {
			t.Fatalf("lookup %s: %v mode %o", name, e, a.Mode)
		}
		if got := string(c.must(&fsproto.Request{Op: fsproto.OpReadlink, Node: n})); got != target {
			t.Fatalf("readlink %s: %q", name, got)
		}
		// Nothing looks through it, opens it, or writes via it.
		if _, _, e := c.lookup(n, "secret"); e != unix.ENOTDIR {
			t.Errorf("lookup through %s: %v", name, e)
		}
		if _, e := c.do(&fsproto.Request{Op: fsproto.OpOpen, Node: n, OFlags: unix.O_RDONLY}); e == 0 {
			t.Errorf("open of symlink %s succeeded", name)
		}
		if _, e := c.do(&fsproto.Request{Op: fsproto.OpOpendir, Node: n}); e != unix.ENOTDIR {
			t.Errorf("opendir of symlink %s: %v", name, e)
		}
		if _, e := c.do(&fsproto.Request{Op: fsproto.OpCreate, Node: n, Name: "x", OFlags: unix.O_RDWR, Mode: 0o644}); e != unix.ENOTDIR {
			t.Errorf("create under symlink %s: %v", name, e)
		}
		for _, r := range []*fsproto.Request{
			{Op: fsproto.OpSetattr, Node: n, Valid: fsproto.SetMode, Mode: 0o777},
			{Op: fsproto.OpSetattr, Node: n, Valid: fsproto.SetSize},
			{Op: fsproto.OpSetxattr, Node: n, Name: "user.x", Data: []byte("1")},
		} {
			if _, e := c.do(r); e == 0 {
				t.Errorf("%s on symlink %s succeeded", r.Op, name)
			}
		}
		// A hardlink of a symlink node links the symlink, not its target.
		hn := "hl-" + name
		if _, e := c.do(&fsproto.Request{Op: fsproto.OpLink, Node: n, Node2: RootNode, Name: hn}); e == 0 {
			fi, err := os.Lstat(filepath.Join(c.dir, hn))
			if err != nil || fi.Mode()&os.ModeSymlink == 0 {
				t.Fatalf("hardlink of symlink %s is %v (%v)", name, fi.Mode(), err)
			}
		}
		// Renaming the symlink and removing it act on the link itself.
		c.must(&fsproto.Request{Op: fsproto.OpRename, Node: RootNode, Name: name, Node2: RootNode, Name2: name + "2"})
		c.must(&fsproto.Request{Op: fsproto.OpUnlink, Node: RootNode, Name: name + "2"})
	}
	// Times of a symlink node set the link's own times.
	os.Symlink(c.out, filepath.Join(c.dir, "t"))
	n, _, _ := c.lookup(RootNode, "t")
	c.must(&fsproto.Request{Op: fsproto.OpSetattr, Node: n, Valid: fsproto.SetMtime, Mtime: fsproto.Timespec{Sec: 7}})
	if fi, _ := os.Stat(c.out); fi.ModTime().Unix() == 7 {
		t.Fatal("setattr of a symlink changed its target's times")
	}
	c.checkOutside()
}

func TestEscapeHardlinks(t *testing.T) {
	c := newTC(t, Config{})
	// A forged source node: unknown, the root directory, a directory.
	d := c.mkdir(RootNode, "d")
	for _, src := range []uint64{0, 999, 1 << 62} {
		if _, e := c.do(&fsproto.Request{Op: fsproto.OpLink, Node: src, Node2: RootNode, Name: "x"}); e != unix.ESTALE {
			t.Errorf("link from node %d: %v", src, e)
		}
	}
	for _, src := range []uint64{RootNode, d} {
		if _, e := c.do(&fsproto.Request{Op: fsproto.OpLink, Node: src, Node2: RootNode, Name: "x"}); e != unix.EPERM {
			t.Errorf("link of directory node %d: %v", src, e)
		}
	}
	// A forged destination: a file node, an unknown node.
	n, fh := c.create(RootNode, "f", unix.O_RDWR, 0o644)
	c.do(&fsproto.Request{Op: fsproto.OpRelease, Fh: fh})
	for _, dst := range []uint64{n, 999} {
		if _, e := c.do(&fsproto.Request{Op: fsproto.OpLink, Node: n, Node2: dst, Name: "x"}); e == 0 {
			t.Errorf("link into node %d succeeded", dst)
		}
	}
	// A node of a directory moved out of the share by the host keeps
	// working (like a bind mount), but its parent stays unreachable:
	// there is no "..".
	if _, err := os.Stat(filepath.Join(c.dir, "x")); err == nil {
		t.Fatal("a forged link created a name")
	}
	c.checkOutside()
}

func TestEscapeHandlesAndNodes(t *testing.T) {
	c := newTC(t, Config{})
	dn := c.mkdir(RootNode, "d")
	dfh, _ := fsproto.Uint64(c.must(&fsproto.Request{Op: fsproto.OpOpendir, Node: dn}))
	n, fh := c.create(RootNode, "f", unix.O_RDONLY, 0o644)
	for _, r := range []*fsproto.Request{
		{Op: fsproto.OpRead, Fh: 999, Size: 10},
		{Op: fsproto.OpRead, Fh: dfh, Size: 10}, // a directory handle as a file
		{Op: fsproto.OpReaddir, Fh: fh, Size: 4096},
		{Op: fsproto.OpWrite, Fh: fh, Data: []byte("x")}, // opened read-only
		{Op: fsproto.OpFsync, Fh: 0},
		{Op: fsproto.OpGetattr, Node: 12345},
		{Op: fsproto.OpLookup, Node: n, Name: "x"}, // a file as a directory
		{Op: fsproto.OpMkdir, Node: 0, Name: "x"},
		{Op: fsproto.OpOpen, Node: dn, OFlags: unix.O_RDONLY},
		{Op: fsproto.OpOpen, Node: n, OFlags: unix.O_ACCMODE},
		{Op: fsproto.OpRename, Node: RootNode, Name: "f", Node2: n, Name2: "g"},
		{Op: fsproto.OpRename, Node: RootNode, Name: "f", Node2: RootNode, Name2: "g", OFlags: unix.RENAME_WHITEOUT},
		{Op: fsproto.OpFallocate, Fh: fh, Size: 10, Mode: 0x100},
		{Op: fsproto.OpLseek, Fh: fh, OFlags: unix.SEEK_SET},
	} {
		if _, e := c.s.Handle(r); e == 0 {
			t.Errorf("%s %+v succeeded", r.Op, r)
		}
	}
	// A released handle is gone; releasing again is harmless.
	c.do(&fsproto.Request{Op: fsproto.OpRelease, Fh: fh})
	c.do(&fsproto.Request{Op: fsproto.OpRelease, Fh: fh})
	if _, e := c.do(&fsproto.Request{Op: fsproto.OpRead, Fh: fh, Size: 1}); e != unix.EBADF {
		t.Fatalf("read of a released handle: %v", e)
	}
	c.checkOutside()
}

// TestEscapeSpecialFiles: FIFOs, sockets and device nodes in the share are
// never opened on the host, so nothing blocks or touches a device.
func TestEscapeSpecialFiles(t *testing.T) {
	c := newTC(t, Config{})
	if err := unix.Mkfifo(filepath.Join(c.dir, "fifo"), 0o666); err != nil {
		t.Fatal(err)
	}
	haveDev := unix.Mknod(filepath.Join(c.dir, "null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))) == nil
	names := []string{"fifo"}
	if haveDev {
		names = append(names, "null")
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for _, name := range names {
			n, _, e := c.lookup(RootNode, name)
			if e != 0 {
				t.Errorf("lookup %s: %v", name, e)
				continue
			}
			for _, fl := range []uint32{unix.O_RDONLY, unix.O_WRONLY, unix.O_RDWR} {
				if _, e := c.do(&fsproto.Request{Op: fsproto.OpOpen, Node: n, OFlags: fl}); e != unix.ENXIO {
					t.Errorf("open %s flags %d: %v", name, fl, e)
				}
			}
			// create without O_EXCL over the name must not open it either.
			if _, e := c.do(&fsproto.Request{Op: fsproto.OpCreate, Node: RootNode, Name: name, OFlags: unix.O_WRONLY, Mode: 0o644}); e != unix.EEXIST {
				t.Errorf("create over %s: %v", name, e)
			}
			if _, e := c.do(&fsproto.Request{Op: fsproto.OpSetattr, Node: n, Valid: fsproto.SetSize}); e != unix.EINVAL {
				t.Errorf("truncate %s: %v", name, e)
			}
		}
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second): // only reached if an open blocked
		t.Fatal("a request blocked on a special file")
	}
	c.checkOutside()
}

// TestEscapeSymlinkRace flips a directory of the share with a symlink to
// the outside while requests hammer paths through it: fd-relative,
// no-follow lookups never leave the share, whatever the interleaving.
func TestEscapeSymlinkRace(t *testing.T) {
	c := newTC(t, Config{})
	flip := filepath.Join(c.dir, "flip")
	if err := os.Mkdir(flip, 0o755); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(flip, "secret"), []byte("inside"), 0o644)
	inner := filepath.Join(c.dir, "flip.dir")
	var stop atomic.Bool
	var flips atomic.Int64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		// Swap "flip" between the real directory and a symlink to the
		// outside, atomically (rename over), as fast as possible.
		tmp := filepath.Join(c.dir, "flip.tmp")
		for !stop.Load() {
			os.Remove(tmp)
			os.Symlink(c.out, tmp)
			os.Rename(flip, inner)
			os.Rename(tmp, flip)
			os.Rename(flip, tmp)
			os.Rename(inner, flip)
			flips.Add(1)
		}
	}()
	leaked := func(b []byte) bool { return bytes.Contains(b, []byte("TOKEN")) }
	var found, iterations int
	for iterations = 0; iterations < 20000 && (iterations < 2000 || flips.Load() < 100); iterations++ {
		dn, _, e := c.lookup(RootNode, "flip")
		if e != 0 {
			continue
		}
		sn, _, e := c.lookup(dn, "secret")
		if e == 0 {
			if fh, e := c.do(&fsproto.Request{Op: fsproto.OpOpen, Node: sn, OFlags: unix.O_RDONLY}); e == 0 {
				h, _ := fsproto.Uint64(fh)
				b, _ := c.do(&fsproto.Request{Op: fsproto.OpRead, Fh: h, Size: 100})
				if leaked(b) {
					t.Fatalf("read the outside file through the race")
				}
				found++
				c.do(&fsproto.Request{Op: fsproto.OpRelease, Fh: h})
			}
			c.do(&fsproto.Request{Op: fsproto.OpForget, Data: fsproto.AppendForget(nil, fsproto.ForgetItem{Node: sn, Count: 1})})
		}
		// Creating through it must land inside too.
		if b, e := c.do(&fsproto.Request{Op: fsproto.OpCreate, Node: dn, Name: "new", OFlags: unix.O_WRONLY, Mode: 0o644}); e == 0 {
			h, _ := fsproto.Uint64(b[fsproto.EntrySize:])
			c.do(&fsproto.Request{Op: fsproto.OpRelease, Fh: h})
			c.do(&fsproto.Request{Op: fsproto.OpUnlink, Node: dn, Name: "new"})
		}
		fh, e := c.do(&fsproto.Request{Op: fsproto.OpOpendir, Node: dn})
		if e == 0 {
			h, _ := fsproto.Uint64(fh)
			b, _ := c.do(&fsproto.Request{Op: fsproto.OpReaddir, Fh: h, Size: 4096, Flags: fsproto.FlagPlus})
			fsproto.DecodeDirents(b, true, func(d *fsproto.Dirent) bool {
				if d.Node != 0 && d.Name == "secret" {
					c.do(&fsproto.Request{Op: fsproto.OpForget, Data: fsproto.AppendForget(nil, fsproto.ForgetItem{Node: d.Node, Count: 1})})
				}
				return true
			})
			c.do(&fsproto.Request{Op: fsproto.OpReleasedir, Fh: h})
		}
		c.do(&fsproto.Request{Op: fsproto.OpForget, Data: fsproto.AppendForget(nil, fsproto.ForgetItem{Node: dn, Count: 1})})
	}
	stop.Store(true)
	wg.Wait()
	t.Logf("%d iterations, %d flips, %d reads of the inside file", iterations, flips.Load(), found)
	c.checkOutside()
	if found == 0 {
		t.Log("never read the inside file: the race was one-sided")
	}
}

// TestMovedOutDirectory documents the one way a node can end up outside:
// the host itself moves a directory out while the guest holds it. The
// guest keeps that directory (as with a bind mount) but cannot go up.
func TestMovedOutDirectory(t *testing.T) {
	c := newTC(t, Config{})
	os.Mkdir(filepath.Join(c.dir, "d"), 0o755)
	dn, _, _ := c.lookup(RootNode, "d")
	moved := filepath.Join(filepath.Dir(c.dir), "moved")
	if err := os.Rename(filepath.Join(c.dir, "d"), moved); err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(moved)
	for _, name := range []string{"..", "../outside"} {
		if _, e := c.s.Handle(&fsproto.Request{Op: fsproto.OpLookup, Node: dn, Name: name}); e != unix.EINVAL {
			t.Fatalf("lookup %q from a moved directory: %v", name, e)
		}
	}
	c.checkOutside()
}

var _ = syscall.Errno(0)
