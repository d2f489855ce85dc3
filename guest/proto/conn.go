package proto

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"strings"
	"sync"
	"time"
	"unicode/utf8"
)

// Protocol parameters.
const (
	// Version is the protocol version sent in Hello. Peers must speak the
	// same version.
	Version = 1

	// DefaultWindow is the default Config.Window.
	DefaultWindow = 256 << 10
	// MinWindow and MaxWindow bound Config.Window and the window a peer
	// advertises in its Hello.
	MinWindow = 1 << 10
	MaxWindow = 1 << 30

	// DefaultMaxStreams is the default Config.MaxStreams.
	DefaultMaxStreams = 1024
	// MaxAcceptQueue bounds the streams opened by the peer and not yet
	// returned by Accept. Opens beyond it are refused with a Reset.
	MaxAcceptQueue = 64
	// MaxMsgQueue and MaxMsgQueueBytes bound the messages received on a
	// stream and not yet returned by RecvMsg. A peer that overflows them
	// gets the stream reset.
	MaxMsgQueue      = 64
	MaxMsgQueueBytes = 256 << 10

	// maxMaxStreams bounds Config.MaxStreams.
	maxMaxStreams = 1 << 16
	// creditFactor: the credit a peer grants us on one (stream, channel)
	// may not exceed creditFactor × the window it advertised. An honest
	// peer never grants more than its window.
	creditFactor = 16
	// maxLateFrames bounds the non-Data frames tolerated for a stream after
	// we reset it (Data is bounded exactly by the credit it had).
	maxLateFrames = 256
)

// Config configures a Conn. The zero value of a field means its default.
type Config struct {
	// Initiator is true on the host. The initiator opens odd stream IDs,
	// the other side even ones.
	Initiator bool
	// Window is our receive window per (stream, channel): the credit the
	// peer has at open, and the most we ever buffer. It is advertised in
	// Hello. Default DefaultWindow; must be in [MinWindow, MaxWindow].
	Window uint32
	// MaxStreams bounds the streams open at once, counting both
	// directions. Default DefaultMaxStreams.
	MaxStreams int
	// Role is sent in Hello: "host" or "guest". Default: "host" if
	// Initiator, else "guest". It must agree with Initiator, and the two
	// peers must have different roles.
	Role string
	// Info is sent in Hello (optional).
	Info map[string]string
	// AwaitHello makes Handshake wait for the peer's Hello before sending
	// ours (responder mode). A guest whose connection was handed over
	// waits like this for the next host: that host's Hello, not ours,
	// starts the new connection, so a guest restored from a snapshot
	// answers whichever host connects to it.
	AwaitHello bool
}

func (cfg Config) normalize() (Config, error) {
	var err error
	if cfg.Window == 0 {
		cfg.Window = DefaultWindow
	}
	if cfg.Window < MinWindow || cfg.Window > MaxWindow {
		err = fmt.Errorf("proto: Config.Window %d not in [%d, %d]", cfg.Window, MinWindow, MaxWindow)
		cfg.Window = DefaultWindow
	}
	if cfg.MaxStreams == 0 {
		cfg.MaxStreams = DefaultMaxStreams
	}
	if cfg.MaxStreams < 0 || cfg.MaxStreams > maxMaxStreams {
		err = fmt.Errorf("proto: Config.MaxStreams %d not in [1, %d]", cfg.MaxStreams, maxMaxStreams)
		cfg.MaxStreams = DefaultMaxStreams
	}
	want := "guest"
	if cfg.Initiator {
		want = "host"
	}
	if cfg.Role == "" {
		cfg.Role = want
	}
	if cfg.Role != want {
		err = fmt.Errorf("proto: Config.Role %q does not match Initiator=%v", cfg.Role, cfg.Initiator)
	}
	return cfg, err
}

// Hello is the payload of the Hello frame, JSON-encoded.
type Hello struct {
	Version int    `json:"version"`
	Role    string `json:"role"`
	// Window is the sender's receive window (Config.Window): the initial
	// credit of every (stream, channel) in the other direction. 0 means
	// DefaultWindow.
	Window uint32            `json:"window,omitempty"`
	Info   map[string]string `json:"info,omitempty"`
}

