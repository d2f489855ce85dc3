package agent

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"matchlock.dev/matchlock/guest/proto"
	"matchlock.dev/matchlock/guest/proto/fsproto"
)

// memWindow is a share's read window (proto.MountRequest.WindowSize):
// memory of the agent's, locked, whose pages the host maps too, cut into
// fsproto.MaxIO slots. A read takes a free slot, the host preads the file
// straight into it (fsproto.FlagWindow) and go-fuse writes the kernel's
// reply from it: the data crosses no virtio-serial buffer and no Go
// buffer. When every slot is busy a read travels on the stream instead.
//
// The host finds the pages by their frame numbers, so they must never
// move: they are locked (no reclaim, no swap) and the project kernel has
// no page migration at all (no compaction, transparent huge pages, NUMA
// balancing or KSM); on a kernel that has any of them the agent offers no
// window (pagesCanMove).
type memWindow struct {
	mem   []byte
	slots chan uint64 // offsets of free slots
}

// windowAnswerTimeout bounds the wait for the host's answer to an offer.
const windowAnswerTimeout = 10 * time.Second

// offerWindow sets up the read window the host offered, or says why not.
// It returns nil when there is none: reads then travel on the stream.
func offerWindow(st *proto.Stream, size uint64) *memWindow {
	win, pages, err := pinWindow(size)
	if err != nil {
		st.SendMsg(proto.Encode(proto.StreamMsg{Type: proto.MsgWindow, Error: err.Error()}))
		return nil
	}
	if err := st.SendMsg(proto.Encode(proto.StreamMsg{Type: proto.MsgWindow, Window: pages})); err != nil {
		unix.Munmap(win.mem)
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), windowAnswerTimeout)
	defer cancel()
	b, err := st.RecvMsg(ctx)
	var m *proto.StreamMsg
	if err == nil {
		m, err = proto.DecodeStreamMsg(b)
	}
	if err == nil && (m.Type != proto.MsgWindow || m.Error != "") {
		err = fmt.Errorf("host: %s %s", m.Type, m.Error)
	}
	if err != nil {
		// Whatever the host mapped, it writes there only for reads that
		// name the window, and none will.
		unix.Munmap(win.mem)
		logf("share read window refused: %v; reads go over the control channel", err)
		return nil
	}
	return win
}

// pinWindow allocates and locks size bytes, stamps each page (see
// proto.WindowPages) and returns their frame numbers.
func pinWindow(size uint64) (*memWindow, *proto.WindowPages, error) {
	page := uint64(os.Getpagesize())
	if size < fsproto.MaxIO || size > fsproto.MaxWindow || size%fsproto.MaxIO != 0 {
		return nil, nil, fmt.Errorf("window of %d bytes: want a multiple of %d up to %d", size, fsproto.MaxIO, fsproto.MaxWindow)
	}
	if why := pagesCanMove(); why != "" {
		return nil, nil, fmt.Errorf("pages can move (%s)", why)
	}
	mem, err := unix.Mmap(-1, 0, int(size), unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE|unix.MAP_LOCKED)
	if err != nil {
		return nil, nil, fmt.Errorf("window: %w", err)
	}
	// Children must not share (and copy on write) the pages.
	unix.Madvise(mem, unix.MADV_DONTFORK)
	var nb [8]byte
	rand.Read(nb[:])
	nonce := binary.LittleEndian.Uint64(nb[:])
	n := size / page
	for i := uint64(0); i < n; i++ {
		binary.LittleEndian.PutUint64(mem[i*page:], nonce+i)
	}
	frames, err := frameNumbers(mem, page)
	if err != nil {
		unix.Munmap(mem)
		return nil, nil, err
	}
	win := &memWindow{mem: mem, slots: make(chan uint64, size/fsproto.MaxIO)}
	for off := uint64(0); off < size; off += fsproto.MaxIO {
		win.slots <- off
	}
	return win, &proto.WindowPages{Frames: frames, Nonce: nonce}, nil
}

// frameNumbers reads the page frame numbers of mem from /proc/self/pagemap
// (root sees them), big-endian, one u64 per page.
func frameNumbers(mem []byte, page uint64) ([]byte, error) {
	f, err := os.Open("/proc/self/pagemap")
	if err != nil {
		return nil, fmt.Errorf("window: %w", err)
	}
	defer f.Close()
	n := uint64(len(mem)) / page
	ents := make([]byte, 8*n)
	first := uint64(uintptr(unsafe.Pointer(&mem[0]))) / page
	if _, err := f.ReadAt(ents, int64(first*8)); err != nil {
		return nil, fmt.Errorf("window: pagemap: %w", err)
	}
	out := make([]byte, 0, 8*n)
	for i := uint64(0); i < n; i++ {
		e := binary.LittleEndian.Uint64(ents[8*i:])
		pfn := e & (1<<55 - 1)
		if e&(1<<63) == 0 || pfn == 0 {
			return nil, errors.New("window: pagemap shows no frame for a locked page")
		}
		out = binary.BigEndian.AppendUint64(out, pfn)
	}
	return out, nil
}

// pagesCanMove names a kernel feature that may move a locked page to
// another frame, or returns "".
func pagesCanMove() string {
	for _, p := range []string{
		"/proc/sys/vm/compact_memory",         // compaction
		"/sys/kernel/mm/transparent_hugepage", // khugepaged collapses
		"/proc/sys/kernel/numa_balancing",
		"/sys/kernel/mm/ksm",
	} {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return ""
}

// take returns a free slot's offset, if there is one.
func (w *memWindow) take() (uint64, bool) {
	select {
	case off := <-w.slots:
		return off, true
	default:
		return 0, false
	}
}

// windowRead reads through the window; ok is false when no slot is free.
func (c *fsClient) windowRead(req *fsproto.Request) (res fuse.ReadResult, st fuse.Status, ok bool) {
	off, ok := c.win.take()
	if !ok {
		return nil, 0, false
	}
	req.Flags |= fsproto.FlagWindow
	req.Node2 = off
	call, st := c.call(req, nil, nil)
	if st != fuse.OK {
		c.win.slots <- off
		return nil, st, true
	}
	n, ok := fsproto.Uint32(call.body)
	if !ok || len(call.body) != 4 || uint64(n) > req.Size {
		c.win.slots <- off
		c.fail(fmt.Errorf("workspace: bad window read reply (%d bytes)", len(call.body)))
		return nil, fuse.EIO, true
	}
	return &windowResult{w: c.win, off: off, n: int(n)}, fuse.OK, true
}

// windowResult is read data in a window slot. go-fuse writes it to the
// kernel with writev (it has go-fuse's Slices method, so go-fuse neither
// copies it nor calls Done early) and then calls Done, which frees the
// slot.
type windowResult struct {
	w    *memWindow
	off  uint64
	n    int
	done atomic.Bool
}

func (r *windowResult) data() []byte                       { return r.w.mem[r.off : r.off+uint64(r.n)] }
func (r *windowResult) Size() int                          { return r.n }
func (r *windowResult) Bytes([]byte) ([]byte, fuse.Status) { return r.data(), fuse.OK }
func (r *windowResult) Slices() ([][]byte, fuse.Status)    { return [][]byte{r.data()}, fuse.OK }

func (r *windowResult) Done() {
	if !r.done.Swap(true) {
		r.w.slots <- r.off
	}
}
