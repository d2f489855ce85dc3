package fsproto

import (
	"bytes"
	"reflect"
	"strings"
	"testing"
)

func sampleRequests() []*Request {
	return []*Request{
		{Tag: 1, Op: OpLookup, Node: 1, Name: "a"},
		{Tag: 2, Op: OpRename, Node: 1, Node2: 7, Name: "old", Name2: "new", OFlags: 1},
		{Tag: 3, Op: OpSymlink, Node: 1, Name: "l", Name2: "../../etc/passwd"},
		{Tag: 4, Op: OpWrite, Fh: 9, Off: 5 << 30, Data: []byte("hello")},
		{Tag: 5, Op: OpRead, Fh: 9, Off: 1, Size: MaxIO},
		{Tag: 6, Op: OpSetattr, Node: 3, Flags: FlagFh, Fh: 2, Valid: SetMode | SetMtime, Mode: 0o4755,
			Mtime: Timespec{Sec: -5, Nsec: 999999999}},
		{Tag: 7, Op: OpForget, Data: AppendForget(AppendForget(nil, ForgetItem{2, 1}), ForgetItem{3, 9})},
		{Tag: 8, Op: OpSetxattr, Node: 2, Name: "user.x/y", Data: []byte{0, 1, 2}},
		{Tag: 9, Op: OpReaddir, Fh: 4, Flags: FlagPlus, Size: 4096},
		{Tag: 10, Op: OpRead, Node: 7, Flags: FlagWindow, Node2: 3 << 20, Size: MaxIO},
	}
}

func TestRequestRoundTrip(t *testing.T) {
	for _, r := range sampleRequests() {
		b := AppendRequest(nil, r)
		if int(be.Uint32(b)) != len(b)-4 {
			t.Fatalf("%s: length field %d, record %d", r.Op, be.Uint32(b), len(b)-4)
		}
		got, err := DecodeRequest(b[4:])
		if err != nil {
			t.Fatalf("%s: %v", r.Op, err)
		}
		if !reflect.DeepEqual(got, r) {
			t.Fatalf("%s: round trip\n got %+v\nwant %+v", r.Op, got, r)
		}
		// Head then data written separately make the same record.
		split := append(AppendRequestHead(nil, r, len(r.Data)), r.Data...)
		if !bytes.Equal(split, b) {
			t.Fatalf("%s: AppendRequestHead differs", r.Op)
		}
	}
}

func TestRequestRejects(t *testing.T) {
	long := strings.Repeat("x", MaxName+1)
	bad := []*Request{
		{Op: OpLookup, Node: 1, Name: ".."},
		{Op: OpLookup, Node: 1, Name: "."},
		{Op: OpLookup, Node: 1, Name: "a/b"},
		{Op: OpLookup, Node: 1, Name: "a\x00b"},
		{Op: OpLookup, Node: 1, Name: ""},
		{Op: OpLookup, Node: 1, Name: long},
		{Op: OpLookup, Node: 1, Name: "a", Name2: "b"},
		{Op: OpRename, Node: 1, Name: "a", Name2: "../b"},
		{Op: OpSymlink, Node: 1, Name: "l", Name2: ""},
		{Op: OpSymlink, Node: 1, Name: "l", Name2: strings.Repeat("a", MaxSymlink+1)},
		{Op: OpRead, Fh: 1, Size: MaxIO + 1},
		{Op: OpReaddir, Fh: 1, Size: MaxReaddir + 1},
		{Op: OpGetxattr, Node: 1, Name: "user.a", Size: MaxXattrValue + 1},
		{Op: OpWrite, Fh: 1, Data: make([]byte, MaxIO+1)},
		{Op: OpLookup, Node: 1, Name: "a", Data: []byte("x")},
		{Op: OpForget, Data: []byte("short")},
		{Op: OpForget},
		{Op: OpGetattr, Flags: FlagPlus},
		{Op: OpWrite, Flags: FlagWindow},
		{Op: OpRead, Flags: FlagWindow, Node2: MaxWindow + 1, Size: 1},
		{Op: OpSetattr, Valid: 1 << 20},
		{Op: OpSetattr, Atime: Timespec{Nsec: 1e9}},
		{Op: 0},
		{Op: opEnd},
	}
	for _, r := range bad {
		b := AppendRequest(nil, r)
		if _, err := DecodeRequest(b[4:]); err == nil {
			t.Errorf("%s %+v: accepted", r.Op, r)
		}
	}
	// Structural damage.
	good := AppendRequest(nil, &Request{Op: OpLookup, Node: 1, Name: "abc"})[4:]
	for i, b := range [][]byte{
		good[:HeadSize-1],
		good[:len(good)-1],
		append(append([]byte(nil), good...), 'x'),
		func() []byte { c := append([]byte(nil), good...); c[10] = 1; return c }(),
	} {
		if _, err := DecodeRequest(b); err == nil {
			t.Errorf("damaged record %d accepted", i)
		}
	}
}