// Conn is one end of a connection. Create it with NewConn, then call
// Handshake (or use Dial, which does both). All methods are safe for
// concurrent use.
//
// Locking: mu guards the connection state and the state of every Stream;
// it is only held for short, non-blocking sections. wmu serialises writes to
// rw. Lock order: wmu before mu; nothing blocks while holding mu. The read
// loop never takes wmu, so it never waits for the peer to read: the frames
// it must send (Pong, Reset) go through ctlq, written by the control writer
// goroutine.
type Conn struct {
	rw  io.ReadWriteCloser
	cfg Config // normalised; immutable
	// cfgErr is reported by Handshake.
	cfgErr error
	// testHook, if set (by tests, before Handshake), is called with mu
	// held after each frame is handled.
	testHook func(*Conn)

	// Owned by the goroutine that reads (Handshake, then readLoop).
	br   *bufio.Reader
	rbuf []byte

	wmu  sync.Mutex
	wbuf []byte // guarded by wmu; HeaderSize+MaxPayload capacity

	closeOnce sync.Once     // closes rw
	done      chan struct{} // closed (under mu) when the conn ends
	ctlWake   chan struct{} // capacity 1: ctlq is not empty

	mu sync.Mutex
	// Guarded by mu:
	state      connState
	err        error // why the conn ended; nil while alive
	peerWindow uint32
	streams    map[uint32]*Stream // live streams, both directions
	nextID     uint64             // next local stream ID
	lastRemote uint32             // highest stream ID the peer opened
	acceptQ    []*Stream          // opened by the peer, not yet accepted
	acceptEv   event
	tombs      map[uint32]*tombstone // streams we reset; see tombstone
	tombRing   []uint32              // FIFO of tombs keys, for eviction
	tombHead   int
	tombLen    int
	ctlq       []ctlFrame // frames for the control writer
	ctlCap     int
	pingSeq    uint64
	pings      map[uint64]chan struct{}
}

type connState uint8

const (
	stateNew connState = iota
	stateHandshake
	stateReady
)

// tombstone remembers a stream we reset (or refused) so that the frames the
// peer sent before it saw our Reset are ignored rather than treated as a
// protocol error. Data is accepted only up to the credit the peer still had,
// other frames up to maxLateFrames. Tombstones are evicted FIFO, so their
// number is bounded.
type tombstone struct {
	credit [NumChannels]uint64
	frames int
}

// ctlFrame is a frame queued for the control writer. Window frames take
// their increment from the stream at write time (and are dropped if the
// stream is gone or locally closed by then).
type ctlFrame struct {
	typ     FrameType
	id      uint32
	ch      Channel
	payload []byte
}

// NewConn returns a connection over rw; it does no I/O. Call Handshake
// before anything else. The Conn owns rw and closes it when it ends.
func NewConn(rw io.ReadWriteCloser, cfg Config) *Conn {
	cfg, err := cfg.normalize()
	c := &Conn{
		rw:       rw,
		cfg:      cfg,
		cfgErr:   err,
		br:       bufio.NewReaderSize(rw, MaxPayload),
		rbuf:     make([]byte, MaxPayload),
		wbuf:     make([]byte, 0, HeaderSize+MaxPayload),
		done:     make(chan struct{}),
		ctlWake:  make(chan struct{}, 1),
		streams:  make(map[uint32]*Stream),
		tombs:    make(map[uint32]*tombstone),
		tombRing: make([]uint32, 2*cfg.MaxStreams+MaxAcceptQueue),
		ctlCap:   8*cfg.MaxStreams + 256,
		pings:    make(map[uint64]chan struct{}),
	}
	c.nextID = 2
	if cfg.Initiator {
		c.nextID = 1
	}
	return c
}

// Dial is NewConn followed by Handshake. On error the connection is closed.
func Dial(ctx context.Context, rw io.ReadWriteCloser, cfg Config) (*Conn, Hello, error) {
	c := NewConn(rw, cfg)
	peer, err := c.Handshake(ctx)
	if err != nil {
		c.Close()
		return nil, Hello{}, err
	}
	return c, peer, nil
}

