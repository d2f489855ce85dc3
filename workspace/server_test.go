package workspace

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"matchlock.dev/matchlock/guest/proto/fsproto"
)

func TestFileOps(t *testing.T) {
	c := newTC(t, Config{})
	node, fh := c.create(RootNode, "f", unix.O_RDWR, 0o640)
	c.write(fh, 0, "hello world")
	if got := c.read(fh, 6, 100); got != "world" {
		t.Fatalf("read %q", got)
	}
	// 9 GiB offset: a sparse file past 4 GiB.
	const big = 9 << 30
	c.write(fh, big, "end")
	a, _ := fsproto.DecodeAttr(c.must(&fsproto.Request{Op: fsproto.OpGetattr, Node: node}))
	if a.Size != big+3 || a.Mode != unix.S_IFREG|0o640 {
		t.Fatalf("attr %+v", a)
	}
	if got := c.read(fh, big, 10); got != "end" {
		t.Fatalf("read at 9 GiB: %q", got)
	}
	off, _ := fsproto.Uint64(c.must(&fsproto.Request{Op: fsproto.OpLseek, Fh: fh, Off: 4096, OFlags: unix.SEEK_DATA}))
	if off < 4096 || off > big {
		t.Fatalf("SEEK_DATA from 4096: %d", off)
	}
	c.must(&fsproto.Request{Op: fsproto.OpFsync, Fh: fh})
	c.must(&fsproto.Request{Op: fsproto.OpFsync, Fh: fh, Flags: fsproto.FlagDatasync})
	c.must(&fsproto.Request{Op: fsproto.OpFallocate, Fh: fh, Off: 0, Size: 1 << 20, Mode: unix.FALLOC_FL_KEEP_SIZE})
	// Truncate through the handle and by node; setuid, sticky and times.
	c.must(&fsproto.Request{Op: fsproto.OpSetattr, Node: node, Flags: fsproto.FlagFh, Fh: fh, Valid: fsproto.SetSize, Size: 5})
	c.do(&fsproto.Request{Op: fsproto.OpRelease, Fh: fh})
	a, _ = fsproto.DecodeAttr(c.must(&fsproto.Request{Op: fsproto.OpSetattr, Node: node,
		Valid: fsproto.SetMode | fsproto.SetMtime | fsproto.SetAtime | fsproto.SetSize,
		Mode:  0o4755, Size: 3, Mtime: fsproto.Timespec{Sec: 1234567890, Nsec: 5}, Atime: fsproto.Timespec{Sec: 42}}))
	if a.Size != 3 || a.Mode&0o7777 != 0o4755 || a.Mtime != (fsproto.Timespec{Sec: 1234567890, Nsec: 5}) || a.Atime.Sec != 42 {
		t.Fatalf("after setattr: %+v", a)
	}
	st, err := os.Stat(filepath.Join(c.dir, "f"))
	if err != nil || st.Mode()&os.ModeSetuid == 0 || st.Size() != 3 || st.ModTime().Unix() != 1234567890 {
		t.Fatalf("host sees %v %v", st, err)
	}
	// O_APPEND appends whatever the offset.
	fh = c.open(node, unix.O_WRONLY|unix.O_APPEND)
	c.write(fh, 0, "++")
	c.do(&fsproto.Request{Op: fsproto.OpRelease, Fh: fh})
	if b, _ := os.ReadFile(filepath.Join(c.dir, "f")); string(b) != "hel++" {
		t.Fatalf("after append: %q", b)
	}
	// O_TRUNC on open.
	fh = c.open(node, unix.O_WRONLY|unix.O_TRUNC)
	c.do(&fsproto.Request{Op: fsproto.OpRelease, Fh: fh})
	if b, _ := os.ReadFile(filepath.Join(c.dir, "f")); len(b) != 0 {
		t.Fatalf("after O_TRUNC: %q", b)
	}
	// Creating an existing name without O_EXCL opens it; with it, EEXIST.
	n2, fh2 := c.create(RootNode, "f", unix.O_RDWR, 0o600)
	if n2 != node {
		t.Fatalf("create of an existing file: node %d, want %d", n2, node)
	}
	c.do(&fsproto.Request{Op: fsproto.OpRelease, Fh: fh2})
	if _, e := c.do(&fsproto.Request{Op: fsproto.OpCreate, Node: RootNode, Name: "f", OFlags: unix.O_RDWR | unix.O_EXCL, Mode: 0o600}); e != unix.EEXIST {
		t.Fatalf("O_EXCL create: %v", e)
	}
	// The host's umask does not take bits away.
	old := unix.Umask(0o077)
	_, fh3 := c.create(RootNode, "g", unix.O_RDWR, 0o666)
	unix.Umask(old)
	c.do(&fsproto.Request{Op: fsproto.OpRelease, Fh: fh3})
	if st, _ := os.Stat(filepath.Join(c.dir, "g")); st.Mode().Perm() != 0o666 {
		t.Fatalf("create 0666 under umask 077: %v", st.Mode())
	}
	c.checkOutside()
}

