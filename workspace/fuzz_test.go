package workspace

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"matchlock.dev/matchlock/guest/proto/fsproto"
)

// FuzzServer feeds sequences of records, as a hostile guest would send
// them, to a server whose share holds the usual traps (symlinks out of it,
// a FIFO). Whatever the decoder accepts is executed; afterwards the
// directory next to the share must be untouched and nothing may block.
func FuzzServer(f *testing.F) {
	seq := func(rs ...*fsproto.Request) []byte {
		var b []byte
		for _, r := range rs {
			b = fsproto.AppendRequest(b, r)
		}
		return b
	}
	f.Add(seq(
		&fsproto.Request{Op: fsproto.OpLookup, Node: 1, Name: "up"},
		&fsproto.Request{Op: fsproto.OpLookup, Node: 2, Name: "secret"},
		&fsproto.Request{Op: fsproto.OpLink, Node: 2, Node2: 1, Name: "hl"},
		&fsproto.Request{Op: fsproto.OpCreate, Node: 2, Name: "x", OFlags: unix.O_RDWR, Mode: 0o644},
	))
	f.Add(seq(
		&fsproto.Request{Op: fsproto.OpLookup, Node: 1, Name: "file"},
		&fsproto.Request{Op: fsproto.OpOpen, Node: 2, OFlags: unix.O_RDWR},
		&fsproto.Request{Op: fsproto.OpWrite, Fh: 1, Off: 3, Data: []byte("zz")},
		&fsproto.Request{Op: fsproto.OpSetattr, Node: 2, Valid: fsproto.SetMode | fsproto.SetSize, Mode: 0o7777, Size: 1},
		&fsproto.Request{Op: fsproto.OpSetxattr, Node: 2, Name: "user.a", Data: []byte("b")},
		&fsproto.Request{Op: fsproto.OpRename, Node: 1, Name: "file", Node2: 1, Name2: "up"},
	))
	f.Add(seq(
		&fsproto.Request{Op: fsproto.OpLookup, Node: 1, Name: "fifo"},
		&fsproto.Request{Op: fsproto.OpOpen, Node: 2, OFlags: unix.O_RDONLY},
		&fsproto.Request{Op: fsproto.OpCreate, Node: 1, Name: "fifo", OFlags: unix.O_WRONLY},
		&fsproto.Request{Op: fsproto.OpMknod, Node: 1, Name: "dev", Mode: unix.S_IFCHR | 0o666},
		&fsproto.Request{Op: fsproto.OpOpendir, Node: 1},
		&fsproto.Request{Op: fsproto.OpReaddir, Fh: 1, Size: 4096, Flags: fsproto.FlagPlus},
	))
	f.Add(seq(
		&fsproto.Request{Op: fsproto.OpSymlink, Node: 1, Name: "s", Name2: "/"},
		&fsproto.Request{Op: fsproto.OpLookup, Node: 1, Name: "abs"},
		&fsproto.Request{Op: fsproto.OpRename, Node: 1, Name: "abs", Node2: 1, Name2: "file", OFlags: unix.RENAME_EXCHANGE},
		&fsproto.Request{Op: fsproto.OpForget, Data: fsproto.AppendForget(nil, fsproto.ForgetItem{Node: 2, Count: 1})},
	))
	f.Add(seq(
		&fsproto.Request{Op: fsproto.OpLookup, Node: 1, Name: "file"},
		&fsproto.Request{Op: fsproto.OpRead, Flags: fsproto.FlagWindow, Node: 2, Node2: 1<<16 - 3, Size: 6},
		&fsproto.Request{Op: fsproto.OpRead, Flags: fsproto.FlagWindow, Node: 2, Node2: 1<<16 - 6, Size: 6},
	))
	f.Fuzz(func(t *testing.T, b []byte) {
		window := make([]byte, 3<<16)
		c := newTC(t, Config{MaxNodes: 64, MaxHandles: 16})
		c.s.SetWindow(window[1<<16 : 2<<16 : 2<<16])
		os.WriteFile(filepath.Join(c.dir, "file"), []byte("inside"), 0o644)
		os.Symlink(c.out, filepath.Join(c.dir, "up"))
		os.Symlink("../outside/secret", filepath.Join(c.dir, "abs"))
		unix.Mkfifo(filepath.Join(c.dir, "fifo"), 0o644)
		for n := 0; len(b) >= 4 && n < 64; n++ {
			l := binary.BigEndian.Uint32(b)
			if uint64(l) > uint64(len(b)-4) {
				break
			}
			rec := b[4 : 4+l]
			b = b[4+l:]
			req, err := fsproto.DecodeRequest(rec)
			if err != nil {
				continue
			}
			if req.Op == fsproto.OpRead || req.Op == fsproto.OpReaddir || req.Op == fsproto.OpGetxattr || req.Op == fsproto.OpListxattr {
				req.Size = min(req.Size, 1<<16) // keep iterations cheap
			}
			if req.Op == fsproto.OpWrite || req.Op == fsproto.OpFallocate || req.Op == fsproto.OpSetattr {
				req.Off, req.Size = req.Off%(1<<20), req.Size%(1<<20) // no multi-GiB files in the corpus
			}
			c.s.Handle(req)
		}
		c.checkOutside()
		// Window reads stay inside the window they were given.
		for i, b := range window {
			if b != 0 && (i < 1<<16 || i >= 2<<16) {
				t.Fatalf("byte %d outside the window written", i)
			}
		}
	})
}