// Handshake sends our Hello, waits for the peer's and checks it. It must be
// called exactly once, before Open, Accept and Ping; it then starts the
// connection's goroutines. If ctx ends first, or on any error, the
// connection is closed.
func (c *Conn) Handshake(ctx context.Context) (Hello, error) {
	if c.cfgErr != nil {
		c.fail(c.cfgErr)
		return Hello{}, c.cfgErr
	}
	c.mu.Lock()
	if c.err != nil {
		err := c.connErrLocked()
		c.mu.Unlock()
		return Hello{}, err
	}
	if c.state != stateNew {
		c.mu.Unlock()
		return Hello{}, errors.New("proto: Handshake called twice")
	}
	c.state = stateHandshake
	c.mu.Unlock()

	ours, err := json.Marshal(Hello{Version: Version, Role: c.cfg.Role, Window: c.cfg.Window, Info: c.cfg.Info})
	if err == nil && len(ours) > MaxPayload {
		err = fmt.Errorf("%w: Hello of %d bytes", ErrTooLarge, len(ours))
	}
	if err != nil {
		err = fmt.Errorf("proto: handshake: %w", err)
		c.fail(err)
		return Hello{}, err
	}

	// Write and read concurrently: on a synchronous transport (net.Pipe)
	// both sides writing first would deadlock. With AwaitHello we write
	// once the peer's Hello has arrived.
	werr := make(chan error, 1)
	sendHello := func() { go func() { werr <- c.writeFrame(nil, FrameHello, 0, -1, ours) }() }
	if !c.cfg.AwaitHello {
		sendHello()
	}
	type helloResult struct {
		h   Hello
		err error
	}
	rres := make(chan helloResult, 1)
	go func() {
		h, err := c.readHello()
		rres <- helloResult{h, err}
	}()

	var peer Hello
	for pending := 2; pending > 0; pending-- {
		select {
		case err = <-werr:
		case r := <-rres:
			peer, err = r.h, r.err
			if err == nil && c.cfg.AwaitHello {
				if err = c.checkHello(peer); err == nil {
					sendHello()
				}
			}
		case <-ctx.Done():
			err = fmt.Errorf("proto: handshake: %w", ctx.Err())
		case <-c.done:
			err = c.Err()
		}
		if err != nil {
			c.fail(err)
			return Hello{}, c.Err()
		}
	}
	if err := c.checkHello(peer); err != nil {
		c.fail(err)
		return Hello{}, err
	}

	c.mu.Lock()
	if c.err != nil {
		err := c.connErrLocked()
		c.mu.Unlock()
		return Hello{}, err
	}
	c.peerWindow = peer.Window
	if c.peerWindow == 0 {
		c.peerWindow = DefaultWindow
	}
	c.state = stateReady
	c.mu.Unlock()
	go c.readLoop()
	go c.ctlWriter()
	return peer, nil
}

func (c *Conn) readHello() (Hello, error) {
	var h Hello
	hdr, p, err := ReadFrame(c.br, c.rbuf)
	if err != nil {
		return h, c.readError(err)
	}
	if hdr.Type() != FrameHello || hdr.Stream() != 0 {
		return h, protoErrorf("expected Hello on stream 0, got %v", hdr)
	}
	if err := json.Unmarshal(p, &h); err != nil {
		return h, protoErrorf("bad Hello: %v", err)
	}
	return h, nil
}

func (c *Conn) checkHello(h Hello) error {
	if h.Version != Version {
		return protoErrorf("peer speaks version %d, we speak %d", h.Version, Version)
	}
	if h.Role != "host" && h.Role != "guest" {
		return protoErrorf("peer has unknown role %q", h.Role)
	}
	if h.Role == c.cfg.Role {
		return protoErrorf("peer has our role %q", h.Role)
	}
	if h.Window != 0 && (h.Window < MinWindow || h.Window > MaxWindow) {
		return protoErrorf("peer window %d not in [%d, %d]", h.Window, MinWindow, MaxWindow)
	}
	return nil
}