func TestNamespaceOps(t *testing.T) {
	c := newTC(t, Config{})
	d1 := c.mkdir(RootNode, "d1")
	d2 := c.mkdir(RootNode, "d2")
	c.must(&fsproto.Request{Op: fsproto.OpSetattr, Node: d2, Valid: fsproto.SetMode, Mode: 0o1777})
	if st, _ := os.Stat(filepath.Join(c.dir, "d2")); st.Mode()&os.ModeSticky == 0 {
		t.Fatalf("sticky bit: %v", st.Mode())
	}
	a, fa := c.create(d1, "a", unix.O_WRONLY, 0o644)
	c.write(fa, 0, "A")
	_, fb := c.create(d2, "b", unix.O_WRONLY, 0o644)
	c.write(fb, 0, "B")
	// Rename across directories, over an existing file.
	c.must(&fsproto.Request{Op: fsproto.OpRename, Node: d1, Name: "a", Node2: d2, Name2: "b"})
	if b, _ := os.ReadFile(filepath.Join(c.dir, "d2", "b")); string(b) != "A" {
		t.Fatalf("rename over: %q", b)
	}
	// The open handle of the replaced file still works (it is unlinked).
	c.write(fb, 1, "x")
	// NOREPLACE refuses, EXCHANGE swaps.
	c.create(d1, "c", unix.O_WRONLY, 0o644)
	if _, e := c.do(&fsproto.Request{Op: fsproto.OpRename, Node: d1, Name: "c", Node2: d2, Name2: "b", OFlags: unix.RENAME_NOREPLACE}); e != unix.EEXIST {
		t.Fatalf("RENAME_NOREPLACE: %v", e)
	}
	c.must(&fsproto.Request{Op: fsproto.OpRename, Node: d1, Name: "c", Node2: d2, Name2: "b", OFlags: unix.RENAME_EXCHANGE})
	if b, _ := os.ReadFile(filepath.Join(c.dir, "d1", "c")); string(b) != "A" {
		t.Fatalf("after exchange d1/c is %q", b)
	}
	// Hardlinks share the inode and the node.
	ln, la := c.entry(c.must(&fsproto.Request{Op: fsproto.OpLink, Node: a, Node2: RootNode, Name: "hard"}))
	if ln != a || la.Nlink != 2 {
		t.Fatalf("link: node %d (want %d), nlink %d", ln, a, la.Nlink)
	}
	// Symlinks are stored, never followed.
	sn, sa := c.entry(c.must(&fsproto.Request{Op: fsproto.OpSymlink, Node: RootNode, Name: "sl", Name2: "/etc/passwd"}))
	if sa.Mode&unix.S_IFMT != unix.S_IFLNK {
		t.Fatalf("symlink mode %o", sa.Mode)
	}
	if got := string(c.must(&fsproto.Request{Op: fsproto.OpReadlink, Node: sn})); got != "/etc/passwd" {
		t.Fatalf("readlink %q", got)
	}
	// FIFOs and sockets may be made; devices may not.
	c.must(&fsproto.Request{Op: fsproto.OpMknod, Node: RootNode, Name: "fifo", Mode: unix.S_IFIFO | 0o644})
	for _, typ := range []uint32{unix.S_IFCHR, unix.S_IFBLK} {
		if _, e := c.do(&fsproto.Request{Op: fsproto.OpMknod, Node: RootNode, Name: "dev", Mode: typ | 0o644}); e != unix.EPERM {
			t.Fatalf("mknod %o: %v", typ, e)
		}
	}
	// Listing: plain and with entries (which carry nodes).
	ents := c.readdir(RootNode, false)
	for _, n := range []string{".", "..", "d1", "d2", "hard", "sl", "fifo"} {
		if _, ok := ents[n]; !ok {
			t.Fatalf("readdir lacks %q: %v", n, ents)
		}
	}
	plus := c.readdir(RootNode, true)
	if plus["hard"].Node != a || plus["."].Node != 0 || plus["sl"].Attr.Mode&unix.S_IFMT != unix.S_IFLNK {
		t.Fatalf("readdirplus: %+v", plus)
	}
	// Removal.
	c.must(&fsproto.Request{Op: fsproto.OpUnlink, Node: RootNode, Name: "hard"})
	if _, e := c.do(&fsproto.Request{Op: fsproto.OpRmdir, Node: RootNode, Name: "d1"}); e != unix.ENOTEMPTY {
		t.Fatalf("rmdir of a full directory: %v", e)
	}
	c.must(&fsproto.Request{Op: fsproto.OpUnlink, Node: d1, Name: "c"})
	c.must(&fsproto.Request{Op: fsproto.OpRmdir, Node: RootNode, Name: "d1"})
	if _, _, e := c.lookup(RootNode, "d1"); e != unix.ENOENT {
		t.Fatalf("lookup of removed dir: %v", e)
	}
	// fsync of a directory, statfs.
	fh, _ := fsproto.Uint64(c.must(&fsproto.Request{Op: fsproto.OpOpendir, Node: d2}))
	c.must(&fsproto.Request{Op: fsproto.OpFsyncdir, Fh: fh})
	sf, ok := fsproto.DecodeStatfs(c.must(&fsproto.Request{Op: fsproto.OpStatfs, Node: RootNode}))
	if !ok || sf.Bsize == 0 || sf.NameLen == 0 {
		t.Fatalf("statfs %+v", sf)
	}
	c.checkOutside()
}

