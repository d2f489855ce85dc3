package rootfs

import (
	"archive/tar"
	"strings"
	"testing"
)

func TestMetadataPreserved(t *testing.T) {
	long := "/" + strings.Repeat("long/", 20) + "target"
	layer := layerTar(t,
		entry{name: "./", typ: tar.TypeDir, mode: 0o755},
		entry{name: "bin/", typ: tar.TypeDir, mode: 0o755},
		entry{name: "bin/su", typ: tar.TypeReg, mode: 0o4755, body: "#!su"},
		entry{name: "bin/wall", typ: tar.TypeReg, mode: 0o2755, gid: 5, body: "wall"},
		entry{name: "tmp/", typ: tar.TypeDir, mode: 0o1777},
		entry{name: "home/user/", typ: tar.TypeDir, mode: 0o700, uid: 1000, gid: 1000},
		entry{name: "home/user/notes", typ: tar.TypeReg, mode: 0o600, uid: 1000, gid: 1000, body: "hello"},
		entry{name: "dev/null", typ: tar.TypeChar, mode: 0o666, major: 1, minor: 3},
		entry{name: "dev/sda", typ: tar.TypeBlock, mode: 0o660, gid: 6, major: 8, minor: 0},
		entry{name: "run/fifo", typ: tar.TypeFifo, mode: 0o644},
		symlink("bin/sh", "busybox"),
		symlink("far", long),
		entry{name: "bin/busybox", typ: tar.TypeReg, mode: 0o755, body: "BB"},
		hardlink("bin/ls", "bin/busybox"),
		hardlink("bin/cat", "./bin/busybox"),
		entry{name: "bin/ping", typ: tar.TypeReg, mode: 0o755, body: "ping",
			xattrs: map[string]string{"security.capability": "\x01\x00\x00\x02\x00\x20", "user.note": "x",
				"trusted.overlay.opaque": "y"}},
		entry{name: "empty", typ: tar.TypeReg, mode: 0o640, uid: 7},
	)
	img, st := buildExt4(t, layer)
	if st.Skipped != 0 {
		t.Errorf("skipped %d entries", st.Skipped)
	}

	for _, c := range []struct {
		path, typ, mode, user, group string
	}{
		{"/bin/su", "regular", "04755", "0", "0"},
		{"/bin/wall", "regular", "02755", "0", "5"},
		{"/tmp", "directory", "01777", "0", "0"},
		{"/home/user", "directory", "0700", "1000", "1000"},
		{"/home/user/notes", "regular", "0600", "1000", "1000"},
		{"/dev/null", "character", "0666", "0", "0"},
		{"/dev/sda", "block", "0660", "0", "6"},
		{"/run/fifo", "FIFO", "0644", "0", "0"},
		{"/empty", "regular", "0640", "7", "0"},
	} {
		in := stat(t, img, c.path)
		if in.typ != c.typ || in.mode != c.mode || in.user != c.user || in.group != c.group {
			t.Errorf("%s: got %s %s %s:%s, want %s %s %s:%s", c.path, in.typ, in.mode, in.user, in.group,
				c.typ, c.mode, c.user, c.group)
		}
	}
	if d := stat(t, img, "/dev/null").dev; d != "01:03" {
		t.Errorf("/dev/null device %s, want 01:03", d)
	}
	if d := stat(t, img, "/dev/sda").dev; d != "08:00" {
		t.Errorf("/dev/sda device %s, want 08:00", d)
	}
	if d := stat(t, img, "/bin/sh").linkDest; d != "busybox" {
		t.Errorf("/bin/sh -> %q", d)
	}
	if d := stat(t, img, "/far").linkDest; d != long {
		t.Errorf("/far -> %q, want %q", d, long)
	}
	bb, ls, catI := stat(t, img, "/bin/busybox"), stat(t, img, "/bin/ls"), stat(t, img, "/bin/cat")
	if bb.ino != ls.ino || bb.ino != catI.ino || bb.links != "3" {
		t.Errorf("hard links: busybox %s (%s links), ls %s, cat %s", bb.ino, bb.links, ls.ino, catI.ino)
	}
	if got := cat(t, img, "/bin/ls"); got != "BB" {
		t.Errorf("/bin/ls content %q", got)
	}
	if got := cat(t, img, "/home/user/notes"); got != "hello" {
		t.Errorf("notes content %q", got)
	}
	ea := debugfs(t, img, "ea_list /bin/ping")
	if !strings.Contains(ea, "security.capability (6)") || !strings.Contains(ea, `user.note (1) = "x"`) {
		t.Errorf("xattrs of /bin/ping:\n%s", ea)
	}
	if strings.Contains(ea, "overlay") {
		t.Errorf("trusted.overlay xattr kept:\n%s", ea)
	}
}