// readError maps an error from reading rw to the reason the conn ended.
func (c *Conn) readError(err error) error {
	switch {
	case errors.Is(err, ErrProtocol):
		return err
	case err == io.EOF:
		return fmt.Errorf("%w: peer hung up", ErrClosed)
	case err == io.ErrUnexpectedEOF:
		return fmt.Errorf("%w: peer hung up inside a frame", ErrClosed)
	}
	return fmt.Errorf("%w: read: %w", ErrClosed, err)
}

// Done is closed when the connection has ended.
func (c *Conn) Done() <-chan struct{} { return c.done }

// NumStreams returns the number of live streams, opened by either side
// and not yet finished: a connection with none is idle.
func (c *Conn) NumStreams() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.streams)
}

// Err returns why the connection ended, or nil while it is alive. After
// Close it is ErrClosed; after a protocol violation it matches ErrProtocol.
func (c *Conn) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Close ends the connection: it closes the underlying ReadWriteCloser and
// makes every pending and future operation fail with an error matching
// ErrClosed (data already received can still be read). Frames not yet
// written are dropped; use Ping first to drain.
func (c *Conn) Close() error {
	c.fail(ErrClosed)
	return nil
}

// fail ends the connection with cause err (the first cause wins).
func (c *Conn) fail(err error) {
	c.mu.Lock()
	c.failLocked(err)
	c.mu.Unlock()
	c.closeRW()
}

// failLocked marks the connection as ended and wakes every waiter. The
// caller must call closeRW after unlocking mu if it returns true.
func (c *Conn) failLocked(err error) bool {
	if c.err != nil {
		return false
	}
	c.err = err
	close(c.done)
	for _, s := range c.streams {
		s.finishLocked()
	}
	c.acceptEv.signal()
	c.ctlq = nil
	return true
}

func (c *Conn) closeRW() { c.closeOnce.Do(func() { c.rw.Close() }) }

// connErrLocked is the error for operations on a dead connection.
func (c *Conn) connErrLocked() error {
	if c.err == ErrClosed {
		return ErrClosed
	}
	return &closedError{c.err}
}

// readyLocked returns an error unless the conn is usable.
func (c *Conn) readyLocked() error {
	if c.err != nil {
		return c.connErrLocked()
	}
	if c.state != stateReady {
		return errNotReady
	}
	return nil
}

func (c *Conn) isLocal(id uint32) bool { return (id&1 == 1) == c.cfg.Initiator }