func TestXattrs(t *testing.T) {
	c := newTC(t, Config{})
	node, fh := c.create(RootNode, "f", unix.O_RDWR, 0o644)
	c.do(&fsproto.Request{Op: fsproto.OpRelease, Fh: fh})
	if _, e := c.do(&fsproto.Request{Op: fsproto.OpSetxattr, Node: node, Name: "user.probe", Data: []byte("1")}); e == unix.ENOTSUP || e == unix.EOPNOTSUPP {
		t.Skip("the test directory's filesystem has no user xattrs")
	}
	c.must(&fsproto.Request{Op: fsproto.OpSetxattr, Node: node, Name: "user.k", Data: []byte("value")})
	if n, _ := fsproto.Uint32(c.must(&fsproto.Request{Op: fsproto.OpGetxattr, Node: node, Name: "user.k"})); n != 5 {
		t.Fatalf("getxattr size %d", n)
	}
	if v := c.must(&fsproto.Request{Op: fsproto.OpGetxattr, Node: node, Name: "user.k", Size: 64}); string(v) != "value" {
		t.Fatalf("getxattr %q", v)
	}
	if _, e := c.do(&fsproto.Request{Op: fsproto.OpGetxattr, Node: node, Name: "user.k", Size: 2}); e != unix.ERANGE {
		t.Fatalf("small buffer: %v", e)
	}
	list := c.must(&fsproto.Request{Op: fsproto.OpListxattr, Node: node, Size: 1024})
	if !bytes.Contains(list, []byte("user.k\x00")) {
		t.Fatalf("listxattr %q", list)
	}
	if _, e := c.do(&fsproto.Request{Op: fsproto.OpSetxattr, Node: node, Name: "user.k", Data: []byte("x"), OFlags: unix.XATTR_CREATE}); e != unix.EEXIST {
		t.Fatalf("XATTR_CREATE over existing: %v", e)
	}
	c.must(&fsproto.Request{Op: fsproto.OpRemovexattr, Node: node, Name: "user.k"})
	if _, e := c.do(&fsproto.Request{Op: fsproto.OpGetxattr, Node: node, Name: "user.k", Size: 64}); e != unix.ENODATA {
		t.Fatalf("after remove: %v", e)
	}
	// Other namespaces could carry capabilities, labels or ACLs.
	for _, name := range []string{"security.capability", "trusted.overlay.opaque", "system.posix_acl_access", "security.selinux"} {
		if _, e := c.do(&fsproto.Request{Op: fsproto.OpSetxattr, Node: node, Name: name, Data: []byte("x")}); e != unix.EPERM {
			t.Fatalf("setxattr %s: %v", name, e)
		}
		if _, e := c.do(&fsproto.Request{Op: fsproto.OpGetxattr, Node: node, Name: name, Size: 64}); e != unix.ENODATA {
			t.Fatalf("getxattr %s: %v", name, e)
		}
	}
}

