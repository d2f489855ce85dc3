package proto

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
)

// TestManyStreams moves several MiB in both directions on many concurrent
// streams and checks every byte.
func TestManyStreams(t *testing.T) {
	forEachTransport(t, func(t *testing.T, tr transport) {
		const streams = 8
		size := 3 << 20
		if testing.Short() {
			size = 256 << 10
		}
		host, guest := connPair(t, tr, Config{}, Config{})
		ctx := testCtx(t)

		// Guest: for each stream, read Stdin and Aux, answer with their
		// digests as messages, while writing Stdout and Stderr.
		guestErr := make(chan error, streams)
		go func() {
			for range streams {
				st, err := guest.Accept(ctx)
				if err != nil {
					guestErr <- err
					return
				}
				go func() { guestErr <- guestSide(ctx, st, size) }()
			}
		}()

		var wg sync.WaitGroup
		hostErr := make(chan error, streams)
		for i := range streams {
			wg.Add(1)
			go func() {
				defer wg.Done()
				hostErr <- hostSide(ctx, host, i, size)
			}()
		}
		wg.Wait()
		for range streams {
			if err := recvErr(t, hostErr, "host side"); err != nil {
				t.Error("host:", err)
			}
			if err := recvErr(t, guestErr, "guest side"); err != nil {
				t.Error("guest:", err)
			}
		}
		if n := numStreams(host) + numStreams(guest); n != 0 {
			t.Errorf("%d streams still registered", n)
		}
		if host.Err() != nil || guest.Err() != nil {
			t.Errorf("conn errors: %v, %v", host.Err(), guest.Err())
		}
	})
}

func seedFor(id uint32, ch Channel) uint64 { return uint64(id)<<8 | uint64(ch) }

func hostSide(ctx context.Context, c *Conn, i, size int) error {
	st, err := c.Open(ctx, []byte(fmt.Sprintf("stream %d", i)))
	if err != nil {
		return err
	}
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for _, ch := range []Channel{Stdin, Aux} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := st.Write(ch, randBytes(seedFor(st.ID(), ch), size)); err != nil {
				errs <- err
				return
			}
			errs <- st.CloseWrite(ch)
		}()
	}
	for _, ch := range []Channel{Stdout, Stderr} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got, err := io.ReadAll(st.Reader(ch))
			if err == nil && !bytes.Equal(got, randBytes(seedFor(st.ID(), ch), size)) {
				err = fmt.Errorf("stream %d channel %d: got %d bytes, corrupt", st.ID(), ch, len(got))
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			return err
		}
	}
	for _, ch := range []Channel{Stdin, Aux} {
		m, err := st.RecvMsg(ctx)
		if err != nil {
			return err
		}
		want := sha256.Sum256(randBytes(seedFor(st.ID(), ch), size))
		if !bytes.Equal(m, want[:]) {
			return fmt.Errorf("stream %d channel %d: digest mismatch", st.ID(), ch)
		}
	}
	if _, err := st.RecvMsg(ctx); err != io.EOF {
		return fmt.Errorf("RecvMsg after guest Close: %v, want EOF", err)
	}
	st.Close()
	select {
	case <-st.Done():
	case <-ctx.Done():
		return errors.New("stream not done after both Close")
	}
	return nil
}

func guestSide(ctx context.Context, st *Stream, size int) error {
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	digests := make([][]byte, NumChannels)
	for _, ch := range []Channel{Stdin, Aux} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			h := sha256.New()
			n, err := io.Copy(h, st.Reader(ch))
			if err == nil && n != int64(size) {
				err = fmt.Errorf("read %d bytes on channel %d, want %d", n, ch, size)
			}
			digests[ch] = h.Sum(nil)
			errs <- err
		}()
	}
	for _, ch := range []Channel{Stdout, Stderr} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w := st.Writer(ch)
			if _, err := w.Write(randBytes(seedFor(st.ID(), ch), size)); err != nil {
				errs <- err
				return
			}
			errs <- w.Close()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			return err
		}
	}
	for _, ch := range []Channel{Stdin, Aux} {
		if err := st.SendMsg(digests[ch]); err != nil {
			return err
		}
	}
	st.Close()
	select {
	case <-st.Done():
		return nil
	case <-ctx.Done():
		return errors.New("guest stream not done after both Close")
	}
}