// Open opens a stream whose Open frame carries header (≤ MaxPayload bytes).
// It does not wait for the peer: a peer that refuses the stream resets it.
// ctx is only checked before sending.
func (c *Conn) Open(ctx context.Context, header []byte) (*Stream, error) {
	if len(header) > MaxPayload {
		return nil, fmt.Errorf("%w: stream header of %d bytes", ErrTooLarge, len(header))
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	// IDs are allocated under wmu so that Open frames go out in ID order
	// (the peer requires increasing IDs).
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.mu.Lock()
	if err := c.readyLocked(); err != nil {
		c.mu.Unlock()
		return nil, err
	}
	if len(c.streams) >= c.cfg.MaxStreams {
		c.mu.Unlock()
		return nil, fmt.Errorf("%w (%d)", ErrTooManyStreams, c.cfg.MaxStreams)
	}
	if c.nextID > math.MaxUint32 {
		c.mu.Unlock()
		return nil, errors.New("proto: stream IDs exhausted")
	}
	id := uint32(c.nextID)
	c.nextID += 2
	delete(c.tombs, id) // only a peer that used our parity can have left one
	s := c.newStreamLocked(id, append([]byte(nil), header...))
	// Registered before the Open frame is written: the peer may answer at once.
	c.streams[id] = s
	c.mu.Unlock()

	buf := appendHeader(c.wbuf[:0], FrameOpen, id, len(s.header))
	buf = append(buf, s.header...)
	if _, err := c.rw.Write(buf); err != nil {
		err = c.writeFailed(err)
		c.mu.Lock()
		c.freeLocked(s)
		c.mu.Unlock()
		return nil, err
	}
	return s, nil
}

// Accept returns the next stream opened by the peer. Streams the peer
// reset before they were accepted are skipped. After the connection ended,
// streams already queued are still returned (their received data can be
// read), then an error matching ErrClosed.
func (c *Conn) Accept(ctx context.Context) (*Stream, error) {
	c.mu.Lock()
	for {
		for len(c.acceptQ) > 0 {
			s := c.acceptQ[0]
			c.acceptQ[0] = nil
			c.acceptQ = c.acceptQ[1:]
			if s.resetErr == nil { // skip streams the peer already reset
				c.mu.Unlock()
				return s, nil
			}
		}
		if err := c.readyLocked(); err != nil {
			c.mu.Unlock()
			return nil, err
		}
		w := c.acceptEv.wait()
		c.mu.Unlock()
		select {
		case <-w:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		c.mu.Lock()
	}
}

// Ping sends a Ping and waits for the Pong. Besides the round-trip time, a
// returned Ping proves that the peer's read loop has processed every frame
// we sent before it, including the Close and Reset frames of earlier
// Stream.Close and Stream.Reset calls (the Ping is queued behind them): call
// Ping before Close to drain.
func (c *Conn) Ping(ctx context.Context) (time.Duration, error) {
	c.mu.Lock()
	if err := c.readyLocked(); err != nil {
		c.mu.Unlock()
		return 0, err
	}
	seq := c.pingSeq
	c.pingSeq++
	pong := make(chan struct{})
	p := binary.BigEndian.AppendUint64(make([]byte, 0, 8), seq)
	start := time.Now()
	if err := c.enqueueLocked(ctlFrame{typ: FramePing, payload: p}); err != nil {
		fatal := c.failLocked(err)
		conErr := c.connErrLocked()
		c.mu.Unlock()
		if fatal {
			c.closeRW()
		}
		return 0, conErr
	}
	c.pings[seq] = pong
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.pings, seq)
		c.mu.Unlock()
	}()

	select {
	case <-pong:
		return time.Since(start), nil
	case <-ctx.Done():
		return 0, ctx.Err()
	case <-c.done:
		select {
		case <-pong:
			return time.Since(start), nil
		default:
		}
		c.mu.Lock()
		defer c.mu.Unlock()
		return 0, c.connErrLocked()
	}
}

// writeFrame writes one frame under wmu. check, called with mu held just
// before writing, may veto the frame (errSkip: write nothing, return nil)
// and may update state that must change atomically with the write. ch >= 0
// prefixes the payload with the channel byte.
func (c *Conn) writeFrame(check func() error, t FrameType, id uint32, ch int, payload []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.mu.Lock()
	err := c.err
	if err != nil {
		err = c.connErrLocked()
	} else if check != nil {
		err = check()
	}
	c.mu.Unlock()
	if err == errSkip {
		return nil
	}
	if err != nil {
		return err
	}
	n := len(payload)
	if ch >= 0 {
		n++
	}
	buf := appendHeader(c.wbuf[:0], t, id, n)
	if ch >= 0 {
		buf = append(buf, byte(ch))
	}
	buf = append(buf, payload...)
	if _, err := c.rw.Write(buf); err != nil {
		return c.writeFailed(err)
	}
	return nil
}

var errSkip = errors.New("skip")

func (c *Conn) writeFailed(err error) error {
	c.fail(fmt.Errorf("%w: write: %w", ErrClosed, err))
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.connErrLocked()
}

// enqueueLocked queues a frame for the control writer. The queue is
// bounded; only a peer that floods us while not reading can fill it, and
// that is a protocol error.
func (c *Conn) enqueueLocked(f ctlFrame) error {
	if c.err != nil {
		return nil
	}
	if len(c.ctlq) >= c.ctlCap {
		return protoErrorf("peer is not reading (%d control frames pending)", len(c.ctlq))
	}
	c.ctlq = append(c.ctlq, f)
	select {
	case c.ctlWake <- struct{}{}:
	default:
	}
	return nil
}