func TestReadOnly(t *testing.T) {
	c := newTC(t, Config{ReadOnly: true})
	os.WriteFile(filepath.Join(c.dir, "f"), []byte("data"), 0o644)
	os.Mkdir(filepath.Join(c.dir, "d"), 0o755)
	before := snapshotTree(t, c.dir)
	node, _, e := c.lookup(RootNode, "f")
	if e != 0 {
		t.Fatal(e)
	}
	d, _, _ := c.lookup(RootNode, "d")
	fh := c.open(node, unix.O_RDONLY)
	if got := c.read(fh, 0, 10); got != "data" {
		t.Fatalf("read %q", got)
	}
	for _, r := range []*fsproto.Request{
		{Op: fsproto.OpOpen, Node: node, OFlags: unix.O_WRONLY},
		{Op: fsproto.OpOpen, Node: node, OFlags: unix.O_RDWR},
		{Op: fsproto.OpOpen, Node: node, OFlags: unix.O_RDONLY | unix.O_TRUNC},
		{Op: fsproto.OpCreate, Node: RootNode, Name: "new", OFlags: unix.O_RDONLY},
		{Op: fsproto.OpWrite, Fh: fh, Data: []byte("x")},
		{Op: fsproto.OpSetattr, Node: node, Valid: fsproto.SetSize},
		{Op: fsproto.OpSetattr, Node: node, Valid: fsproto.SetMode, Mode: 0o777},
		{Op: fsproto.OpSetattr, Node: node, Valid: fsproto.SetMtime | fsproto.SetMtimeNow},
		{Op: fsproto.OpMkdir, Node: RootNode, Name: "x", Mode: 0o755},
		{Op: fsproto.OpMknod, Node: RootNode, Name: "x", Mode: unix.S_IFIFO | 0o644},
		{Op: fsproto.OpSymlink, Node: RootNode, Name: "x", Name2: "f"},
		{Op: fsproto.OpLink, Node: node, Node2: d, Name: "x"},
		{Op: fsproto.OpUnlink, Node: RootNode, Name: "f"},
		{Op: fsproto.OpRmdir, Node: RootNode, Name: "d"},
		{Op: fsproto.OpRename, Node: RootNode, Name: "f", Node2: d, Name2: "f"},
		{Op: fsproto.OpSetxattr, Node: node, Name: "user.x", Data: []byte("1")},
		{Op: fsproto.OpRemovexattr, Node: node, Name: "user.x"},
		{Op: fsproto.OpFallocate, Fh: fh, Size: 100},
	} {
		if _, e := c.do(r); e != unix.EROFS {
			t.Errorf("%s %q: %v, want EROFS", r.Op, r.Name, e)
		}
	}
	if after := snapshotTree(t, c.dir); after != before {
		t.Fatalf("read-only share changed:\n%s\n---\n%s", before, after)
	}
}

// snapshotTree describes every entry under dir (names, modes, sizes, mtimes).
func snapshotTree(t testing.TB, dir string) string {
	var b strings.Builder
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		var st syscall.Stat_t
		syscall.Lstat(p, &st)
		rel, _ := filepath.Rel(dir, p)
		b.WriteString(rel + " " + fi.Mode().String() + " " + fi.ModTime().String() + " " + string(rune('0'+st.Nlink)) + "\n")
		return nil
	})
	return b.String()
}

