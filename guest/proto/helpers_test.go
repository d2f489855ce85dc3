package proto

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// failAfter bounds every wait in the tests. It is a failure guard, never a
// means of synchronisation.
const failAfter = 20 * time.Second

// transport makes a connected pair of byte streams.
type transport struct {
	name string
	pair func(t testing.TB) (net.Conn, net.Conn)
}

var transports = []transport{{"pipe", func(testing.TB) (net.Conn, net.Conn) { return net.Pipe() }}}

func forEachTransport(t *testing.T, f func(t *testing.T, tr transport)) {
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) { f(t, tr) })
	}
}

// connPair returns a host and a guest Conn over tr, after the handshake.
func connPair(t testing.TB, tr transport, hostCfg, guestCfg Config) (host, guest *Conn) {
	t.Helper()
	a, b := tr.pair(t)
	hostCfg.Initiator, guestCfg.Initiator = true, false
	host, guest = NewConn(a, hostCfg), NewConn(b, guestCfg)
	t.Cleanup(func() { host.Close(); guest.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), failAfter)
	defer cancel()
	errc := make(chan error, 2)
	go func() { _, err := host.Handshake(ctx); errc <- err }()
	go func() { _, err := guest.Handshake(ctx); errc <- err }()
	for range 2 {
		if err := <-errc; err != nil {
			t.Fatalf("handshake: %v", err)
		}
	}
	return host, guest
}

// openAccept opens a stream on a and accepts it on b.
func openAccept(t testing.TB, a, b *Conn, header string) (*Stream, *Stream) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), failAfter)
	defer cancel()
	sa, err := a.Open(ctx, []byte(header))
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	sb, err := b.Accept(ctx)
	if err != nil {
		t.Fatalf("Accept: %v", err)
	}
	if sb.ID() != sa.ID() || string(sb.Header()) != header {
		t.Fatalf("accepted stream %d %q, opened %d %q", sb.ID(), sb.Header(), sa.ID(), header)
	}
	return sa, sb
}

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), failAfter)
	t.Cleanup(cancel)
	return ctx
}

// waitClosed fails the test unless ch is closed within failAfter.
func waitClosed(t testing.TB, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(failAfter):
		t.Fatalf("timed out waiting for %s", what)
	}
}

// recvErr waits for a result on errc.
func recvErr(t testing.TB, errc <-chan error, what string) error {
	t.Helper()
	select {
	case err := <-errc:
		return err
	case <-time.After(failAfter):
		t.Fatalf("timed out waiting for %s", what)
		return nil
	}
}

// waitUntil polls cond (under the conn's lock) until it holds. It is used
// to wait for another goroutine to block inside this package, which no
// event reports.
func waitUntil(t testing.TB, c *Conn, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(failAfter)
	for {
		c.mu.Lock()
		ok := cond()
		c.mu.Unlock()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		runtime.Gosched()
	}
}

func numStreams(c *Conn) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.streams)
}

// randBytes returns n deterministic pseudo-random bytes.
func randBytes(seed uint64, n int) []byte {
	b := make([]byte, n)
	var s [32]byte
	s[0], s[1] = byte(seed), byte(seed>>8)
	rand.NewChaCha8(s).Read(b)
	return b
}

// rawPeer speaks the protocol by hand, frame by frame, to test how a Conn
// reacts to a misbehaving peer.
type rawPeer struct {
	t      testing.TB
	nc     net.Conn
	wmu    sync.Mutex
	frames chan rawFrame // frames the Conn sent, after its Hello
	hello  Hello         // the Conn's Hello
	pingN  uint64
}

type rawFrame struct {
	h Header
	p []byte
}

func (f rawFrame) String() string { return fmt.Sprintf("%v %q", f.h, f.p) }

// newRawPeer returns a Conn (with cfg) whose peer is a rawPeer that has sent
// hello. The handshake is done.
func newRawPeer(t testing.TB, cfg Config, hello Hello) (*Conn, *rawPeer) {
	t.Helper()
	a, b := net.Pipe()
	c := NewConn(a, cfg)
	t.Cleanup(func() { c.Close(); b.Close() })
	r := &rawPeer{t: t, nc: b, frames: make(chan rawFrame, 1<<14)}
	errc := make(chan error, 1)
	go func() { _, err := c.Handshake(testCtx(t)); errc <- err }()
	hb, _ := json.Marshal(hello)
	if err := r.send(FrameHello, 0, hb); err != nil {
		t.Fatalf("raw send Hello: %v", err)
	}
	h, p, err := ReadFrame(b, nil)
	if err != nil || h.Type() != FrameHello {
		t.Fatalf("raw read Hello: %v %v", h, err)
	}
	if err := json.Unmarshal(p, &r.hello); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(r.frames)
		for {
			h, p, err := ReadFrame(b, nil)
			if err != nil {
				return
			}
			r.frames <- rawFrame{h, p}
		}
	}()
	if err := recvErr(t, errc, "handshake"); err != nil {
		t.Fatalf("handshake: %v", err)
	}
	return c, r
}

func guestHello() Hello { return Hello{Version: Version, Role: "guest"} }

// hostRaw returns a host Conn and a raw guest.
func hostRaw(t testing.TB, cfg Config) (*Conn, *rawPeer) {
	cfg.Initiator = true
	return newRawPeer(t, cfg, guestHello())
}

func (r *rawPeer) send(t FrameType, id uint32, payload []byte) error {
	r.wmu.Lock()
	defer r.wmu.Unlock()
	return WriteFrame(r.nc, NewHeader(t, 0, id, uint32(len(payload))), payload)
}

func (r *rawPeer) mustSend(t FrameType, id uint32, payload []byte) {
	r.t.Helper()
	if err := r.send(t, id, payload); err != nil {
		r.t.Fatalf("raw send %v %d: %v", t, id, err)
	}
}

func (r *rawPeer) data(id uint32, ch Channel, b []byte) error {
	return r.send(FrameData, id, append([]byte{byte(ch)}, b...))
}

// expect returns the next frame of type t on stream id, skipping others.
func (r *rawPeer) expect(t FrameType, id uint32) rawFrame {
	r.t.Helper()
	timeout := time.After(failAfter)
	for {
		select {
		case f, ok := <-r.frames:
			if !ok {
				r.t.Fatalf("connection ended while waiting for %v on stream %d", t, id)
			}
			if f.h.Type() == t && f.h.Stream() == id {
				return f
			}
		case <-timeout:
			r.t.Fatalf("timed out waiting for %v on stream %d", t, id)
		}
	}
}

// sync pings the Conn: when it returns, the Conn has processed every frame
// sent before.
func (r *rawPeer) sync() {
	r.t.Helper()
	r.pingN++
	p := []byte(fmt.Sprintf("sync-%d", r.pingN))
	r.mustSend(FramePing, 0, p)
	for {
		f := r.expect(FramePong, 0)
		if string(f.p) == string(p) {
			return
		}
	}
}

// expectProtocolError waits for c to end with a protocol error containing want.
func expectProtocolError(t testing.TB, c *Conn, want string) {
	t.Helper()
	waitClosed(t, c.Done(), "protocol error")
	err := c.Err()
	if !errors.Is(err, ErrProtocol) {
		t.Fatalf("Err() = %v, want ErrProtocol", err)
	}
	if want != "" && !strings.Contains(err.Error(), want) {
		t.Fatalf("Err() = %q, want it to mention %q", err, want)
	}
}