// ctlWriter writes the frames queued by enqueueLocked, batching them.
func (c *Conn) ctlWriter() {
	var batch []ctlFrame
	for {
		select {
		case <-c.ctlWake:
		case <-c.done:
			return
		}
		c.mu.Lock()
		batch, c.ctlq = c.ctlq, batch[:0]
		c.mu.Unlock()
		if err := c.writeCtl(batch); err != nil {
			return
		}
		clear(batch)
	}
}

func (c *Conn) writeCtl(batch []ctlFrame) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	for i := 0; i < len(batch); {
		c.mu.Lock()
		if c.err != nil {
			c.mu.Unlock()
			return c.err
		}
		buf := c.wbuf[:0]
		for ; i < len(batch); i++ {
			f := &batch[i]
			if len(buf) > 0 && len(buf)+HeaderSize+5+len(f.payload) > cap(buf) {
				break
			}
			if f.typ != FrameWindow {
				buf = appendHeader(buf, f.typ, f.id, len(f.payload))
				buf = append(buf, f.payload...)
				continue
			}
			s := c.streams[f.id]
			if s == nil {
				continue
			}
			r := &s.recv[f.ch]
			r.grantQueued = false
			inc := r.grant
			r.grant = 0
			if inc == 0 || s.localClosed || s.resetErr != nil {
				continue // never send anything after our Close or Reset
			}
			buf = appendHeader(buf, FrameWindow, f.id, 5)
			buf = append(buf, byte(f.ch))
			buf = binary.BigEndian.AppendUint32(buf, inc)
		}
		c.mu.Unlock()
		if len(buf) > 0 {
			if _, err := c.rw.Write(buf); err != nil {
				return c.writeFailed(err)
			}
		}
	}
	return nil
}

// readLoop reads and dispatches frames until the connection ends. It never
// blocks on anything but reading rw and (briefly) mu, so one slow stream
// cannot stall the others.
func (c *Conn) readLoop() {
	for {
		h, p, err := ReadFrame(c.br, c.rbuf)
		if err != nil {
			c.fail(c.readError(err))
			return
		}
		if err := c.handle(h, p); err != nil {
			c.fail(err)
			return
		}
	}
}

// handle dispatches one frame. p is only valid during the call. A non-nil
// error ends the connection.
func (c *Conn) handle(h Header, p []byte) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return c.err
	}
	err := c.handleLocked(h, p)
	if c.testHook != nil {
		c.testHook(c)
	}
	return err
}

