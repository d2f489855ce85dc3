package rootfs

import (
	"archive/tar"
	"bytes"
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// entry is one tar entry of a test layer.
type entry struct {
	name, link string
	typ        byte
	mode       int64
	uid, gid   int
	body       string
	major      int64
	minor      int64
	xattrs     map[string]string
	size       int64 // header size when body is empty and size is set (hostile)
}

func file(name, body string) entry {
	return entry{name: name, typ: tar.TypeReg, mode: 0o644, body: body}
}
func dir(name string) entry { return entry{name: name, typ: tar.TypeDir, mode: 0o755} }
func symlink(name, target string) entry {
	return entry{name: name, typ: tar.TypeSymlink, link: target, mode: 0o777}
}
func hardlink(name, target string) entry { return entry{name: name, typ: tar.TypeLink, link: target} }

var epoch = time.Unix(1700000000, 0)

func layerTar(t testing.TB, entries ...entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := &tar.Header{Name: e.name, Typeflag: e.typ, Mode: e.mode, Uid: e.uid, Gid: e.gid, Linkname: e.link,
			Devmajor: e.major, Devminor: e.minor, ModTime: epoch, Format: tar.FormatPAX}
		if e.typ == tar.TypeReg {
			h.Size = int64(len(e.body))
		}
		for k, v := range e.xattrs {
			if h.PAXRecords == nil {
				h.PAXRecords = map[string]string{}
			}
			h.PAXRecords["SCHILY.xattr."+k] = v
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatalf("write header %s: %v", e.name, err)
		}
		if e.body != "" {
			if _, err := io.WriteString(tw, e.body); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func openers(layers ...[]byte) []Opener {
	var out []Opener
	for _, l := range layers {
		out = append(out, func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(l)), nil })
	}
	return out
}

// buildExt4 converts layers into an ext4 image in a temp dir and checks it
// with e2fsck.
func buildExt4(t testing.TB, layers ...[]byte) (string, Stats) {
	t.Helper()
	img := filepath.Join(t.TempDir(), "rootfs.ext4")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := WriteExt4(context.Background(), openers(layers...), f, Limits{})
	if err != nil {
		t.Fatalf("WriteExt4: %v", err)
	}
	if out, err := exec.Command("e2fsck", "-fn", img).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck: %v\n%s", err, out)
	}
	return img, st
}

// debugfs runs one debugfs request against img.
func debugfs(t testing.TB, img, req string) string {
	t.Helper()
	out, err := exec.Command("debugfs", "-R", req, img).CombinedOutput()
	if err != nil {
		t.Fatalf("debugfs %q: %v\n%s", req, err, out)
	}
	// Drop the version banner.
	s := string(out)
	if i := strings.Index(s, "\n"); i >= 0 && strings.HasPrefix(s, "debugfs ") {
		s = s[i+1:]
	}
	return s
}

// inodeInfo is what the tests read back from debugfs stat.
type inodeInfo struct {
	ino, typ, mode, user, group, links, size, linkDest, dev string
}

func stat(t testing.TB, img, p string) inodeInfo {
	t.Helper()
	out := debugfs(t, img, "stat "+p)
	if strings.Contains(out, "File not found") {
		t.Fatalf("%s: not in the image", p)
	}
	var in inodeInfo
	fields := strings.Fields(out)
	for i := 0; i+1 < len(fields); i++ {
		switch fields[i] {
		case "Inode:":
			in.ino = fields[i+1]
		case "Type:":
			in.typ = fields[i+1]
		case "Mode:":
			in.mode = fields[i+1]
		case "User:":
			in.user = fields[i+1]
		case "Group:":
			in.group = fields[i+1]
		case "Links:":
			in.links = fields[i+1]
		case "Size:":
			if in.size == "" {
				in.size = fields[i+1]
			}
		}
	}
	if i := strings.Index(out, "link dest: \""); i >= 0 {
		rest := out[i+len("link dest: \""):]
		in.linkDest = rest[:strings.Index(rest, "\"")]
	}
	if in.typ == "symlink" && in.linkDest == "" { // a slow symlink keeps its target in a block
		in.linkDest = cat(t, img, p)
	}
	if i := strings.Index(out, "Device major/minor number: "); i >= 0 {
		in.dev = strings.Fields(out[i+len("Device major/minor number: "):])[0]
	}
	return in
}

func exists(t testing.TB, img, p string) bool {
	t.Helper()
	out := debugfs(t, img, "stat "+p)
	return !strings.Contains(out, "File not found") && !strings.Contains(out, "is not a directory")
}

func cat(t testing.TB, img, p string) string {
	t.Helper()
	return debugfs(t, img, "cat "+p)
}
