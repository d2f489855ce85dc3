package qemu

import (
	"testing"

	"matchlock.dev/matchlock/vmm"
)

func TestRAMOffset(t *testing.T) {
	const page = 4096
	const gib = uint64(1) << 30
	for _, c := range []struct {
		name string
		r    vmm.MemRange
		ram  uint64
		off  int64
		ok   bool
	}{
		{"low", vmm.MemRange{Addr: 1 << 20, Size: 2 * page}, gib, 1 << 20, true},
		{"last low page", vmm.MemRange{Addr: gib - page, Size: page}, gib, int64(gib - page), true},
		{"past the end", vmm.MemRange{Addr: gib - page, Size: 2 * page}, gib, 0, false},
		{"unaligned address", vmm.MemRange{Addr: 100, Size: page}, gib, 0, false},
		{"unaligned size", vmm.MemRange{Addr: page, Size: 100}, gib, 0, false},
		{"empty", vmm.MemRange{Addr: page}, gib, 0, false},
		{"wraps", vmm.MemRange{Addr: ^uint64(0) &^ (page - 1), Size: 2 * page}, gib, 0, false},
		// 4 GiB of RAM: 3 GiB low, 1 GiB at 4 GiB, after the low part in the memfd.
		{"high", vmm.MemRange{Addr: 4 * gib, Size: page}, 4 * gib, int64(3 * gib), true},
		{"high end", vmm.MemRange{Addr: 5*gib - page, Size: page}, 4 * gib, int64(4*gib - page), true},
		{"past high end", vmm.MemRange{Addr: 5 * gib, Size: page}, 4 * gib, 0, false},
		{"hole below 4 GiB", vmm.MemRange{Addr: 3 * gib, Size: page}, 4 * gib, 0, false},
		{"across the hole", vmm.MemRange{Addr: 3*gib - page, Size: gib + 2*page}, 4 * gib, 0, false},
		{"high in a small guest", vmm.MemRange{Addr: 4 * gib, Size: page}, gib, 0, false},
	} {
		off, ok := ramOffset(c.r, c.ram, page)
		if ok != c.ok || (ok && off != c.off) {
			t.Errorf("%s: ramOffset(%#x+%#x, ram %#x) = %#x, %v; want %#x, %v", c.name, c.r.Addr, c.r.Size, c.ram, off, ok, c.off, c.ok)
		}
	}
}