func (c *Conn) handleLocked(h Header, p []byte) error {
	t, id := h.Type(), h.Stream()
	switch t {
	case FrameHello:
		return protoErrorf("Hello after handshake")
	case FramePing, FramePong:
		if id != 0 {
			return protoErrorf("%v on stream %d", t, id)
		}
		if len(p) > MaxPingPayload {
			return protoErrorf("%v payload of %d bytes", t, len(p))
		}
		if t == FramePing {
			return c.enqueueLocked(ctlFrame{typ: FramePong, payload: append([]byte(nil), p...)})
		}
		if len(p) == 8 {
			seq := binary.BigEndian.Uint64(p)
			if ch, ok := c.pings[seq]; ok {
				close(ch)
				delete(c.pings, seq)
			}
		}
		return nil // unsolicited Pongs are ignored
	}
	if id == 0 {
		return protoErrorf("%v on stream 0", t)
	}
	if t == FrameOpen {
		return c.handleOpenLocked(id, p)
	}

	// Shape checks, independent of the stream's state.
	var ch Channel
	var inc uint32
	switch t {
	case FrameData:
		if len(p) < 1 {
			return protoErrorf("Data without channel on stream %d", id)
		}
		ch = Channel(p[0])
	case FrameEOF:
		if len(p) != 1 {
			return protoErrorf("EOF payload of %d bytes on stream %d", len(p), id)
		}
		ch = Channel(p[0])
	case FrameWindow:
		if len(p) != 5 {
			return protoErrorf("Window payload of %d bytes on stream %d", len(p), id)
		}
		ch = Channel(p[0])
		inc = binary.BigEndian.Uint32(p[1:])
		if inc == 0 {
			return protoErrorf("zero Window increment on stream %d", id)
		}
	case FrameClose:
		if len(p) != 0 {
			return protoErrorf("Close payload of %d bytes on stream %d", len(p), id)
		}
	}
	if ch >= NumChannels {
		return protoErrorf("%v on stream %d: bad channel %d", t, id, ch)
	}

	s := c.streams[id]
	if s == nil {
		return c.handleDeadLocked(t, id, ch, p)
	}
	switch t {
	case FrameReset:
		c.resetLocked(s, resetReason(p), true)
		return nil
	case FrameClose:
		if s.remoteClosed {
			return protoErrorf("duplicate Close on stream %d", id)
		}
		s.remoteClosed = true
		if s.localClosed {
			c.freeLocked(s)
		} else {
			s.signalAllLocked()
		}
		return nil
	}
	if s.remoteClosed {
		return protoErrorf("%v on stream %d after its Close", t, id)
	}
	switch t {
	case FrameData:
		r := &s.recv[ch]
		if r.eof {
			return protoErrorf("Data on stream %d channel %d after EOF", id, ch)
		}
		n := uint32(len(p) - 1)
		if n > r.credit {
			return protoErrorf("flow control: %d bytes on stream %d channel %d with %d credit", n, id, ch, r.credit)
		}
		r.credit -= n
		if n > 0 && !s.localClosed { // after our Close, data is discarded
			r.buf.write(p[1:], int(c.cfg.Window))
			r.ev.signal()
		}
	case FrameEOF:
		r := &s.recv[ch]
		if r.eof {
			return protoErrorf("duplicate EOF on stream %d channel %d", id, ch)
		}
		r.eof = true
		r.ev.signal()
	case FrameWindow:
		sd := &s.send[ch]
		sd.credit += uint64(inc)
		if sd.credit > creditFactor*uint64(c.peerWindow) {
			return protoErrorf("Window overflow on stream %d channel %d: credit %d", id, ch, sd.credit)
		}
		sd.ev.signal()
	case FrameMsg:
		if s.localClosed {
			return nil
		}
		if len(s.msgs) >= MaxMsgQueue || s.msgBytes+len(p) > MaxMsgQueueBytes {
			return c.resetLocked(s, "message queue overflow", false)
		}
		s.msgs = append(s.msgs, append([]byte(nil), p...))
		s.msgBytes += len(p)
		s.msgEv.signal()
	}
	return nil
}

// handleOpenLocked handles an Open frame. Refusals are answered with a
// Reset; only a full control queue ends the connection.
func (c *Conn) handleOpenLocked(id uint32, header []byte) error {
	if c.isLocal(id) {
		if s := c.streams[id]; s != nil {
			// Both sides would now disagree about s: drop it too.
			return c.resetLocked(s, "peer opened a stream with our ID", false, c.fullCredit())
		}
		return c.refuseLocked(id, "stream ID has the wrong parity")
	}
	if id <= c.lastRemote {
		if s := c.streams[id]; s != nil {
			return c.resetLocked(s, "stream opened twice", false, c.fullCredit())
		}
		return c.refuseLocked(id, "stream ID reused")
	}
	c.lastRemote = id
	if len(c.streams) >= c.cfg.MaxStreams {
		return c.refuseLocked(id, "too many streams")
	}
	if len(c.acceptQ) >= MaxAcceptQueue {
		return c.refuseLocked(id, "accept queue full")
	}
	s := c.newStreamLocked(id, append([]byte(nil), header...))
	c.streams[id] = s
	c.acceptQ = append(c.acceptQ, s)
	c.acceptEv.signal()
	return nil
}

// refuseLocked answers an Open with a Reset. The peer may already be
// sending on the stream with a full window.
func (c *Conn) refuseLocked(id uint32, reason string) error {
	c.tombstoneLocked(id, c.fullCredit())
	return c.enqueueLocked(ctlFrame{typ: FrameReset, id: id, payload: []byte(reason)})
}