func TestReplyBodies(t *testing.T) {
	a := Attr{Ino: 7, Size: 5 << 32, Blocks: 3, Atime: Timespec{1, 2}, Mtime: Timespec{-3, 4}, Ctime: Timespec{5, 6},
		Mode: 0o100644, Nlink: 2, Rdev: 0, Blk: 4096}
	b := AppendEntry(nil, 42, &a)
	if len(b) != EntrySize {
		t.Fatalf("entry is %d bytes, want %d", len(b), EntrySize)
	}
	n, got, ok := DecodeEntry(b)
	if !ok || n != 42 || got != a {
		t.Fatalf("entry round trip: %d %+v %v", n, got, ok)
	}
	ds := []Dirent{{Ino: 1, Off: 10, Type: 4, Name: "."}, {Ino: 9, Off: 20, Type: 8, Name: "file", Node: 3, Attr: a}}
	for _, plus := range []bool{false, true} {
		var body []byte
		for i := range ds {
			body = AppendDirent(body, &ds[i], plus)
		}
		var back []Dirent
		if err := DecodeDirents(body, plus, func(d *Dirent) bool { back = append(back, *d); return true }); err != nil {
			t.Fatal(err)
		}
		for i := range ds {
			want := ds[i]
			if !plus {
				want.Node, want.Attr = 0, Attr{}
			}
			if back[i] != want {
				t.Fatalf("plus=%v dirent %d: %+v", plus, i, back[i])
			}
		}
	}
	s := Statfs{1, 2, 3, 4, 5, 6, 7, 8}
	if got, ok := DecodeStatfs(AppendStatfs(nil, &s)); !ok || got != s {
		t.Fatal("statfs round trip")
	}
	h := AppendReplyHead(nil, 5, 2, ReplyPressure, 10)
	rh, err := DecodeReplyHead(h, MaxMetaReply)
	if err != nil || rh != (ReplyHead{Tag: 5, Errno: 2, Flags: ReplyPressure, BodyLen: 10}) {
		t.Fatalf("reply head: %+v %v", rh, err)
	}
	if _, err := DecodeReplyHead(AppendReplyHead(nil, 1, 0, 0, MaxMetaReply), MaxMetaReply); err == nil {
		t.Fatal("oversized reply accepted")
	}
}

// FuzzDecodeRequest: the decoder never panics, everything it accepts obeys
// the limits, and accepted records re-encode to the same request.
func FuzzDecodeRequest(f *testing.F) {
	for _, r := range sampleRequests() {
		f.Add(AppendRequest(nil, r)[4:])
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := DecodeRequest(b)
		if err != nil {
			return
		}
		spec := opSpecs[r.Op]
		if len(r.Data) > spec.maxData || r.Size > spec.maxSize {
			t.Fatalf("%s: data %d size %d beyond limits", r.Op, len(r.Data), r.Size)
		}
		for _, name := range []string{r.Name, r.Name2} {
			if len(name) > MaxSymlink {
				t.Fatalf("%s: name of %d bytes", r.Op, len(name))
			}
		}
		if spec.name == component && !ValidName(r.Name) || spec.name2 == component && !ValidName(r.Name2) {
			t.Fatalf("%s: invalid component accepted: %q %q", r.Op, r.Name, r.Name2)
		}
		again, err := DecodeRequest(AppendRequest(nil, r)[4:])
		if err != nil {
			t.Fatalf("re-encoded request rejected: %v", err)
		}
		if !reflect.DeepEqual(again, r) {
			t.Fatalf("round trip differs:\n%+v\n%+v", r, again)
		}
	})
}

// FuzzDecodeDirents: the guest-side parser of readdir replies never panics.
func FuzzDecodeDirents(f *testing.F) {
	d := Dirent{Ino: 1, Off: 2, Type: 8, Name: "x"}
	f.Add(AppendDirent(nil, &d, true), true)
	f.Add(AppendDirent(nil, &d, false), false)
	f.Fuzz(func(t *testing.T, b []byte, plus bool) {
		DecodeDirents(b, plus, func(d *Dirent) bool {
			if len(d.Name) == 0 || len(d.Name) > 255 {
				t.Fatalf("name of %d bytes", len(d.Name))
			}
			return true
		})
	})
}