// TestFlowControlIsolation: a stream whose reader does not read blocks its
// writer after one window, and only that stream.
func TestFlowControlIsolation(t *testing.T) {
	forEachTransport(t, func(t *testing.T, tr transport) {
		const window = 64 << 10
		host, guest := connPair(t, tr, Config{Window: window}, Config{Window: window})
		stuckH, stuckG := openAccept(t, host, guest, "stuck")

		want := randBytes(1, 5*window)
		wrote := make(chan error, 1)
		go func() {
			_, err := stuckH.Write(Stdin, want)
			wrote <- err
		}()
		waitUntil(t, host, "the writer is out of credit", func() bool {
			return stuckH.send[Stdin].credit == 0 && stuckH.send[Stdin].ev.ch != nil
		})

		// Other streams, and the stuck stream's other channels, proceed.
		for i := range 3 {
			a, b := openAccept(t, host, guest, fmt.Sprint("free", i))
			payload := randBytes(uint64(10+i), 1<<20)
			go func() { a.Write(Stdin, payload); a.CloseWrite(Stdin) }()
			go func() { b.Write(Stdout, payload); b.CloseWrite(Stdout) }()
			for _, r := range []io.Reader{b.Reader(Stdin), a.Reader(Stdout)} {
				got, err := io.ReadAll(r)
				if err != nil || !bytes.Equal(got, payload) {
					t.Fatalf("free stream: %d bytes, %v", len(got), err)
				}
			}
		}
		if _, err := stuckG.Write(Stdout, []byte("other channel")); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 100)
		if n, err := stuckH.Read(Stdout, buf); err != nil || string(buf[:n]) != "other channel" {
			t.Fatalf("other channel: %q %v", buf[:n], err)
		}

		// The Pong proves the guest processed all the Data sent before.
		if _, err := host.Ping(testCtx(t)); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-wrote:
			t.Fatalf("write beyond the window completed without a reader: %v", err)
		default:
		}
		guest.mu.Lock()
		buffered := stuckG.recv[Stdin].buf.Len()
		capacity := len(stuckG.recv[Stdin].buf.buf)
		guest.mu.Unlock()
		if buffered != window || capacity > window {
			t.Fatalf("receiver buffers %d bytes in %d, want exactly the window %d", buffered, capacity, window)
		}

		// Reading unblocks the writer; the bytes are intact.
		got := make([]byte, len(want))
		if _, err := io.ReadFull(stuckG.Reader(Stdin), got); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatal("stuck stream data corrupt")
		}
		if err := recvErr(t, wrote, "write"); err != nil {
			t.Fatal(err)
		}
	})
}

func TestCreditViolation(t *testing.T) {
	c, r := hostRaw(t, Config{Window: 4096})
	r.mustSend(FrameOpen, 2, nil)
	r.data(2, Stdout, make([]byte, 4000))
	r.data(2, Stdout, make([]byte, 96)) // exactly the window
	r.sync()
	if c.Err() != nil {
		t.Fatal(c.Err())
	}
	r.data(2, Stdout, []byte{1})
	expectProtocolError(t, c, "flow control")
}