func TestLimits(t *testing.T) {
	c := newTC(t, Config{MaxNodes: 4, MaxHandles: 2})
	for i := 0; i < 5; i++ {
		os.WriteFile(filepath.Join(c.dir, string(rune('a'+i))), nil, 0o644)
	}
	var nodes []uint64
	for i := 0; i < 3; i++ { // the root is the fourth
		n, _, e := c.lookup(RootNode, string(rune('a'+i)))
		if e != 0 {
			t.Fatal(e)
		}
		nodes = append(nodes, n)
	}
	if _, _, e := c.lookup(RootNode, "d"); e != unix.ENFILE {
		t.Fatalf("lookup beyond MaxNodes: %v", e)
	}
	// A known inode costs nothing more.
	if n, _, e := c.lookup(RootNode, "a"); e != 0 || n != nodes[0] {
		t.Fatalf("second lookup of a: %d %v", n, e)
	}
	// Forget both references of a: its slot is free again.
	c.do(&fsproto.Request{Op: fsproto.OpForget, Data: fsproto.AppendForget(nil, fsproto.ForgetItem{Node: nodes[0], Count: 2})})
	if _, _, e := c.lookup(RootNode, "d"); e != 0 {
		t.Fatalf("lookup after forget: %v", e)
	}
	if _, e := c.do(&fsproto.Request{Op: fsproto.OpGetattr, Node: nodes[0]}); e != unix.ESTALE {
		t.Fatalf("forgotten node: %v", e)
	}
	// Forgetting the root, or a node twice, changes nothing.
	c.do(&fsproto.Request{Op: fsproto.OpForget, Data: fsproto.AppendForget(nil, fsproto.ForgetItem{Node: RootNode, Count: 1 << 40})})
	c.must(&fsproto.Request{Op: fsproto.OpGetattr, Node: RootNode})
	c.open(nodes[1], unix.O_RDONLY)
	c.open(nodes[1], unix.O_RDONLY)
	if _, e := c.do(&fsproto.Request{Op: fsproto.OpOpen, Node: nodes[1], OFlags: unix.O_RDONLY}); e != unix.EMFILE {
		t.Fatalf("open beyond MaxHandles: %v", e)
	}
	if st := c.s.Stats(); st.Nodes != 4 || st.Handles != 2 {
		t.Fatalf("stats %+v", st)
	}
}

