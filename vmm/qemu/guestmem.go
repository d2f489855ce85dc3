package qemu

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"

	"matchlock.dev/matchlock/vmm"
)

// Guest RAM on microvm: the first min(RAM, 3 GiB) sit at guest-physical
// address 0, the rest at 4 GiB; the memory backend (our memfd) holds them
// in that order. Measured with /proc/iomem in guests of 512 MiB and 4 GiB.
const (
	lowRAMLimit = 3 << 30
	highRAMBase = 4 << 30
)

// maxGuestMap bounds one MapGuest mapping.
const maxGuestMap = 1 << 30

var _ vmm.GuestMemory = (*Machine)(nil)

// MapGuest implements vmm.GuestMemory: each range is mapped from the
// guest-RAM memfd with MAP_FIXED into one reservation, so the result is
// contiguous whatever the guest-physical layout.
func (m *Machine) MapGuest(ranges []vmm.MemRange) ([]byte, error) {
	if m.snap.mem == nil {
		return nil, vmm.ErrNoGuestMemory
	}
	ram := uint64(memMiB(m.snap.spec)) << 20
	page := uint64(unix.Getpagesize())
	var total uint64
	offs := make([]int64, len(ranges))
	for i, r := range ranges {
		off, ok := ramOffset(r, ram, page)
		if !ok {
			return nil, fmt.Errorf("qemu: map guest memory: range %#x+%#x is not page-aligned guest RAM", r.Addr, r.Size)
		}
		offs[i] = off
		total += r.Size
		if total > maxGuestMap {
			return nil, fmt.Errorf("qemu: map guest memory: more than %d MiB", maxGuestMap>>20)
		}
	}
	if total == 0 {
		return nil, fmt.Errorf("qemu: map guest memory: nothing to map")
	}
	// The reservation comes from unix.Mmap, so that unix.Munmap of the
	// result (which covers the fixed mappings inside it) is allowed.
	mem, err := unix.Mmap(-1, 0, int(total), unix.PROT_NONE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return nil, fmt.Errorf("qemu: map guest memory: %w", err)
	}
	rc, err := m.snap.mem.SyscallConn()
	if err != nil {
		unix.Munmap(mem)
		return nil, fmt.Errorf("qemu: map guest memory: %w", err)
	}
	cerr := rc.Control(func(fd uintptr) {
		at := uint64(0)
		for i, r := range ranges {
			_, err = unix.MmapPtr(int(fd), offs[i], unsafe.Pointer(&mem[at]), uintptr(r.Size),
				unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_FIXED)
			if err != nil {
				return
			}
			at += r.Size
		}
	})
	if cerr != nil { // the machine has exited and its memfd is closed
		err = cerr
	}
	if err != nil {
		unix.Munmap(mem)
		return nil, fmt.Errorf("qemu: map guest memory: %w", err)
	}
	return mem, nil
}

// ramOffset returns where r lies in the memfd of a machine with ram bytes
// of RAM; ok is false unless r is page-aligned and inside RAM.
func ramOffset(r vmm.MemRange, ram, page uint64) (int64, bool) {
	if r.Size == 0 || r.Addr%page != 0 || r.Size%page != 0 || r.Addr+r.Size < r.Addr {
		return 0, false
	}
	low := min(ram, lowRAMLimit)
	switch {
	case r.Addr+r.Size <= low:
		return int64(r.Addr), true
	case r.Addr >= highRAMBase && r.Addr+r.Size <= highRAMBase+(ram-low):
		return int64(low + r.Addr - highRAMBase), true
	}
	return 0, false
}
