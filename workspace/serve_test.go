package workspace

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"matchlock.dev/matchlock/guest/proto"
	"matchlock.dev/matchlock/guest/proto/fsproto"
)

// streamPair connects a host and a guest proto.Conn over a socketpair and
// returns both ends of one host-opened stream.
func streamPair(t testing.TB) (host, guest *proto.Stream) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	var conns [2]net.Conn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "sp")
		conns[i], err = net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	hc := proto.NewConn(conns[0], proto.Config{Initiator: true, Window: 128 << 10, MaxStreams: 64})
	gc := proto.NewConn(conns[1], proto.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	errc := make(chan error, 1)
	go func() { _, err := gc.Handshake(ctx); errc <- err }()
	if _, err := hc.Handshake(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { hc.Close(); gc.Close() })
	host, err = hc.Open(ctx, []byte("mount"))
	if err != nil {
		t.Fatal(err)
	}
	guest, err = gc.Accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return host, guest
}

// guestEnd is a minimal guest-side client: tagged requests out, replies
// matched by tag.
type guestEnd struct {
	st      *proto.Stream
	mu      sync.Mutex
	tag     uint32
	pending map[uint32]chan reply
	wmu     [2]sync.Mutex
}

type reply struct {
	errno uint16
	body  []byte
}

func newGuestEnd(st *proto.Stream, readBulk bool) *guestEnd {
	g := &guestEnd{st: st, pending: map[uint32]chan reply{}}
	go g.readLoop(fsproto.ChanMetaReply, fsproto.MaxMetaReply)
	if readBulk {
		go g.readLoop(fsproto.ChanBulkReply, fsproto.MaxBulkReply)
	}
	return g
}

func (g *guestEnd) readLoop(ch proto.Channel, max int) {
	br := bufio.NewReader(g.st.Reader(ch))
	for {
		var hb [12]byte
		if _, err := io.ReadFull(br, hb[:]); err != nil {
			return
		}
		h, err := fsproto.DecodeReplyHead(hb[:], max)
		if err != nil {
			return
		}
		body := make([]byte, h.BodyLen)
		if _, err := io.ReadFull(br, body); err != nil {
			return
		}
		g.mu.Lock()
		c := g.pending[h.Tag]
		delete(g.pending, h.Tag)
		g.mu.Unlock()
		if c != nil {
			c <- reply{h.Errno, body}
		}
	}
}

// start sends r and returns the channel its reply arrives on.
func (g *guestEnd) start(r *fsproto.Request) <-chan reply {
	c := make(chan reply, 1)
	g.mu.Lock()
	g.tag++
	r.Tag = g.tag
	g.pending[r.Tag] = c
	g.mu.Unlock()
	lane, ch := 0, fsproto.ChanMeta
	if r.Op.Bulk() {
		lane, ch = 1, fsproto.ChanBulk
	}
	g.wmu[lane].Lock()
	g.st.Write(ch, fsproto.AppendRequest(nil, r))
	g.wmu[lane].Unlock()
	return c
}

func (g *guestEnd) call(t testing.TB, r *fsproto.Request) reply {
	t.Helper()
	select {
	case rep := <-g.start(r):
		return rep
	case <-time.After(30 * time.Second):
		t.Fatalf("%s: no reply", r.Op)
		return reply{}
	}
}

func serve(t testing.TB, cfg Config) (*Server, *proto.Stream, *proto.Stream, <-chan error) {
	t.Helper()
	if cfg.Dir == "" {
		cfg.Dir = t.TempDir()
	}
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	host, guest := streamPair(t)
	done := make(chan error, 1)
	ended := make(chan struct{})
	ctx, cancel := context.WithCancel(context.Background())
	go func() { err := s.Serve(ctx, host); close(ended); done <- err }()
	t.Cleanup(func() {
		cancel()
		<-ended
		s.Close()
	})
	return s, host, guest, done
}