func TestCreditReturned(t *testing.T) {
	c, r := hostRaw(t, Config{Window: 4096})
	r.mustSend(FrameOpen, 2, nil)
	st, err := c.Accept(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	r.data(2, Stderr, make([]byte, 4096))
	buf := make([]byte, 2047)
	io.ReadFull(st.Reader(Stderr), buf) // not yet half the window
	io.ReadFull(st.Reader(Stderr), buf[:1])
	// The first Window frame carries exactly half the window: none was
	// sent before.
	f := r.expect(FrameWindow, 2)
	if f.p[0] != byte(Stderr) || binary.BigEndian.Uint32(f.p[1:]) != 2048 {
		t.Fatalf("Window %v, want channel 2 increment 2048", f)
	}
	r.data(2, Stderr, make([]byte, 2048)) // exactly the returned credit
	r.sync()
	if c.Err() != nil {
		t.Fatal(c.Err())
	}
}

func TestWindowOverflow(t *testing.T) {
	c, r := hostRaw(t, Config{})
	r.mustSend(FrameOpen, 2, nil)
	r.mustSend(FrameWindow, 2, []byte{0, 0x7f, 0xff, 0xff, 0xff})
	expectProtocolError(t, c, "Window overflow")
}

func TestEOFPerChannel(t *testing.T) {
	forEachTransport(t, func(t *testing.T, tr transport) {
		host, guest := connPair(t, tr, Config{}, Config{})
		h, g := openAccept(t, host, guest, "eof")
		g.Write(Stdout, []byte("out"))
		g.CloseWrite(Stdout)
		if err := g.CloseWrite(Stdout); err != nil {
			t.Fatalf("second CloseWrite: %v", err)
		}
		if _, err := g.Write(Stdout, []byte("x")); !errors.Is(err, ErrStreamClosed) {
			t.Fatalf("Write after CloseWrite: %v", err)
		}
		g.Write(Stderr, []byte("err"))

		if b, err := io.ReadAll(h.Reader(Stdout)); err != nil || string(b) != "out" {
			t.Fatalf("stdout %q %v", b, err)
		}
		if n, err := h.Read(Stdout, make([]byte, 1)); n != 0 || err != io.EOF {
			t.Fatalf("Read after EOF: %d %v", n, err)
		}
		buf := make([]byte, 10)
		if n, err := h.Read(Stderr, buf); err != nil || string(buf[:n]) != "err" {
			t.Fatalf("stderr %q %v", buf[:n], err)
		}
		// stdin is independent: the host can still send.
		h.Write(Stdin, []byte("in"))
		if n, err := g.Read(Stdin, buf); err != nil || string(buf[:n]) != "in" {
			t.Fatalf("stdin %q %v", buf[:n], err)
		}
		// Close implies EOF on every channel.
		g.Close()
		for _, ch := range []Channel{Stderr, Aux} {
			if b, err := io.ReadAll(h.Reader(ch)); err != nil || len(b) != 0 {
				t.Fatalf("channel %d after Close: %q %v", ch, b, err)
			}
		}
	})
}

func TestMsgOrdering(t *testing.T) {
	forEachTransport(t, func(t *testing.T, tr transport) {
		host, guest := connPair(t, tr, Config{}, Config{})
		h, g := openAccept(t, host, guest, "msgs")
		ctx := testCtx(t)
		go func() {
			for round := range 20 {
				// A full queue's worth at a time: the receiver acks each batch.
				for i := range MaxMsgQueue {
					g.SendMsg([]byte(fmt.Sprintf("msg %d", round*MaxMsgQueue+i)))
				}
				if _, err := g.RecvMsg(ctx); err != nil {
					return
				}
			}
			g.SendMsg(nil) // empty messages are messages too
			g.Close()
		}()
		for round := range 20 {
			for i := range MaxMsgQueue {
				m, err := h.RecvMsg(ctx)
				if want := fmt.Sprintf("msg %d", round*MaxMsgQueue+i); err != nil || string(m) != want {
					t.Fatalf("got %q %v, want %q", m, err, want)
				}
			}
			h.SendMsg([]byte("ack"))
		}
		if m, err := h.RecvMsg(ctx); err != nil || len(m) != 0 {
			t.Fatalf("empty message: %q %v", m, err)
		}
		if _, err := h.RecvMsg(ctx); err != io.EOF {
			t.Fatalf("after Close: %v", err)
		}
	})
}

func TestMsgQueueOverflow(t *testing.T) {
	for _, tc := range []struct {
		name string
		n    int
		size int
	}{
		{"count", MaxMsgQueue + 1, 10},
		{"bytes", MaxMsgQueueBytes/MaxPayload + 1, MaxPayload},
	} {
		t.Run(tc.name, func(t *testing.T) {
			host, guest := connPair(t, transports[0], Config{}, Config{})
			h, g := openAccept(t, host, guest, "flood")
			for range tc.n {
				g.SendMsg(make([]byte, tc.size))
			}
			waitClosed(t, g.Done(), "reset of the flooding stream")
			if _, err := g.RecvMsg(testCtx(t)); !errors.Is(err, ErrReset) || !strings.Contains(err.Error(), "message queue overflow") {
				t.Fatalf("flooder: %v", err)
			}
			if _, err := h.RecvMsg(testCtx(t)); !errors.Is(err, ErrReset) {
				t.Fatalf("receiver: %v", err)
			}
			if _, err := host.Ping(testCtx(t)); err != nil {
				t.Fatalf("conn died: %v", err)
			}
		})
	}
}

// blockedOps starts a Read, a RecvMsg and a credit-starved Write on s and
// waits until all three are blocked. Their results arrive on the channel.
func blockedOps(t *testing.T, s *Stream) <-chan error {
	errs := make(chan error, 3)
	go func() { _, err := s.Read(Stdout, make([]byte, 10)); errs <- err }()
	go func() { _, err := s.RecvMsg(context.Background()); errs <- err }()
	go func() { _, err := s.Write(Stdin, make([]byte, 2*DefaultWindow)); errs <- err }()
	waitUntil(t, s.c, "all three calls block", func() bool {
		return s.recv[Stdout].ev.ch != nil && s.msgEv.ch != nil && s.send[Stdin].ev.ch != nil
	})
	return errs
}

func TestResetUnblocks(t *testing.T) {
	forEachTransport(t, func(t *testing.T, tr transport) {
		host, guest := connPair(t, tr, Config{}, Config{})

		t.Run("remote", func(t *testing.T) {
			h, g := openAccept(t, host, guest, "r")
			errs := blockedOps(t, h)
			g.Reset("boom")
			for range 3 {
				err := recvErr(t, errs, "unblock")
				if !errors.Is(err, ErrReset) || !strings.Contains(err.Error(), "boom") {
					t.Fatalf("got %v, want reset with reason", err)
				}
			}
			waitClosed(t, h.Done(), "stream done")
			if _, err := h.Write(Stdout, []byte("x")); !errors.Is(err, ErrReset) {
				t.Fatalf("Write after reset: %v", err)
			}
		})
		t.Run("local", func(t *testing.T) {
			h, g := openAccept(t, host, guest, "l")
			errs := blockedOps(t, h)
			h.Reset(strings.Repeat("é", 1000)) // truncated at a rune boundary
			for range 3 {
				if err := recvErr(t, errs, "unblock"); !errors.Is(err, ErrReset) {
					t.Fatalf("got %v, want ErrReset", err)
				}
			}
			waitClosed(t, g.Done(), "peer stream done")
			_, err := g.RecvMsg(testCtx(t))
			if !errors.Is(err, ErrReset) || !strings.Contains(err.Error(), strings.Repeat("é", MaxResetReason/2)) {
				t.Fatalf("peer: %v", err)
			}
		})
		if host.Err() != nil || guest.Err() != nil {
			t.Fatal(host.Err(), guest.Err())
		}
	})
}

// TestResetInFlight: data the peer sent before it saw our Reset is
// tolerated, within the credit it had.
func TestResetInFlight(t *testing.T) {
	forEachTransport(t, func(t *testing.T, tr transport) {
		host, guest := connPair(t, tr, Config{}, Config{})
		for i := range 20 {
			h, g := openAccept(t, host, guest, "x")
			done := make(chan struct{})
			go func() {
				defer close(done)
				for _, ch := range []Channel{Stdout, Stderr} {
					if _, err := g.Write(ch, make([]byte, DefaultWindow)); err != nil {
						return
					}
				}
				for range 10 {
					g.SendMsg([]byte("m"))
				}
				g.Close()
			}()
			if i%2 == 0 {
				h.Read(Stdout, make([]byte, 1))
			}
			h.Reset("enough")
			waitClosed(t, done, "writer")
		}
		for _, c := range []*Conn{host, guest} {
			if _, err := c.Ping(testCtx(t)); err != nil {
				t.Fatal(err)
			}
		}
	})
	t.Run("raw", func(t *testing.T) {
		c, r := hostRaw(t, Config{Window: 4096})
		r.mustSend(FrameOpen, 2, nil)
		st, _ := c.Accept(testCtx(t))
		r.data(2, Stdin, make([]byte, 1000))
		st.Reset("bye")
		r.expect(FrameReset, 2)
		r.data(2, Stdin, make([]byte, 3096))
		r.data(2, Aux, make([]byte, 4096))
		r.mustSend(FrameMsg, 2, []byte("late"))
		r.mustSend(FrameWindow, 2, []byte{0, 0, 0, 1, 0})
		r.mustSend(FrameEOF, 2, []byte{1})
		r.mustSend(FrameClose, 2, nil)
		r.sync()
		if c.Err() != nil {
			t.Fatal(c.Err())
		}
		r.data(2, Stdin, []byte{1}) // beyond the credit it had
		expectProtocolError(t, c, "reset stream")
	})
}

func TestCloseSemantics(t *testing.T) {
	forEachTransport(t, func(t *testing.T, tr transport) {
		host, guest := connPair(t, tr, Config{}, Config{})
		ctx := testCtx(t)

		h, g := openAccept(t, host, guest, "c")
		g.Write(Stdout, []byte("last words"))
		g.SendMsg([]byte("exit 0"))
		g.Close()
		if err := g.Close(); err != nil {
			t.Fatalf("second Close: %v", err)
		}
		if b, err := io.ReadAll(h.Reader(Stdout)); err != nil || string(b) != "last words" {
			t.Fatalf("read %q %v", b, err)
		}
		if m, err := h.RecvMsg(ctx); err != nil || string(m) != "exit 0" {
			t.Fatalf("msg %q %v", m, err)
		}
		if _, err := h.RecvMsg(ctx); err != io.EOF {
			t.Fatalf("RecvMsg after Close: %v", err)
		}
		if _, err := h.Write(Stdin, []byte("x")); !errors.Is(err, ErrStreamClosed) {
			t.Fatalf("Write to a closed peer: %v", err)
		}
		if err := h.SendMsg([]byte("x")); !errors.Is(err, ErrStreamClosed) {
			t.Fatalf("SendMsg to a closed peer: %v", err)
		}
		select {
		case <-g.Done():
			t.Fatal("stream done before both sides closed")
		default:
		}
		if _, err := g.Read(Stdin, make([]byte, 1)); !errors.Is(err, ErrStreamClosed) {
			t.Fatalf("Read after own Close: %v", err)
		}
		h.Close()
		waitClosed(t, h.Done(), "host stream done")
		waitClosed(t, g.Done(), "guest stream done")
		if numStreams(host) != 0 || numStreams(guest) != 0 {
			t.Fatal("streams not freed")
		}

		// A writer blocked on credit returns when the peer closes.
		h, g = openAccept(t, host, guest, "c2")
		errs := make(chan error, 1)
		go func() { _, err := h.Write(Stdin, make([]byte, 3*DefaultWindow)); errs <- err }()
		waitUntil(t, host, "writer blocks", func() bool { return h.send[Stdin].ev.ch != nil })
		g.Close()
		if err := recvErr(t, errs, "write"); !errors.Is(err, ErrStreamClosed) {
			t.Fatalf("blocked Write: %v", err)
		}
		h.Close()
		waitClosed(t, g.Done(), "guest stream done")
		if host.Err() != nil || guest.Err() != nil {
			t.Fatal(host.Err(), guest.Err())
		}
	})
}

func TestRefusals(t *testing.T) {
	reason := func(f rawFrame) string { return string(f.p) }

	t.Run("parity", func(t *testing.T) {
		c, r := hostRaw(t, Config{})
		r.mustSend(FrameOpen, 3, nil)
		if f := r.expect(FrameReset, 3); !strings.Contains(reason(f), "parity") {
			t.Fatal(f)
		}
		r.data(3, Stdin, []byte("in flight")) // tolerated
		r.sync()
		if c.Err() != nil {
			t.Fatal(c.Err())
		}
	})
	t.Run("reuse", func(t *testing.T) {
		c, r := hostRaw(t, Config{})
		r.mustSend(FrameOpen, 4, nil)
		r.mustSend(FrameOpen, 2, nil) // lower than the last: refused
		if f := r.expect(FrameReset, 2); !strings.Contains(reason(f), "reused") {
			t.Fatal(f)
		}
		st, _ := c.Accept(testCtx(t))
		r.mustSend(FrameOpen, 4, nil) // again, while live: both dropped
		if f := r.expect(FrameReset, 4); !strings.Contains(reason(f), "twice") {
			t.Fatal(f)
		}
		waitClosed(t, st.Done(), "stream reset")
		r.sync()
		if c.Err() != nil || numStreams(c) != 0 {
			t.Fatal(c.Err(), numStreams(c))
		}
	})
	t.Run("max streams", func(t *testing.T) {
		c, r := hostRaw(t, Config{MaxStreams: 3})
		if _, err := c.Open(testCtx(t), nil); err != nil { // counts too
			t.Fatal(err)
		}
		r.mustSend(FrameOpen, 2, nil)
		r.mustSend(FrameOpen, 4, nil)
		r.mustSend(FrameOpen, 6, nil)
		if f := r.expect(FrameReset, 6); !strings.Contains(reason(f), "too many") {
			t.Fatal(f)
		}
		if _, err := c.Open(testCtx(t), nil); !errors.Is(err, ErrTooManyStreams) {
			t.Fatalf("local Open beyond MaxStreams: %v", err)
		}
		r.sync()
		if c.Err() != nil || numStreams(c) != 3 {
			t.Fatal(c.Err(), numStreams(c))
		}
	})
	t.Run("accept queue", func(t *testing.T) {
		c, r := hostRaw(t, Config{})
		for i := range MaxAcceptQueue + 1 {
			r.mustSend(FrameOpen, uint32(2+2*i), nil)
		}
		last := uint32(2 + 2*MaxAcceptQueue)
		if f := r.expect(FrameReset, last); !strings.Contains(reason(f), "accept queue") {
			t.Fatal(f)
		}
		for range MaxAcceptQueue {
			if _, err := c.Accept(testCtx(t)); err != nil {
				t.Fatal(err)
			}
		}
		r.mustSend(FrameOpen, last+2, nil)
		if st, err := c.Accept(testCtx(t)); err != nil || st.ID() != last+2 {
			t.Fatal(err)
		}
	})
}

func TestBadFrames(t *testing.T) {
	for _, tc := range []struct {
		name string
		open bool // open stream 2 first
		h    Header
		p    []byte
		want string
	}{
		{"unknown type", false, NewHeader(11, 0, 0, 0), nil, "unknown frame type"},
		{"reserved", false, Header{byte(FramePing), 0, 0, 1}, nil, "reserved"},
		{"too large", false, NewHeader(FrameData, 0, 2, MaxPayload+1), nil, "exceeds"},
		{"hello again", false, NewHeader(FrameHello, 0, 0, 2), []byte("{}"), "Hello"},
		{"ping on stream", false, NewHeader(FramePing, 0, 2, 0), nil, "Ping on stream 2"},
		{"big ping", false, NewHeader(FramePing, 0, 0, 65), make([]byte, 65), "Ping payload"},
		{"data on stream 0", false, NewHeader(FrameData, 0, 0, 1), []byte{0}, "stream 0"},
		{"unknown stream", false, NewHeader(FrameData, 0, 2, 1), []byte{0}, "unknown stream"},
		{"unknown local stream", false, NewHeader(FrameWindow, 0, 1, 5), []byte{0, 0, 0, 0, 1}, "unknown stream"},
		{"bad channel", true, NewHeader(FrameData, 0, 2, 2), []byte{4, 0}, "bad channel"},
		{"empty data", true, NewHeader(FrameData, 0, 2, 0), nil, "without channel"},
		{"long EOF", true, NewHeader(FrameEOF, 0, 2, 2), []byte{0, 0}, "EOF payload"},
		{"zero window", true, NewHeader(FrameWindow, 0, 2, 5), []byte{1, 0, 0, 0, 0}, "zero Window"},
		{"close payload", true, NewHeader(FrameClose, 0, 2, 1), []byte{0}, "Close payload"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, r := hostRaw(t, Config{})
			if tc.open {
				r.mustSend(FrameOpen, 2, nil)
			}
			r.wmu.Lock()
			r.nc.Write(tc.h[:])
			r.nc.Write(tc.p)
			r.wmu.Unlock()
			expectProtocolError(t, c, tc.want)
		})
	}

	t.Run("after close", func(t *testing.T) {
		for _, tc := range []struct {
			t FrameType
			p []byte
		}{{FrameData, []byte{0, 1}}, {FrameEOF, []byte{0}}, {FrameWindow, []byte{0, 0, 0, 0, 1}}, {FrameMsg, nil}, {FrameClose, nil}} {
			c, r := hostRaw(t, Config{})
			r.mustSend(FrameOpen, 2, nil)
			r.mustSend(FrameClose, 2, nil)
			r.mustSend(tc.t, 2, tc.p)
			expectProtocolError(t, c, "Close")
		}
	})
	t.Run("data after EOF", func(t *testing.T) {
		c, r := hostRaw(t, Config{})
		r.mustSend(FrameOpen, 2, nil)
		r.mustSend(FrameEOF, 2, []byte{1})
		r.data(2, Stdout, []byte("x"))
		expectProtocolError(t, c, "after EOF")
	})
	t.Run("finished stream", func(t *testing.T) {
		c, r := hostRaw(t, Config{})
		r.mustSend(FrameOpen, 2, nil)
		st, _ := c.Accept(testCtx(t))
		st.Close()
		r.expect(FrameClose, 2)
		r.mustSend(FrameClose, 2, nil)
		waitClosed(t, st.Done(), "stream done")
		r.mustSend(FrameReset, 2, []byte("late reset is fine"))
		r.sync()
		if c.Err() != nil {
			t.Fatal(c.Err())
		}
		r.data(2, Stdout, []byte("x"))
		expectProtocolError(t, c, "finished stream")
	})
	t.Run("unsolicited pong", func(t *testing.T) {
		c, r := hostRaw(t, Config{})
		r.mustSend(FramePong, 0, []byte("whatever"))
		r.mustSend(FrameOpen, 2, []byte("flags are ignored"))
		r.sync()
		if c.Err() != nil {
			t.Fatal(c.Err())
		}
	})
}

