package sandbox

import (
	"encoding/binary"
	"os"
	"reflect"
	"strings"
	"testing"

	"matchlock.dev/matchlock/guest/proto"
	"matchlock.dev/matchlock/vmm"
)

// fakeRAM is guest RAM for mapWindow: MapGuest returns a copy of the
// ranges asked for (mapWindow only reads what it maps) and records them.
type fakeRAM struct {
	ram    []byte
	ranges []vmm.MemRange
}

func (f *fakeRAM) MapGuest(rs []vmm.MemRange) ([]byte, error) {
	f.ranges = rs
	var out []byte
	for _, r := range rs {
		out = append(out, f.ram[r.Addr:r.Addr+r.Size]...)
	}
	return out, nil
}

func TestMapWindow(t *testing.T) {
	page := uint64(os.Getpagesize())
	ram := &fakeRAM{ram: make([]byte, 64*page)}
	frames := []uint64{10, 11, 12, 40, 5, 6} // in guest-virtual order
	const nonce = 0xfeed0000
	stamp := func() *proto.WindowPages {
		p := &proto.WindowPages{Nonce: nonce}
		for i, pfn := range frames {
			binary.LittleEndian.PutUint64(ram.ram[pfn*page:], nonce+uint64(i))
			p.Frames = binary.BigEndian.AppendUint64(p.Frames, pfn)
		}
		return p
	}
	size := uint64(len(frames)) * page

	mem, err := mapWindow(ram, stamp(), size)
	if err != nil || uint64(len(mem)) != size {
		t.Fatalf("mapWindow: %d bytes, %v", len(mem), err)
	}
	want := []vmm.MemRange{{Addr: 10 * page, Size: 3 * page}, {Addr: 40 * page, Size: page}, {Addr: 5 * page, Size: 2 * page}}
	if !reflect.DeepEqual(ram.ranges, want) {
		t.Fatalf("ranges %v, want %v", ram.ranges, want)
	}

	p := stamp()
	binary.LittleEndian.PutUint64(ram.ram[40*page:], 0) // page 3 is not what the guest stamped
	if _, err := mapWindow(ram, p, size); err == nil || !strings.Contains(err.Error(), "page 3") {
		t.Fatalf("wrong page accepted: %v", err)
	}
	if _, err := mapWindow(ram, stamp(), size+page); err == nil {
		t.Fatal("frame count not checked against the size")
	}
	p = stamp()
	p.Frames = binary.BigEndian.AppendUint64(p.Frames[:len(p.Frames)-8], 1<<50)
	if _, err := mapWindow(ram, p, size); err == nil {
		t.Fatal("absurd frame number accepted")
	}
}

// FuzzMapWindow: whatever frames a guest names, mapWindow maps only guest
// RAM it was given, never panics, and accepts only stamped pages.
func FuzzMapWindow(f *testing.F) {
	page := uint64(os.Getpagesize())
	f.Add([]byte{0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2}, uint64(7), uint8(2))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, uint64(0), uint8(1))
	f.Fuzz(func(t *testing.T, frames []byte, nonce uint64, pages uint8) {
		ram := &checkedRAM{fakeRAM{ram: make([]byte, 16*page)}}
		for i := uint64(0); i < 16; i++ {
			binary.LittleEndian.PutUint64(ram.ram[i*page:], nonce+i%4)
		}
		mem, err := mapWindow(ram, &proto.WindowPages{Frames: frames, Nonce: nonce}, uint64(pages)*page)
		if err != nil {
			return
		}
		for i := uint64(0); i < uint64(pages); i++ {
			if binary.LittleEndian.Uint64(mem[i*page:]) != nonce+i {
				t.Fatalf("page %d accepted without its stamp", i)
			}
		}
	})
}

// checkedRAM refuses ranges outside its RAM, as vmm/qemu does.
type checkedRAM struct{ fakeRAM }

func (c *checkedRAM) MapGuest(rs []vmm.MemRange) ([]byte, error) {
	for _, r := range rs {
		if r.Addr+r.Size < r.Addr || r.Addr+r.Size > uint64(len(c.ram)) {
			return nil, os.ErrInvalid
		}
	}
	return c.fakeRAM.MapGuest(rs)
}