func TestServeConcurrent(t *testing.T) {
	dir := t.TempDir()
	for i := 0; i < 50; i++ {
		os.WriteFile(filepath.Join(dir, fmt.Sprintf("f%d", i)), []byte(fmt.Sprintf("content %d", i)), 0o644)
	}
	_, _, gs, _ := serve(t, Config{Dir: dir})
	g := newGuestEnd(gs, true)
	var wg sync.WaitGroup
	errs := make(chan error, 200)
	for i := 0; i < 200; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			name := fmt.Sprintf("f%d", i%50)
			rep := g.call(t, &fsproto.Request{Op: fsproto.OpLookup, Node: RootNode, Name: name})
			if rep.errno != 0 {
				errs <- fmt.Errorf("lookup %s: %d", name, rep.errno)
				return
			}
			node, _, _ := fsproto.DecodeEntry(rep.body)
			rep = g.call(t, &fsproto.Request{Op: fsproto.OpOpen, Node: node, OFlags: unix.O_RDONLY})
			fh, _ := fsproto.Uint64(rep.body)
			rep = g.call(t, &fsproto.Request{Op: fsproto.OpRead, Fh: fh, Size: 100})
			if want := fmt.Sprintf("content %d", i%50); string(rep.body) != want {
				errs <- fmt.Errorf("read %s: %q", name, rep.body)
			}
			g.start(&fsproto.Request{Op: fsproto.OpRelease, Fh: fh})
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestServeNoHeadOfLineBlocking: with the bulk reply channel stalled (the
// guest does not read it), metadata requests are still answered.
func TestServeNoHeadOfLineBlocking(t *testing.T) {
	dir := t.TempDir()
	big := make([]byte, 4<<20)
	os.WriteFile(filepath.Join(dir, "big"), big, 0o644)
	_, _, gs, _ := serve(t, Config{Dir: dir})
	g := newGuestEnd(gs, false) // nobody reads ChanBulkReply
	rep := g.call(t, &fsproto.Request{Op: fsproto.OpLookup, Node: RootNode, Name: "big"})
	node, _, _ := fsproto.DecodeEntry(rep.body)
	fh, _ := fsproto.Uint64(g.call(t, &fsproto.Request{Op: fsproto.OpOpen, Node: node, OFlags: unix.O_RDONLY}).body)
	for i := 0; i < 4; i++ { // 4 MiB of replies: far beyond the window
		g.start(&fsproto.Request{Op: fsproto.OpRead, Fh: fh, Off: uint64(i) << 20, Size: fsproto.MaxIO})
	}
	for i := 0; i < 20; i++ {
		if rep := g.call(t, &fsproto.Request{Op: fsproto.OpGetattr, Node: node}); rep.errno != 0 {
			t.Fatalf("getattr behind stalled reads: %d", rep.errno)
		}
	}
}

// TestServeMalformed: a record the decoder rejects ends the stream with a
// reset, and Serve returns ErrMalformed after its requests finished.
func TestServeMalformed(t *testing.T) {
	for name, rec := range map[string][]byte{
		"short length": {0, 0, 0, 1, 0},
		"huge length":  {0xff, 0xff, 0xff, 0xff},
		"reserved set": func() []byte {
			b := fsproto.AppendRequest(nil, &fsproto.Request{Op: fsproto.OpLookup, Node: 1, Name: "a"})
			b[4+10] = 1
			return b
		}(),
		// A read belongs on the bulk channel.
		"wrong channel": fsproto.AppendRequest(nil, &fsproto.Request{Op: fsproto.OpRead, Fh: 1, Size: 1}),
	} {
		t.Run(name, func(t *testing.T) {
			_, _, gs, done := serve(t, Config{})
			gs.Write(fsproto.ChanMeta, rec)
			select {
			case err := <-done:
				if !errors.Is(err, ErrMalformed) {
					t.Fatalf("Serve: %v", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("Serve kept going")
			}
			select {
			case <-gs.Done():
			case <-time.After(10 * time.Second):
				t.Fatal("stream not reset")
			}
		})
	}
}

// TestServeInFlightBound: requests beyond MaxInFlight wait in the channel
// (flow control), they are not read into memory.
func TestServeInFlightBound(t *testing.T) {
	dir := t.TempDir()
	if err := unix.Mkfifo(filepath.Join(dir, "x"), 0o644); err != nil {
		t.Fatal(err)
	}
	s, _, gs, _ := serve(t, Config{Dir: dir, MaxInFlight: 2})
	g := newGuestEnd(gs, true)
	var chans []<-chan reply
	for i := 0; i < 100; i++ {
		chans = append(chans, g.start(&fsproto.Request{Op: fsproto.OpLookup, Node: RootNode, Name: "x"}))
	}
	for _, c := range chans {
		select {
		case r := <-c:
			if r.errno != 0 {
				t.Fatal(syscall.Errno(r.errno))
			}
		case <-time.After(30 * time.Second):
			t.Fatal("no reply")
		}
	}
	if st := s.Stats(); st.Nodes != 2 {
		t.Fatalf("stats %+v", st)
	}
}

// TestServePressure: once the guest holds most of MaxNodes, replies carry
// ReplyPressure (the guest then lets its kernel forget).
func TestServePressure(t *testing.T) {
	dir := t.TempDir()
	for i := 0; i < 8; i++ {
		os.WriteFile(filepath.Join(dir, fmt.Sprint(i)), nil, 0o644)
	}
	_, _, gs, _ := serve(t, Config{Dir: dir, MaxNodes: 8})
	br := bufio.NewReader(gs.Reader(fsproto.ChanMetaReply))
	var flags []uint16
	for i := 0; i < 8; i++ {
		gs.Write(fsproto.ChanMeta, fsproto.AppendRequest(nil, &fsproto.Request{Tag: uint32(i + 1), Op: fsproto.OpLookup, Node: RootNode, Name: fmt.Sprint(i)}))
		var hb [12]byte
		if _, err := io.ReadFull(br, hb[:]); err != nil {
			t.Fatal(err)
		}
		h, _ := fsproto.DecodeReplyHead(hb[:], fsproto.MaxMetaReply)
		io.CopyN(io.Discard, br, int64(h.BodyLen))
		flags = append(flags, h.Flags)
	}
	// Nodes: the root plus one per lookup; 3/4 of 8 is reached at the 5th.
	if flags[3] != 0 || flags[5] != fsproto.ReplyPressure {
		t.Fatalf("flags %v", flags)
	}
}