// TestNodeIO: with Fh 0, I/O goes by node, on descriptors the node keeps
// (the guest kernel then sends no OPEN or RELEASE); create can skip the
// handle.
func TestNodeIO(t *testing.T) {
	c := newTC(t, Config{})
	b := c.must(&fsproto.Request{Op: fsproto.OpCreate, Flags: fsproto.FlagNoHandle, Node: RootNode, Name: "f", OFlags: unix.O_WRONLY, Mode: 0o644})
	node, _ := c.entry(b)
	if fh, _ := fsproto.Uint64(b[fsproto.EntrySize:]); fh != 0 || c.s.Stats().Handles != 0 {
		t.Fatalf("FlagNoHandle create kept handle %d (%+v)", fh, c.s.Stats())
	}
	c.must(&fsproto.Request{Op: fsproto.OpWrite, Node: node, Off: 0, Data: []byte("by node")})
	c.must(&fsproto.Request{Op: fsproto.OpWrite, Node: node, Off: 6<<30 - 1, Data: []byte("!")})
	if got := string(c.must(&fsproto.Request{Op: fsproto.OpRead, Node: node, Size: 7})); got != "by node" {
		t.Fatalf("read by node %q", got)
	}
	c.must(&fsproto.Request{Op: fsproto.OpFsync, Node: node})
	c.must(&fsproto.Request{Op: fsproto.OpFallocate, Node: node, Size: 4096, Mode: unix.FALLOC_FL_KEEP_SIZE})
	off, _ := fsproto.Uint64(c.must(&fsproto.Request{Op: fsproto.OpLseek, Node: node, Off: 8192, OFlags: unix.SEEK_DATA}))
	if off != 6<<30-4096 && off != 6<<30-1 && off < 8192 {
		t.Fatalf("SEEK_DATA %d", off)
	}
	// Truncation (O_TRUNC arrives as a setattr) and the write descriptor.
	c.must(&fsproto.Request{Op: fsproto.OpSetattr, Node: node, Valid: fsproto.SetSize, Size: 2})
	if b, _ := os.ReadFile(filepath.Join(c.dir, "f")); string(b) != "by" {
		t.Fatalf("after truncate %q", b)
	}
	// Directories by node; the wrong type is refused.
	d := c.mkdir(RootNode, "d")
	os.WriteFile(filepath.Join(c.dir, "d", "x"), nil, 0o644)
	b = c.must(&fsproto.Request{Op: fsproto.OpReaddir, Node: d, Size: 4096, Flags: fsproto.FlagPlus})
	var names []string
	fsproto.DecodeDirents(b, true, func(de *fsproto.Dirent) bool { names = append(names, de.Name); return true })
	if strings.Join(names, ",") != ".,..,x" && len(names) != 3 {
		t.Fatalf("readdir by node: %v", names)
	}
	c.must(&fsproto.Request{Op: fsproto.OpFsyncdir, Node: d})
	unix.Mkfifo(filepath.Join(c.dir, "fifo"), 0o644)
	fifo, _, _ := c.lookup(RootNode, "fifo")
	for _, r := range []*fsproto.Request{
		{Op: fsproto.OpRead, Node: d, Size: 1},
		{Op: fsproto.OpWrite, Node: d, Data: []byte("x")},
		{Op: fsproto.OpReaddir, Node: node, Size: 4096},
		{Op: fsproto.OpRead, Node: fifo, Size: 1},
		{Op: fsproto.OpWrite, Node: fifo, Data: []byte("x")},
		{Op: fsproto.OpRead, Node: 4242, Size: 1},
	} {
		if _, e := c.do(r); e == 0 {
			t.Errorf("%s on node %d succeeded", r.Op, r.Node)
		}
	}
	// The node's descriptors go with it.
	before := fdsHeld.Load()
	c.do(&fsproto.Request{Op: fsproto.OpForget, Data: fsproto.AppendForget(nil, fsproto.ForgetItem{Node: node, Count: 2})})
	if after := fdsHeld.Load(); after != before-3 {
		t.Fatalf("forget closed %d descriptors, want 3 (O_PATH, read, write)", before-after)
	}
	// A create's descriptor becomes the node's write descriptor (a 0444
	// file must stay writable by its creator), without O_APPEND.
	held := fdsHeld.Load()
	b = c.must(&fsproto.Request{Op: fsproto.OpCreate, Flags: fsproto.FlagNoHandle, Node: RootNode, Name: "ro-mode",
		OFlags: unix.O_WRONLY | unix.O_APPEND, Mode: 0o444})
	rn, _ := c.entry(b)
	c.must(&fsproto.Request{Op: fsproto.OpWrite, Node: rn, Off: 0, Data: []byte("abc")})
	c.must(&fsproto.Request{Op: fsproto.OpWrite, Node: rn, Off: 1, Data: []byte("X")})
	if got := fdsHeld.Load() - held; got != 2 {
		t.Fatalf("create+writes hold %d descriptors, want 2 (O_PATH, write)", got)
	}
	if b, _ := os.ReadFile(filepath.Join(c.dir, "ro-mode")); string(b) != "aXc" {
		t.Fatalf("writes through the adopted descriptor: %q", b)
	}
	// Read-only: no write descriptor is ever opened.
	ro := newTC(t, Config{ReadOnly: true})
	os.WriteFile(filepath.Join(ro.dir, "f"), []byte("ro"), 0o644)
	n, _, _ := ro.lookup(RootNode, "f")
	if _, e := ro.do(&fsproto.Request{Op: fsproto.OpWrite, Node: n, Data: []byte("x")}); e != unix.EROFS {
		t.Fatalf("write by node on a read-only share: %v", e)
	}
	if got := string(ro.must(&fsproto.Request{Op: fsproto.OpRead, Node: n, Size: 10})); got != "ro" {
		t.Fatalf("read %q", got)
	}
}