// claimReader returns a header claiming a huge payload, then zeros forever.
type claimReader struct {
	hdr  []byte
	read int64
}

func (r *claimReader) Read(p []byte) (int, error) {
	n := copy(p, r.hdr)
	r.hdr = r.hdr[n:]
	clear(p[n:])
	r.read += int64(len(p))
	return len(p), nil
}

func TestOversizeNotAllocated(t *testing.T) {
	h := NewHeader(FrameData, 0, 1, 0xFFFFFFFF) // claims 4 GiB
	buf := make([]byte, HeaderSize)
	allocs := testing.AllocsPerRun(100, func() {
		r := &claimReader{hdr: h[:]}
		_, _, err := ReadFrame(r, buf)
		if !errors.Is(err, ErrTooLarge) || !errors.Is(err, ErrProtocol) {
			t.Fatalf("err = %v", err)
		}
		if r.read != HeaderSize {
			t.Fatalf("read %d bytes, want only the header", r.read)
		}
	})
	if allocs > 10 { // the error value, not the payload
		t.Fatalf("%v allocations", allocs)
	}

	// The same through a Conn: the connection ends, nothing is allocated.
	c, r := hostRaw(t, Config{})
	r.wmu.Lock()
	r.nc.Write(h[:])
	r.wmu.Unlock()
	expectProtocolError(t, c, "exceeds")
	if !errors.Is(c.Err(), ErrTooLarge) {
		t.Fatal(c.Err())
	}
}

