package workspace

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"matchlock.dev/matchlock/guest/proto/fsproto"
)

// tc drives a Server the way the guest does, one request at a time, with
// every request encoded and decoded first (so the decoder is in the path).
type tc struct {
	t   testing.TB
	s   *Server
	dir string // the shared directory
	out string // a directory next to it that must stay untouched
}

func newTC(t testing.TB, cfg Config) *tc {
	t.Helper()
	base := t.TempDir()
	c := &tc{t: t, dir: filepath.Join(base, "share"), out: filepath.Join(base, "outside")}
	for _, d := range []string{c.dir, c.out} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(c.out, "secret"), []byte("TOKEN-outside"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg.Dir = c.dir
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c.s = s
	t.Cleanup(func() { s.Close() })
	return c
}

// do encodes, decodes and executes r.
func (c *tc) do(r *fsproto.Request) ([]byte, syscall.Errno) {
	c.t.Helper()
	rec := fsproto.AppendRequest(nil, r)
	d, err := fsproto.DecodeRequest(rec[4:])
	if err != nil {
		c.t.Fatalf("%s: the test built a malformed request: %v", r.Op, err)
	}
	return c.s.Handle(d)
}

func (c *tc) must(r *fsproto.Request) []byte {
	c.t.Helper()
	b, e := c.do(r)
	if e != 0 {
		c.t.Fatalf("%s %q: %v", r.Op, r.Name, e)
	}
	return b
}

func (c *tc) entry(b []byte) (uint64, fsproto.Attr) {
	c.t.Helper()
	n, a, ok := fsproto.DecodeEntry(b)
	if !ok {
		c.t.Fatalf("short entry: %d bytes", len(b))
	}
	return n, a
}

func (c *tc) lookup(parent uint64, name string) (uint64, fsproto.Attr, syscall.Errno) {
	c.t.Helper()
	b, e := c.do(&fsproto.Request{Op: fsproto.OpLookup, Node: parent, Name: name})
	if e != 0 {
		return 0, fsproto.Attr{}, e
	}
	n, a := c.entry(b)
	return n, a, 0
}

func (c *tc) create(parent uint64, name string, flags uint32, mode uint32) (node, fh uint64) {
	c.t.Helper()
	b := c.must(&fsproto.Request{Op: fsproto.OpCreate, Node: parent, Name: name, OFlags: flags, Mode: mode})
	node, _ = c.entry(b)
	fh, ok := fsproto.Uint64(b[fsproto.EntrySize:])
	if !ok {
		c.t.Fatal("create: no fh")
	}
	return node, fh
}

func (c *tc) open(node uint64, flags uint32) uint64 {
	c.t.Helper()
	fh, _ := fsproto.Uint64(c.must(&fsproto.Request{Op: fsproto.OpOpen, Node: node, OFlags: flags}))
	return fh
}

func (c *tc) write(fh uint64, off uint64, data string) {
	c.t.Helper()
	b := c.must(&fsproto.Request{Op: fsproto.OpWrite, Fh: fh, Off: off, Data: []byte(data)})
	if n, _ := fsproto.Uint32(b); int(n) != len(data) {
		c.t.Fatalf("wrote %d of %d", n, len(data))
	}
}

func (c *tc) read(fh uint64, off, size uint64) string {
	c.t.Helper()
	return string(c.must(&fsproto.Request{Op: fsproto.OpRead, Fh: fh, Off: off, Size: size}))
}

func (c *tc) mkdir(parent uint64, name string) uint64 {
	c.t.Helper()
	n, _ := c.entry(c.must(&fsproto.Request{Op: fsproto.OpMkdir, Node: parent, Name: name, Mode: 0o755}))
	return n
}

func (c *tc) readdir(dir uint64, plus bool) map[string]fsproto.Dirent {
	c.t.Helper()
	fh, _ := fsproto.Uint64(c.must(&fsproto.Request{Op: fsproto.OpOpendir, Node: dir}))
	defer c.do(&fsproto.Request{Op: fsproto.OpReleasedir, Fh: fh})
	out := map[string]fsproto.Dirent{}
	var off uint64
	req := &fsproto.Request{Op: fsproto.OpReaddir, Fh: fh, Size: 4096}
	if plus {
		req.Flags = fsproto.FlagPlus
	}
	for {
		req.Off = off
		b := c.must(req)
		if len(b) == 0 {
			return out
		}
		fsproto.DecodeDirents(b, plus, func(d *fsproto.Dirent) bool {
			out[d.Name] = *d
			off = d.Off
			return true
		})
	}
}

// checkOutside fails the test if the directory next to the share changed.
func (c *tc) checkOutside() {
	c.t.Helper()
	ents, err := os.ReadDir(c.out)
	if err != nil || len(ents) != 1 || ents[0].Name() != "secret" {
		c.t.Fatalf("outside directory changed: %v %v", ents, err)
	}
	b, err := os.ReadFile(filepath.Join(c.out, "secret"))
	if err != nil || string(b) != "TOKEN-outside" {
		c.t.Fatalf("outside file changed: %q %v", b, err)
	}
	var st unix.Stat_t
	if err := unix.Stat(filepath.Join(c.out, "secret"), &st); err != nil || st.Nlink != 1 || st.Mode&0o7777 != 0o644 {
		c.t.Fatalf("outside file's inode changed: nlink %d mode %o %v", st.Nlink, st.Mode, err)
	}
	if _, err := unix.Getxattr(filepath.Join(c.out, "secret"), "user.x", nil); err != unix.ENODATA && err != unix.ENOTSUP {
		c.t.Fatalf("outside file has an xattr: %v", err)
	}
}