// TestDirAttrsInReplies: replies to changes carry the changed directories'
// attributes after the change (see fsproto.DirAttrs).
func TestDirAttrsInReplies(t *testing.T) {
	c := newTC(t, Config{})
	d1, d2 := c.mkdir(RootNode, "d1"), c.mkdir(RootNode, "d2")
	b := c.must(&fsproto.Request{Op: fsproto.OpMkdir, Node: d1, Name: "sub", Mode: 0o755})
	if a, ok := fsproto.DecodeAttr(b[fsproto.EntrySize:]); !ok || a.Nlink != 3 {
		t.Fatalf("mkdir: parent attrs %+v %v", a, ok)
	}
	b = c.must(&fsproto.Request{Op: fsproto.OpCreate, Flags: fsproto.FlagNoHandle, Node: d1, Name: "f", OFlags: unix.O_WRONLY, Mode: 0o644})
	if len(b) != fsproto.EntrySize+8+fsproto.AttrSize {
		t.Fatalf("create reply of %d bytes", len(b))
	}
	b = c.must(&fsproto.Request{Op: fsproto.OpRename, Node: d1, Name: "sub", Node2: d2, Name2: "sub"})
	a1, _ := fsproto.DecodeAttr(b)
	a2, _ := fsproto.DecodeAttr(b[fsproto.AttrSize:])
	if len(b) != 2*fsproto.AttrSize || a1.Nlink != 2 || a2.Nlink != 3 {
		t.Fatalf("rename: %d bytes, nlinks %d %d", len(b), a1.Nlink, a2.Nlink)
	}
	b = c.must(&fsproto.Request{Op: fsproto.OpRmdir, Node: d2, Name: "sub"})
	if a, _ := fsproto.DecodeAttr(b); len(b) != fsproto.AttrSize || a.Nlink != 2 {
		t.Fatalf("rmdir: %d bytes, nlink %d", len(b), a.Nlink)
	}
}

// TestWindowRead: reads with FlagWindow land in the window at the offset
// asked for, the reply carries the count, and anything reaching past the
// window (or a server without one) gets EINVAL.
func TestWindowRead(t *testing.T) {
	window := make([]byte, 64<<10)
	c := newTC(t, Config{})
	c.s.SetWindow(window)
	if err := os.WriteFile(filepath.Join(c.dir, "f"), []byte("window data"), 0o644); err != nil {
		t.Fatal(err)
	}
	n, _, e := c.lookup(RootNode, "f")
	if e != 0 {
		t.Fatal(e)
	}
	b := c.must(&fsproto.Request{Op: fsproto.OpRead, Flags: fsproto.FlagWindow, Node: n, Node2: 100, Off: 7, Size: 100})
	if got, ok := fsproto.Uint32(b); !ok || len(b) != 4 || got != 4 {
		t.Fatalf("reply %x", b)
	}
	if string(window[100:104]) != "data" || window[99] != 0 || window[104] != 0 {
		t.Fatalf("window %q", window[96:108])
	}
	c.must(&fsproto.Request{Op: fsproto.OpRead, Node: n, Size: 100})
	if st := c.s.Stats(); st.WindowReads != 1 || st.StreamReads != 1 {
		t.Fatalf("stats %+v", st)
	}
	for _, off := range []uint64{uint64(len(window)) - 99, uint64(len(window)), 1 << 29} {
		if _, e := c.do(&fsproto.Request{Op: fsproto.OpRead, Flags: fsproto.FlagWindow, Node: n, Node2: off, Size: 100}); e != unix.EINVAL {
			t.Errorf("offset %d: errno %v, want EINVAL", off, e)
		}
	}
	plain := newTC(t, Config{})
	os.WriteFile(filepath.Join(plain.dir, "f"), []byte("x"), 0o644)
	n, _, _ = plain.lookup(RootNode, "f")
	if _, e := plain.do(&fsproto.Request{Op: fsproto.OpRead, Flags: fsproto.FlagWindow, Node: n, Size: 1}); e != unix.EINVAL {
		t.Errorf("no window: errno %v, want EINVAL", e)
	}
}
