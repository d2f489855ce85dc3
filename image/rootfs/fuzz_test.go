package rootfs

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"strings"
	"testing"
)

func FuzzCleanPath(f *testing.F) {
	for _, s := range []string{"", ".", "./", "/", "a/b", "../../etc/passwd", "/a/./b/../c/", "a//b", ".wh..wh..opq",
		"..", "a/..", strings.Repeat("x", 300), "a\x00b", "./usr/bin/"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		p, err := CleanPath(name)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error %v does not wrap ErrInvalid", err)
			}
			return
		}
		if strings.HasPrefix(p, "/") || strings.HasSuffix(p, "/") || strings.Contains(p, "//") {
			t.Fatalf("CleanPath(%q) = %q: not a clean relative path", name, p)
		}
		for _, c := range splitPath(p) {
			if c == "" || c == "." || c == ".." || len(c) > maxNameLen {
				t.Fatalf("CleanPath(%q) = %q: bad component %q", name, p, c)
			}
		}
		if again, err := CleanPath(p); err != nil || again != p {
			t.Fatalf("CleanPath not idempotent: %q -> %q -> %q, %v", name, p, again, err)
		}
	})
}

// FuzzFlatten feeds arbitrary bytes as two layers. Flatten must not panic,
// must stay inside its limits, and what it writes must be a normalised tar:
// clean unique names, parents before children, hard links after their
// targets, and flattening it again must give the same bytes.
func FuzzFlatten(f *testing.F) {
	seed := func(entries ...entry) []byte { return layerTar(f, entries...) }
	f.Add(seed(file("a", "x"), dir("d/"), symlink("d/l", "../a"), hardlink("h", "a")),
		seed(file(".wh.a", ""), file("d/.wh..wh..opq", ""), file("d/n", "n")))
	f.Add(seed(symlink("bin", "usr/bin"), file("../../x", "x")), seed(file("bin/sh", "sh"), hardlink("y", "x")))
	f.Add(seed(file("a", "1"), file("a", "2"), dir("a/")), []byte("garbage"))
	f.Add([]byte{}, []byte{})
	lim := Limits{MaxBytes: 1 << 20, MaxEntries: 2000}
	f.Fuzz(func(t *testing.T, l1, l2 []byte) {
		var out bytes.Buffer
		st, err := Flatten(context.Background(), openers(l1, l2), &out, lim)
		if err != nil {
			return
		}
		if st.Bytes > lim.MaxBytes {
			t.Fatalf("wrote %d content bytes over the %d limit", st.Bytes, lim.MaxBytes)
		}
		checkNormalised(t, out.Bytes())
		var again bytes.Buffer
		if _, err := Flatten(context.Background(), openers(out.Bytes()), &again, lim); err != nil {
			t.Fatalf("flattening the output failed: %v", err)
		}
		if !bytes.Equal(out.Bytes(), again.Bytes()) {
			t.Fatalf("flatten is not idempotent")
		}
	})
}

func checkNormalised(t *testing.T, b []byte) {
	t.Helper()
	seen := map[string]byte{"": tar.TypeDir}
	tr := tar.NewReader(bytes.NewReader(b))
	for i := 0; ; i++ {
		h, err := tr.Next()
		if err == io.EOF {
			return
		}
		if err != nil {
			t.Fatalf("output is not a tar: %v", err)
		}
		name := strings.TrimSuffix(h.Name, "/")
		if i == 0 {
			if h.Name != "./" {
				t.Fatalf("first entry %q, want the root", h.Name)
			}
			continue
		}
		if p, err := CleanPath(name); err != nil || p != name {
			t.Fatalf("output name %q is not clean", h.Name)
		}
		if _, dup := seen[name]; dup {
			t.Fatalf("output name %q twice", name)
		}
		parent := ""
		if i := strings.LastIndexByte(name, '/'); i >= 0 {
			parent = name[:i]
		}
		if seen[parent] != tar.TypeDir {
			t.Fatalf("%q comes before its directory", name)
		}
		if h.Typeflag == tar.TypeLink {
			if typ, ok := seen[h.Linkname]; !ok || typ == tar.TypeDir {
				t.Fatalf("hard link %q to %q, not an earlier file", name, h.Linkname)
			}
		}
		if strings.HasPrefix(name[strings.LastIndexByte(name, '/')+1:], whiteoutPrefix) {
			t.Fatalf("whiteout %q in the output", name)
		}
		seen[name] = h.Typeflag
	}
}
