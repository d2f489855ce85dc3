package proto

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"sync"
	"testing"
	"time"
)

// frame encodes one frame for seeds.
func frame(t FrameType, id uint32, payload ...byte) []byte {
	return append(NewHeader(t, 0, id, uint32(len(payload))).bytes(), payload...)
}

func frames(fs ...[]byte) []byte { return bytes.Join(fs, nil) }

func FuzzReadFrame(f *testing.F) {
	f.Add(frame(FrameHello, 0, []byte(`{"version":1,"role":"guest"}`)...))
	f.Add(frame(FrameData, 7, 1, 'h', 'i'))
	f.Add(frame(FrameWindow, 2, 0, 0, 0, 1, 0))
	f.Add(frame(FrameClose, 3))
	f.Add(NewHeader(FrameData, 0, 1, 0xFFFFFFFF).bytes())
	f.Add(NewHeader(FrameData, 0, 1, MaxPayload).bytes())
	f.Add([]byte{byte(FramePing), 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0})
	f.Add([]byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})
	f.Add([]byte{byte(FramePong), 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 'x'})
	f.Add([]byte{1, 2, 3})
	buf := make([]byte, MaxPayload)
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bytes.NewReader(data)
		h, p, err := ReadFrame(r, buf)
		consumed := len(data) - r.Len()
		if err != nil {
			switch {
			case err == io.EOF:
				if len(data) != 0 {
					t.Fatalf("EOF with %d bytes of input", len(data))
				}
			case err == io.ErrUnexpectedEOF:
			case errors.Is(err, ErrProtocol):
				if consumed != HeaderSize {
					t.Fatalf("invalid header: consumed %d bytes", consumed)
				}
				if h.Validate() == nil {
					t.Fatalf("ReadFrame rejected a valid header %v: %v", h, err)
				}
				if h.Type().Known() && h.Reserved() == 0 && !errors.Is(err, ErrTooLarge) {
					t.Fatalf("oversize length: %v", err)
				}
			default:
				t.Fatalf("unexpected error %v", err)
			}
			return
		}
		if consumed != HeaderSize+len(p) || int(h.Length()) != len(p) || h.Validate() != nil {
			t.Fatalf("inconsistent frame %v, %d payload bytes, consumed %d", h, len(p), consumed)
		}
		if NewHeader(h.Type(), h.Flags(), h.Stream(), h.Length()) != h {
			t.Fatalf("header %x does not re-encode", h)
		}
		var out bytes.Buffer
		if err := WriteFrame(&out, h, p); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(out.Bytes(), data[:consumed]) {
			t.Fatalf("round trip: wrote %x, read %x", out.Bytes(), data[:consumed])
		}
		h2, p2, err := ReadFrame(&out, nil)
		if err != nil || h2 != h || !bytes.Equal(p2, p) {
			t.Fatalf("re-read: %v %v %v", h2, p2, err)
		}
	})
}

// fuzzRW feeds its input to the Conn, then blocks reads until closed;
// consumed is closed when the Conn asks for more after the input (so it
// has processed every frame). Writes are discarded.
type fuzzRW struct {
	r        *bytes.Reader
	consumed chan struct{}
	once     sync.Once
	closed   chan struct{}
	cOnce    sync.Once
}

func (f *fuzzRW) Read(p []byte) (int, error) {
	if f.r.Len() > 0 {
		return f.r.Read(p)
	}
	f.once.Do(func() { close(f.consumed) })
	<-f.closed
	return 0, io.ErrClosedPipe
}

func (f *fuzzRW) Write(p []byte) (int, error) {
	select {
	case <-f.closed:
		return 0, io.ErrClosedPipe
	default:
		return len(p), nil
	}
}

func (f *fuzzRW) Close() error {
	f.cOnce.Do(func() { close(f.closed) })
	return nil
}

const (
	fuzzWindow     = 4 << 10
	fuzzMaxStreams = 8
)