func TestTeardownUnblocks(t *testing.T) {
	for _, how := range []string{"local close", "peer hangs up"} {
		t.Run(how, func(t *testing.T) {
			c, r := hostRaw(t, Config{})
			ctx := testCtx(t)
			r.mustSend(FrameOpen, 2, nil)
			st, err := c.Accept(ctx)
			if err != nil {
				t.Fatal(err)
			}
			local, err := c.Open(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			r.data(2, Stdout, []byte("buffered"))
			r.sync()
			errs := make(chan error, 8)
			go func() { _, err := c.Accept(ctx); errs <- err }()
			go func() { _, err := c.Ping(ctx); errs <- err }() // the raw peer never answers
			go func() { _, err := st.Read(Stderr, make([]byte, 1)); errs <- err }()
			go func() { _, err := st.RecvMsg(ctx); errs <- err }()
			go func() { _, err := st.Write(Stdin, make([]byte, 2*DefaultWindow)); errs <- err }()
			go func() { _, err := local.Read(Stdout, make([]byte, 1)); errs <- err }()
			waitUntil(t, c, "all calls block", func() bool {
				return c.acceptEv.ch != nil && len(c.pings) == 1 && st.recv[Stderr].ev.ch != nil &&
					st.msgEv.ch != nil && st.send[Stdin].ev.ch != nil && local.recv[Stdout].ev.ch != nil
			})
			if how == "local close" {
				c.Close()
			} else {
				r.nc.Close()
			}
			for range 6 {
				if err := recvErr(t, errs, "unblock"); !errors.Is(err, ErrClosed) {
					t.Fatalf("got %v, want ErrClosed", err)
				}
			}
			waitClosed(t, c.Done(), "conn done")
			waitClosed(t, st.Done(), "stream done")
			waitClosed(t, local.Done(), "stream done")
			if !errors.Is(c.Err(), ErrClosed) {
				t.Fatal(c.Err())
			}
			// Data received before the end can still be read.
			buf := make([]byte, 100)
			if n, err := st.Read(Stdout, buf); err != nil || string(buf[:n]) != "buffered" {
				t.Fatalf("buffered data: %q %v", buf[:n], err)
			}
			if _, err := st.Read(Stdout, buf); !errors.Is(err, ErrClosed) {
				t.Fatalf("then: %v", err)
			}
			if _, err := c.Open(ctx, nil); !errors.Is(err, ErrClosed) {
				t.Fatalf("Open: %v", err)
			}
			if err := st.Close(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestPing(t *testing.T) {
	forEachTransport(t, func(t *testing.T, tr transport) {
		host, guest := connPair(t, tr, Config{}, Config{})
		var wg sync.WaitGroup
		for _, c := range []*Conn{host, guest, host, guest} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for range 50 {
					if rtt, err := c.Ping(testCtx(t)); err != nil || rtt <= 0 {
						t.Error(rtt, err)
						return
					}
				}
			}()
		}
		wg.Wait()
	})
	t.Run("cancel", func(t *testing.T) {
		c, r := hostRaw(t, Config{})
		ctx, cancel := context.WithCancel(context.Background())
		errs := make(chan error, 1)
		go func() { _, err := c.Ping(ctx); errs <- err }()
		f := r.expect(FramePing, 0)
		cancel()
		if err := recvErr(t, errs, "ping"); err != context.Canceled {
			t.Fatal(err)
		}
		r.mustSend(FramePong, 0, f.p) // late: ignored
		r.sync()
		if c.Err() != nil {
			t.Fatal(c.Err())
		}
	})
}

func TestHandshake(t *testing.T) {
	t.Run("hello", func(t *testing.T) {
		host, guest := connPair(t, transports[0], Config{Info: map[string]string{"k": "v"}}, Config{Window: 8192})
		if host.peerWindow != 8192 || guest.peerWindow != DefaultWindow {
			t.Fatal(host.peerWindow, guest.peerWindow)
		}
		// Different windows in each direction work.
		h, g := openAccept(t, host, guest, "w")
		data := randBytes(3, 100000)
		go func() { h.Write(Stdin, data); h.CloseWrite(Stdin) }()
		go func() { g.Write(Stdout, data); g.CloseWrite(Stdout) }()
		for _, r := range []io.Reader{g.Reader(Stdin), h.Reader(Stdout)} {
			if b, err := io.ReadAll(r); err != nil || !bytes.Equal(b, data) {
				t.Fatal(len(b), err)
			}
		}
	})
	for _, tc := range []struct {
		name  string
		first []byte
		want  string
	}{
		{"version", helloFrame(Hello{Version: 2, Role: "guest"}), "version"},
		{"same role", helloFrame(Hello{Version: 1, Role: "host"}), "our role"},
		{"bad role", helloFrame(Hello{Version: 1, Role: "x"}), "unknown role"},
		{"bad window", helloFrame(Hello{Version: 1, Role: "guest", Window: 10}), "window"},
		{"not hello", append(NewHeader(FramePing, 0, 0, 0).bytes(), []byte{}...), "expected Hello"},
		{"bad json", append(NewHeader(FrameHello, 0, 0, 1).bytes(), '{'), "bad Hello"},
		{"garbage", []byte("GET / HTTP/1.1\r\n\r\n"), "unknown frame type"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b := net.Pipe()
			defer b.Close()
			go io.Copy(io.Discard, b)
			go b.Write(tc.first)
			c := NewConn(a, Config{Initiator: true})
			_, err := c.Handshake(testCtx(t))
			if !errors.Is(err, ErrProtocol) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want protocol error about %q", err, tc.want)
			}
			waitClosed(t, c.Done(), "conn closed")
		})
	}
	t.Run("timeout", func(t *testing.T) {
		a, b := net.Pipe()
		defer b.Close()
		go io.Copy(io.Discard, b) // reads our Hello, never answers
		c := NewConn(a, Config{Initiator: true})
		ctx, cancel := context.WithCancel(context.Background())
		errs := make(chan error, 1)
		go func() { _, err := c.Handshake(ctx); errs <- err }()
		cancel()
		if err := recvErr(t, errs, "handshake"); !errors.Is(err, context.Canceled) {
			t.Fatal(err)
		}
		waitClosed(t, c.Done(), "conn closed")
	})
	t.Run("peer hangs up", func(t *testing.T) {
		a, b := net.Pipe()
		b.Close()
		_, _, err := Dial(testCtx(t), a, Config{Initiator: true})
		if !errors.Is(err, ErrClosed) {
			t.Fatal(err)
		}
	})
	t.Run("config", func(t *testing.T) {
		for _, cfg := range []Config{{Initiator: true, Role: "guest"}, {Window: 1}, {MaxStreams: -1}} {
			a, b := net.Pipe()
			b.Close()
			c := NewConn(a, cfg)
			if _, err := c.Handshake(testCtx(t)); err == nil {
				t.Fatalf("%+v accepted", cfg)
			}
		}
	})
	t.Run("not ready", func(t *testing.T) {
		a, b := net.Pipe()
		defer b.Close()
		c := NewConn(a, Config{})
		defer c.Close()
		if _, err := c.Open(testCtx(t), nil); err != errNotReady {
			t.Fatal(err)
		}
		if _, err := c.Accept(testCtx(t)); err != errNotReady {
			t.Fatal(err)
		}
	})
}

func (h Header) bytes() []byte { return h[:] }

func helloFrame(h Hello) []byte {
	var buf bytes.Buffer
	p, _ := json.Marshal(h)
	WriteFrame(&buf, NewHeader(FrameHello, 0, 0, uint32(len(p))), p)
	return buf.Bytes()
}

// TestPeerNotReading: a peer that floods us while never reading ends with a
// protocol error; the frames we owe it do not pile up without bound.
func TestPeerNotReading(t *testing.T) {
	a, b := net.Pipe()
	defer b.Close()
	c := NewConn(a, Config{Initiator: true, MaxStreams: 1})
	defer c.Close()
	errs := make(chan error, 1)
	go func() { _, err := c.Handshake(testCtx(t)); errs <- err }()
	p, _ := json.Marshal(guestHello())
	WriteFrame(b, NewHeader(FrameHello, 0, 0, uint32(len(p))), p)
	if _, _, err := ReadFrame(b, nil); err != nil {
		t.Fatal(err)
	}
	if err := recvErr(t, errs, "handshake"); err != nil {
		t.Fatal(err)
	}
	// The first Pong blocks in the transport; the rest queue up to the bound.
	for i := 0; ; i++ {
		if err := WriteFrame(b, NewHeader(FramePing, 0, 0, 0), nil); err != nil {
			break
		}
		if i > 2*c.ctlCap {
			t.Fatalf("%d pings queued", i)
		}
	}
	expectProtocolError(t, c, "not reading")
}

// TestPingDrains: a Pong proves the peer processed our earlier frames,
// including the queued Close.
func TestPingDrains(t *testing.T) {
	forEachTransport(t, func(t *testing.T, tr transport) {
		host, guest := connPair(t, tr, Config{}, Config{})
		for range 20 {
			h, g := openAccept(t, host, guest, "d")
			h.Write(Stdout, []byte("x"))
			h.Close()
			if _, err := host.Ping(testCtx(t)); err != nil {
				t.Fatal(err)
			}
			guest.mu.Lock()
			closed := g.remoteClosed
			guest.mu.Unlock()
			if !closed {
				t.Fatal("Pong overtook the Close")
			}
			g.Close()
		}
	})
}

// failingWriter makes writes fail on demand.
type failingWriter struct {
	net.Conn
	mu   sync.Mutex
	fail bool
}

func (f *failingWriter) Write(p []byte) (int, error) {
	f.mu.Lock()
	fail := f.fail
	f.mu.Unlock()
	if fail {
		return 0, errors.New("disk on fire")
	}
	return f.Conn.Write(p)
}

func TestWriteError(t *testing.T) {
	a, b := net.Pipe()
	fw := &failingWriter{Conn: a}
	host, guest := connPair(t, transport{"failing", func(testing.TB) (net.Conn, net.Conn) { return fw, b }}, Config{}, Config{})
	h, _ := openAccept(t, host, guest, "w")
	fw.mu.Lock()
	fw.fail = true
	fw.mu.Unlock()
	if _, err := h.Write(Stdin, []byte("x")); !errors.Is(err, ErrClosed) {
		t.Fatal(err)
	}
	waitClosed(t, host.Done(), "conn end")
	if err := host.Err(); !errors.Is(err, ErrClosed) || !strings.Contains(err.Error(), "disk on fire") {
		t.Fatal(err)
	}
	waitClosed(t, guest.Done(), "peer sees the hang-up")
}