func TestWhiteoutsAndOpaqueDirs(t *testing.T) {
	lower := layerTar(t,
		file("etc/keep", "k"),
		file("etc/gone", "g"),
		file("var/cache/a", "a"),
		file("var/cache/sub/b", "b"),
		file("opt/app/old", "o"),
		file("opt/app/lib/old.so", "o"),
		file("srv/x", "x"),
	)
	upper := layerTar(t,
		file(".wh.srv", ""),         // whiteout of a whole directory
		file("etc/.wh.gone", ""),    // whiteout of a file
		file("etc/.wh.missing", ""), // whiteout of nothing
		dir("var/cache/"),           // opaque marker after the dir entry
		file("var/cache/.wh..wh..opq", ""),
		file("var/cache/new", "n"),
		file("opt/app/lib/new.so", "n"), // same-layer content written before the marker
		file("opt/app/.wh..wh..opq", ""),
		file("same/f", "s"), // a whiteout never hides its own layer
		file("same/.wh.f", ""),
	)
	img, st := buildExt4(t, lower, upper)
	if st.Whiteouts != 6 {
		t.Errorf("applied %d whiteouts, want 6", st.Whiteouts)
	}
	for p, want := range map[string]bool{
		"/etc/keep": true, "/etc/gone": false, "/srv": false, "/srv/x": false,
		"/var/cache/a": false, "/var/cache/sub": false, "/var/cache/new": true,
		"/opt/app/old": false, "/opt/app/lib/old.so": false, "/opt/app/lib/new.so": true,
		"/same/f": true,
	} {
		if got := exists(t, img, p); got != want {
			t.Errorf("%s exists = %v, want %v", p, got, want)
		}
	}
	ls := debugfs(t, img, "ls -l /etc")
	if strings.Contains(ls, ".wh.") {
		t.Errorf("whiteout marker left in the image:\n%s", ls)
	}
}

func TestDuplicatesAndReplacement(t *testing.T) {
	lower := layerTar(t,
		file("a", "first"),
		file("a", "second"), // a later entry wins, as tar extraction does
		dir("d/"),
		file("d/inner", "i"),
		file("f", "file"),
		symlink("s", "a"),
	)
	upper := layerTar(t,
		file("d", "now a file"), // a file over a directory drops the directory
		dir("f/"),               // a directory over a file
		file("f/x", "x"),
		file("s", "no longer a link"),
	)
	img, _ := buildExt4(t, lower, upper)
	if got := cat(t, img, "/a"); got != "second" {
		t.Errorf("/a = %q", got)
	}
	if in := stat(t, img, "/d"); in.typ != "regular" {
		t.Errorf("/d is %s", in.typ)
	}
	if exists(t, img, "/d/inner") {
		t.Error("/d/inner survived")
	}
	if got := cat(t, img, "/f/x"); got != "x" {
		t.Errorf("/f/x = %q", got)
	}
	if in := stat(t, img, "/s"); in.typ != "regular" {
		t.Errorf("/s is %s", in.typ)
	}
}

// A hard link keeps the inode it was made to, even when an upper layer
// replaces the name it was made through.
func TestHardlinkSurvivesReplacedTarget(t *testing.T) {
	lower := layerTar(t, file("usr/lib/a", "old"), hardlink("usr/lib/b", "usr/lib/a"))
	upper := layerTar(t, file("usr/lib/a", "new"), hardlink("usr/lib/c", "usr/lib/b"))
	img, _ := buildExt4(t, lower, upper)
	if got := cat(t, img, "/usr/lib/b"); got != "old" {
		t.Errorf("/usr/lib/b = %q, want old", got)
	}
	if got := cat(t, img, "/usr/lib/a"); got != "new" {
		t.Errorf("/usr/lib/a = %q, want new", got)
	}
	b, c := stat(t, img, "/usr/lib/b"), stat(t, img, "/usr/lib/c")
	if b.ino != c.ino || b.links != "2" {
		t.Errorf("b inode %s (%s links), c inode %s", b.ino, b.links, c.ino)
	}
}

// A name under a symlinked directory lands where the link points inside the
// image, never outside it.
func TestSymlinkedParents(t *testing.T) {
	lower := layerTar(t,
		dir("usr/bin/"),
		symlink("bin", "usr/bin"),
		dir("etc/"),
		symlink("abs", "/etc"),
		symlink("up", "../../../../../etc"),
		symlink("loop1", "loop2"),
		symlink("loop2", "loop1"),
		file("plain", "p"),
	)
	upper := layerTar(t,
		file("bin/tool", "t"),
		file("abs/from-abs", "a"),
		file("up/from-up", "u"),
		file("up/deeper/dir/f", "d"),
		file("loop1/x", "lost"),  // a loop: skipped
		file("plain/under", "?"), // under a regular file: skipped
	)
	img, st := buildExt4(t, lower, upper)
	for p, want := range map[string]string{
		"/usr/bin/tool": "t", "/etc/from-abs": "a", "/etc/from-up": "u", "/etc/deeper/dir/f": "d",
	} {
		if got := cat(t, img, p); got != want {
			t.Errorf("%s = %q, want %q", p, got, want)
		}
	}
	if in := stat(t, img, "/bin"); in.typ != "symlink" || in.linkDest != "usr/bin" {
		t.Errorf("/bin is %s -> %s", in.typ, in.linkDest)
	}
	if st.Skipped != 2 {
		t.Errorf("skipped %d, want 2", st.Skipped)
	}
}