// handleDeadLocked handles a frame for a stream that is not live.
func (c *Conn) handleDeadLocked(t FrameType, id uint32, ch Channel, p []byte) error {
	if tb := c.tombs[id]; tb != nil {
		switch t {
		case FrameData:
			n := uint64(len(p) - 1)
			if n > tb.credit[ch] {
				return protoErrorf("flow control: %d bytes on reset stream %d channel %d with %d credit", n, id, ch, tb.credit[ch])
			}
			tb.credit[ch] -= n
		case FrameClose, FrameReset:
		default:
			tb.frames++
			if tb.frames > maxLateFrames {
				return protoErrorf("too many frames on reset stream %d", id)
			}
		}
		return nil
	}
	opened := id <= c.lastRemote
	if c.isLocal(id) {
		opened = uint64(id) < c.nextID
	}
	if !opened {
		return protoErrorf("%v on unknown stream %d", t, id)
	}
	if t == FrameClose || t == FrameReset {
		return nil // harmless races with our own Close or Reset
	}
	return protoErrorf("%v on finished stream %d", t, id)
}

// tombstoneLocked records that the peer may still send up to credit[ch]
// more bytes on each channel of stream id (added to any existing tombstone).
func (c *Conn) tombstoneLocked(id uint32, credit [NumChannels]uint64) {
	tb := c.tombs[id]
	if tb == nil {
		if c.tombLen == len(c.tombRing) {
			delete(c.tombs, c.tombRing[c.tombHead])
			c.tombHead = (c.tombHead + 1) % len(c.tombRing)
			c.tombLen--
		}
		c.tombRing[(c.tombHead+c.tombLen)%len(c.tombRing)] = id
		c.tombLen++
		tb = &tombstone{}
		c.tombs[id] = tb
	}
	for i := range tb.credit {
		tb.credit[i] += credit[i]
	}
}

// fullCredit is the credit of a freshly opened stream in each channel.
func (c *Conn) fullCredit() (cr [NumChannels]uint64) {
	for i := range cr {
		cr[i] = uint64(c.cfg.Window)
	}
	return cr
}

// resetLocked aborts stream s, either because the peer reset it (remote) or
// locally, sending a Reset with reason. A local reset leaves a tombstone with
// the credit the peer still had, plus extra (for a stream the peer opened
// again). The stream is freed at once.
func (c *Conn) resetLocked(s *Stream, reason string, remote bool, extra ...[NumChannels]uint64) error {
	if s.resetErr != nil || s.freed {
		return nil
	}
	var err error
	if remote {
		s.resetErr = fmt.Errorf("proto: stream %d: %w by peer: %s", s.id, ErrReset, reason)
	} else {
		s.resetErr = fmt.Errorf("proto: stream %d: %w: %s", s.id, ErrReset, reason)
		if c.err == nil {
			var credit [NumChannels]uint64
			if !s.remoteClosed { // else the peer sends nothing more
				for i := range credit {
					credit[i] = uint64(s.recv[i].credit)
				}
			}
			for _, e := range extra {
				for i := range credit {
					credit[i] += e[i]
				}
			}
			if credit != [NumChannels]uint64{} {
				c.tombstoneLocked(s.id, credit)
			}
			err = c.enqueueLocked(ctlFrame{typ: FrameReset, id: s.id, payload: []byte(reason)})
		}
	}
	c.freeLocked(s)
	return err
}

// freeLocked releases s: no more frames are accepted for it and Done is
// closed.
func (c *Conn) freeLocked(s *Stream) {
	if s.freed {
		return
	}
	s.freed = true
	if c.streams[s.id] == s {
		delete(c.streams, s.id)
	}
	if s.resetErr != nil || s.localClosed {
		s.dropLocked()
	}
	s.finishLocked()
}

// resetReason extracts a printable reason from a Reset payload.
func resetReason(p []byte) string {
	if len(p) > MaxResetReason {
		p = p[:MaxResetReason]
	}
	if len(p) == 0 {
		return "no reason given"
	}
	return strings.ToValidUTF8(string(p), "\uFFFD")
}

// truncateReason bounds a local reason to MaxResetReason bytes, cutting at
// a rune boundary.
func truncateReason(s string) string {
	if len(s) <= MaxResetReason {
		return s
	}
	cut := MaxResetReason
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut]
}
