package agent

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func writeDBs(t *testing.T) (string, string) {
	dir := t.TempDir()
	pw := filepath.Join(dir, "passwd")
	gr := filepath.Join(dir, "group")
	os.WriteFile(pw, []byte("root:x:0:0:root:/root:/bin/sh\n# comment\n\nuser:x:1000:1000::/home/user:/bin/sh\nbroken:x:zz:1::/:/bin/sh\nshort:x\n"), 0o644)
	os.WriteFile(gr, []byte("root:x:0:\nwheel:x:10:user,other\nuser:x:1000:\nstaff:x:50:\n"), 0o644)
	return pw, gr
}

func TestResolveUser(t *testing.T) {
	pw, gr := writeDBs(t)
	for _, tc := range []struct {
		spec string
		want Identity
		err  string
	}{
		{"", Identity{UID: 0, GID: 0, Home: "/root"}, ""},
		{"root", Identity{UID: 0, GID: 0, Home: "/root"}, ""},
		{"user", Identity{UID: 1000, GID: 1000, Groups: []uint32{10}, Home: "/home/user"}, ""},
		{"1000", Identity{UID: 1000, GID: 1000, Groups: []uint32{10}, Home: "/home/user"}, ""},
		{"user:staff", Identity{UID: 1000, GID: 50, Home: "/home/user"}, ""},
		{"user:77", Identity{UID: 1000, GID: 77, Home: "/home/user"}, ""},
		{"4242", Identity{UID: 4242, GID: 0, Home: "/"}, ""},
		{"4242:4343", Identity{UID: 4242, GID: 4343, Home: "/"}, ""},
		{"nobody", Identity{}, "no such user"},
		{"user:nogroup", Identity{}, "no such group"},
		{"user:", Identity{}, "want user[:group]"},
		{":0", Identity{}, "want user[:group]"},
		{"99999999999", Identity{}, "no such user"},
	} {
		got, err := resolveUser(tc.spec, pw, gr)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%q: err %v, want %q", tc.spec, err, tc.err)
			}
			continue
		}
		if err != nil || !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%q: got %+v %v, want %+v", tc.spec, got, err, tc.want)
		}
	}
}

func TestLookPath(t *testing.T) {
	dir := t.TempDir()
	exe := filepath.Join(dir, "tool")
	os.WriteFile(exe, []byte("#!/bin/sh\n"), 0o755)
	os.WriteFile(filepath.Join(dir, "plain"), []byte("x"), 0o644)
	if p, err := lookPath("tool", "/nonexistent:"+dir); err != nil || p != exe {
		t.Fatalf("lookPath: %q %v", p, err)
	}
	if _, err := lookPath("plain", dir); err == nil || !strings.Contains(err.Error(), "permission") {
		t.Fatalf("non-executable: %v", err)
	}
	if _, err := lookPath("missing", dir); err == nil || !strings.Contains(err.Error(), "not found") {
		t.Fatalf("missing: %v", err)
	}
}

// FuzzParseDB: arbitrary passwd/group content never panics, and resolving
// against it never panics either.
func FuzzParseDB(f *testing.F) {
	f.Add([]byte("root:x:0:0:root:/root:/bin/sh\n"), "root:wheel")
	f.Add([]byte("::::::\n:\n"), "0")
	f.Fuzz(func(t *testing.T, db []byte, spec string) {
		parseDB(strings.NewReader(string(db)))
		dir := t.TempDir()
		p := filepath.Join(dir, "db")
		os.WriteFile(p, db, 0o644)
		resolveUser(spec, p, p)
	})
}