// checkBounds verifies the memory bounds and flow-control invariants; it
// runs under c.mu after every frame, in the read loop (so it reports with
// Errorf, not Fatalf).
func checkBounds(t *testing.T) func(c *Conn) {
	return func(c *Conn) {
		if len(c.streams) > c.cfg.MaxStreams {
			t.Errorf("%d streams > MaxStreams", len(c.streams))
		}
		if len(c.acceptQ) > MaxAcceptQueue || len(c.ctlq) > c.ctlCap || len(c.tombs) > len(c.tombRing) {
			t.Errorf("queue bound exceeded: accept %d, ctl %d, tombs %d", len(c.acceptQ), len(c.ctlq), len(c.tombs))
		}
		total := 0
		for _, s := range c.streams {
			if len(s.msgs) > MaxMsgQueue || s.msgBytes > MaxMsgQueueBytes || len(s.header) > MaxPayload {
				t.Errorf("stream %d: %d msgs, %d bytes", s.id, len(s.msgs), s.msgBytes)
			}
			total += s.msgBytes + len(s.header)
			for ch := range s.recv {
				r := &s.recv[ch]
				if len(r.buf.buf) > int(c.cfg.Window) {
					t.Errorf("stream %d channel %d: buffer of %d bytes", s.id, ch, len(r.buf.buf))
				}
				total += len(r.buf.buf)
				if !s.localClosed && uint64(r.credit)+uint64(r.buf.Len())+uint64(r.unacked) != uint64(c.cfg.Window) {
					t.Errorf("stream %d channel %d: credit %d + buffered %d + unacked %d != window",
						s.id, ch, r.credit, r.buf.Len(), r.unacked)
				}
			}
		}
		bound := c.cfg.MaxStreams * (NumChannels*int(c.cfg.Window) + MaxMsgQueueBytes + MaxPayload)
		if total > bound {
			t.Errorf("%d bytes buffered > bound %d", total, bound)
		}
	}
}

func FuzzConn(f *testing.F) {
	open := func(id uint32) []byte { return frame(FrameOpen, id, []byte(`{"kind":"exec"}`)...) }
	data := func(id uint32, ch byte, n int) []byte {
		return frame(FrameData, id, append([]byte{ch}, bytes.Repeat([]byte{'x'}, n)...)...)
	}
	win := func(id uint32, ch byte, inc uint32) []byte {
		return frame(FrameWindow, id, binary.BigEndian.AppendUint32([]byte{ch}, inc)...)
	}
	f.Add(frames(open(2), data(2, 1, 100), frame(FrameEOF, 2, 1), frame(FrameMsg, 2, '{', '}'), frame(FrameClose, 2)))
	f.Add(frames(open(2), data(2, 0, fuzzWindow), data(2, 0, 1)))
	f.Add(frames(open(2), win(2, 0, 1000), win(2, 0, 0xffffffff)))
	f.Add(frames(open(2), frame(FrameReset, 2, 'n', 'o'), data(2, 1, 5)))
	f.Add(frames(open(4), open(2), open(4), open(3), data(3, 0, 10), open(6)))
	f.Add(frames(frame(FramePing, 0, 1, 2, 3), frame(FramePong, 0, 0, 0, 0, 0, 0, 0, 0, 0)))
	f.Add(frames(open(2), open(4), open(6), open(8), open(10), open(12), open(14), open(16), open(18), open(20)))
	f.Add(frames(win(1, 1, 100), frame(FrameClose, 1), frame(FrameReset, 1)))
	f.Add(frames(open(2), bytes.Repeat(frame(FrameMsg, 2, 'm'), MaxMsgQueue+1), data(2, 2, 10)))
	f.Add(frames(open(2), frame(FrameClose, 2), frame(FrameReset, 2), data(2, 1, 1)))
	f.Add(NewHeader(FrameOpen, 0, 2, 0xFFFFFFFF).bytes())
	f.Fuzz(func(t *testing.T, in []byte) {
		rw := &fuzzRW{
			r:        bytes.NewReader(append(helloFrame(Hello{Version: Version, Role: "guest", Window: fuzzWindow}), in...)),
			consumed: make(chan struct{}),
			closed:   make(chan struct{}),
		}
		c := NewConn(rw, Config{Initiator: true, Window: fuzzWindow, MaxStreams: fuzzMaxStreams})
		c.testHook = checkBounds(t)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := c.Handshake(ctx); err != nil {
			t.Fatal(err)
		}
		// The application: a local stream, and every accepted stream, is
		// read, written and messaged until it ends.
		var wg sync.WaitGroup
		use := func(st *Stream) {
			for ch := range Channel(NumChannels) {
				wg.Add(2)
				go func() { defer wg.Done(); io.Copy(io.Discard, st.Reader(ch)) }()
				go func() { defer wg.Done(); st.Write(ch, make([]byte, 3*fuzzWindow)) }()
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					if _, err := st.RecvMsg(ctx); err != nil {
						break
					}
					st.SendMsg([]byte("reply"))
				}
				if st.ID()%4 == 0 {
					st.Reset("done")
				} else {
					st.Close()
				}
			}()
		}
		if st, err := c.Open(ctx, []byte("local")); err == nil {
			use(st)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				st, err := c.Accept(ctx)
				if err != nil {
					return
				}
				use(st)
			}
		}()

		select {
		case <-rw.consumed:
		case <-c.Done():
		case <-ctx.Done():
			t.Fatal("the Conn did not consume its input")
		}
		c.Close()
		finished := make(chan struct{})
		go func() { wg.Wait(); close(finished) }()
		select {
		case <-finished:
		case <-ctx.Done():
			t.Fatal("operations still blocked after Close")
		}
		if err := c.Err(); err == nil {
			t.Fatal("no error after Close")
		}
	})
}
