package proto

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"
	"time"
)

func TestLinkCloseInterruptsReadAndKeepsTransport(t *testing.T) {
	forEachTransport(t, func(t *testing.T, tr transport) {
		a, b := tr.pair(t)
		defer a.Close()
		defer b.Close()
		l := NewLink(a)
		got := make(chan error, 1)
		go func() {
			_, err := l.Read(make([]byte, 16))
			got <- err
		}()
		time.Sleep(10 * time.Millisecond) // let the read block
		l.Close()
		if err := recvErr(t, got, "interrupted read"); err == nil {
			t.Fatal("read returned no error after Close")
		}
		if _, err := l.Read(make([]byte, 1)); !errors.Is(err, ErrLinkClosed) {
			t.Fatalf("Read after Close: %v", err)
		}
		if _, err := l.Write([]byte("x")); !errors.Is(err, ErrLinkClosed) {
			t.Fatalf("Write after Close: %v", err)
		}
		// The transport is intact: the next Link reads what comes next.
		go b.Write([]byte("after"))
		l2 := NewLink(a)
		buf := make([]byte, 5)
		if _, err := io.ReadFull(l2, buf); err != nil || string(buf) != "after" {
			t.Fatalf("next link read %q, %v", buf, err)
		}
	})
}

func TestAwaitHelloWaitsForThePeer(t *testing.T) {
	a, b := socketPair(t)
	defer a.Close()
	defer b.Close()
	g := NewConn(b, Config{Initiator: false, AwaitHello: true})
	defer g.Close()
	errc := make(chan error, 1)
	go func() { _, err := g.Handshake(testCtx(t)); errc <- err }()
	// Nothing comes from a waiting responder.
	a.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	if n, err := a.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Fatalf("responder sent %d bytes before our Hello (%v)", n, err)
	}
	a.SetReadDeadline(time.Time{})
	hb, _ := json.Marshal(Hello{Version: Version, Role: "host"})
	if err := WriteFrame(a, NewHeader(FrameHello, 0, 0, uint32(len(hb))), hb); err != nil {
		t.Fatal(err)
	}
	h, p, err := ReadFrame(a, nil)
	if err != nil || h.Type() != FrameHello {
		t.Fatalf("responder's Hello: %v %v", h, err)
	}
	var peer Hello
	if json.Unmarshal(p, &peer) != nil || peer.Role != "guest" {
		t.Fatalf("responder's Hello: %s", p)
	}
	if err := recvErr(t, errc, "handshake"); err != nil {
		t.Fatal(err)
	}
}

func TestAwaitHelloRefusesABadHelloWithoutAnswering(t *testing.T) {
	a, b := socketPair(t)
	defer a.Close()
	g := NewConn(b, Config{Initiator: false, AwaitHello: true})
	errc := make(chan error, 1)
	go func() { _, err := g.Handshake(testCtx(t)); errc <- err }()
	hb, _ := json.Marshal(Hello{Version: Version, Role: "guest"}) // our own role
	WriteFrame(a, NewHeader(FrameHello, 0, 0, uint32(len(hb))), hb)
	if err := recvErr(t, errc, "handshake"); !errors.Is(err, ErrProtocol) {
		t.Fatalf("handshake with a same-role peer: %v", err)
	}
	if h, _, err := ReadFrame(a, nil); err == nil {
		t.Fatalf("responder answered a bad Hello with %v", h)
	}
}

func TestNumStreams(t *testing.T) {
	host, guest := connPair(t, transports[0], Config{}, Config{})
	sa, sb := openAccept(t, host, guest, "x")
	if host.NumStreams() != 1 || guest.NumStreams() != 1 {
		t.Fatalf("NumStreams %d %d, want 1 1", host.NumStreams(), guest.NumStreams())
	}
	sa.Close()
	sb.Close()
	waitClosed(t, sa.Done(), "stream end")
	if n := host.NumStreams(); n != 0 {
		t.Fatalf("NumStreams after close: %d", n)
	}
}

// TestHandoverOverLinks runs the handoff sequence the host and the guest
// agent use around a snapshot, many times over one transport, with traffic
// before and after each handover: no byte may be lost or duplicated.
func TestHandoverOverLinks(t *testing.T) {
	forEachTransport(t, func(t *testing.T, tr transport) {
		a, b := tr.pair(t)
		defer a.Close()
		defer b.Close()
		ctx := testCtx(t)

		// Guest: serves echo streams; a "handoff" stream ends the conn.
		guestErr := make(chan error, 1)
		go func() {
			link := NewLink(b)
			c := NewConn(link, Config{Initiator: false})
			if _, err := c.Handshake(ctx); err != nil {
				guestErr <- err
				return
			}
			for {
				st, err := c.Accept(ctx)
				if err != nil {
					guestErr <- err
					return
				}
				if string(st.Header()) != "handoff" {
					go func() {
						io.Copy(st.Writer(Stdout), st.Reader(Stdin))
						st.CloseWrite(Stdout)
						st.Close()
					}()
					continue
				}
				st.SendMsg([]byte("ready"))
				if _, err := st.RecvMsg(ctx); err != io.EOF {
					guestErr <- fmt.Errorf("handoff: want EOF, got %v", err)
					return
				}
				c.Close() // stops our reader: nothing more is read for this conn
				link = NewLink(b)
				if err := WriteFrame(link, NewHeader(FrameClose, 0, st.ID(), 0), nil); err != nil {
					guestErr <- err
					return
				}
				c = NewConn(link, Config{Initiator: false, AwaitHello: true})
				if _, err := c.Handshake(ctx); err != nil {
					guestErr <- err
					return
				}
			}
		}()

		host := NewConn(NewLink(a), Config{Initiator: true})
		if _, err := host.Handshake(ctx); err != nil {
			t.Fatal(err)
		}
		echo := func(c *Conn, i int) {
			t.Helper()
			st, err := c.Open(ctx, []byte("echo"))
			if err != nil {
				t.Fatal(err)
			}
			want := randBytes(uint64(i), 100<<10)
			go func() { st.Write(Stdin, want); st.CloseWrite(Stdin) }()
			got, err := io.ReadAll(st.Reader(Stdout))
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("round %d: echo got %d bytes (%v), want %d", i, len(got), err, len(want))
			}
			st.Close()
			waitClosed(t, st.Done(), "echo stream")
		}
		for i := 0; i < 30; i++ {
			echo(host, i)
			if n := host.NumStreams(); n != 0 {
				t.Fatalf("round %d: %d streams before handoff", i, n)
			}
			st, err := host.Open(ctx, []byte("handoff"))
			if err != nil {
				t.Fatal(err)
			}
			if m, err := st.RecvMsg(ctx); err != nil || string(m) != "ready" {
				t.Fatalf("round %d: handoff answer %q %v", i, m, err)
			}
			st.Close()
			waitClosed(t, st.Done(), "the guest's last frame")
			host.Close()
			host = NewConn(NewLink(a), Config{Initiator: true})
			if _, err := host.Handshake(ctx); err != nil {
				t.Fatalf("round %d: new handshake: %v", i, err)
			}
		}
		echo(host, 99)
		host.Close()
		select {
		case err := <-guestErr:
			if err != nil && !errors.Is(err, ErrClosed) && !errors.Is(err, context.Canceled) {
				var ne net.Error
				if !errors.As(err, &ne) {
					t.Fatalf("guest: %v", err)
				}
			}
		case <-time.After(100 * time.Millisecond):
		}
	})
}
