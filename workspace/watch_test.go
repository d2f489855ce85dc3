package workspace

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"matchlock.dev/matchlock/guest/proto/fsproto"
)

// TestWatch: a readdir with FlagWatch and a new directory are watched
// (ReplyWatched); names the host changes there are reported, the server's
// own changes are not, and a forgotten directory is no longer watched.
func TestWatch(t *testing.T) {
	c := newTC(t, Config{})
	if c.s.w == nil {
		t.Fatal("no inotify")
	}
	type note struct {
		dir  uint64
		name string
	}
	notes := make(chan note, 16)
	go c.s.w.run(func(dir uint64, name string) { notes <- note{dir, name} })
	next := func() note {
		t.Helper()
		select {
		case n := <-notes:
			return n
		case <-time.After(10 * time.Second):
			t.Fatal("no notification")
			return note{}
		}
	}

	_, _, flags := c.s.execWatched(&fsproto.Request{Op: fsproto.OpReaddir, Flags: fsproto.FlagPlus | fsproto.FlagWatch, Node: RootNode, Size: 4096}, nil)
	if flags&fsproto.ReplyWatched == 0 {
		t.Fatal("readdir with FlagWatch: not watched")
	}
	b, e, flags := c.s.execWatched(&fsproto.Request{Op: fsproto.OpMkdir, Node: RootNode, Name: "sub", Mode: 0o755}, nil)
	if e != 0 || flags&fsproto.ReplyWatched == 0 {
		t.Fatalf("mkdir: errno %v, flags %#x", e, flags)
	}
	sub, _ := c.entry(b)

	// Ours (mkdir above, create here) first, then the host's.
	if _, e, _ := c.s.execWatched(&fsproto.Request{Op: fsproto.OpCreate, Flags: fsproto.FlagNoHandle, Node: sub, Name: "mine", OFlags: unix.O_WRONLY, Mode: 0o644}, nil); e != 0 {
		t.Fatal(e)
	}
	os.WriteFile(filepath.Join(c.dir, "sub", "theirs"), nil, 0o644)
	if n := next(); n != (note{sub, "theirs"}) {
		t.Fatalf("first notification %+v, want the host's create in sub", n)
	}
	os.Rename(filepath.Join(c.dir, "sub", "theirs"), filepath.Join(c.dir, "moved"))
	for _, want := range []note{{sub, "theirs"}, {RootNode, "moved"}} {
		if n := next(); n != want {
			t.Fatalf("notification %+v, want %+v", n, want)
		}
	}

	c.s.forget(sub, 1)
	os.WriteFile(filepath.Join(c.dir, "sub", "later"), nil, 0o644)
	os.WriteFile(filepath.Join(c.dir, "root-later"), nil, 0o644)
	if n := next(); n != (note{RootNode, "root-later"}) {
		t.Fatalf("after forget: %+v, want only the root's change", n)
	}
}
