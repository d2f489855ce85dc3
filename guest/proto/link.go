package proto

import (
	"errors"
	"io"
	"sync"
	"time"
)

// Transport is a byte stream whose blocked reads and writes can be
// interrupted with deadlines: a net.Conn, or an *os.File for a pollable
// device such as a virtio-serial port.
type Transport interface {
	io.ReadWriteCloser
	SetReadDeadline(t time.Time) error
	SetWriteDeadline(t time.Time) error
}

// ErrLinkClosed is returned by a Link's Read and Write after Close.
var ErrLinkClosed = errors.New("proto: link closed")

// A Link is one Conn's use of a transport that outlives it. Successive
// Conns over one transport (a connection handed over, see KindHandoff in
// the guest's control protocol) each get their own Link: closing the Conn
// closes its Link, which interrupts the reads and writes in progress with
// deadlines and waits for them to return, but leaves the transport open.
// Bytes that arrive after Close are left in the transport for the next
// Link; a read that had already returned bytes keeps them, so a handover
// must happen at a point where the peer sends nothing (the handoff
// protocol guarantees it).
//
// A write interrupted by Close may have sent part of a frame; Close only
// interrupts writes that are blocked because the peer is not reading.
//
// Locking: mu guards closed and active; cond is signalled when active
// drops to 0.
type Link struct {
	t Transport

	mu     sync.Mutex
	cond   sync.Cond
	closed bool
	active int // Read and Write calls in progress
}

var _ io.ReadWriteCloser = (*Link)(nil)

// NewLink returns a Link over t.
func NewLink(t Transport) *Link {
	l := &Link{t: t}
	l.cond.L = &l.mu
	return l
}

func (l *Link) begin() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return false
	}
	l.active++
	return true
}

func (l *Link) end() {
	l.mu.Lock()
	l.active--
	if l.active == 0 {
		l.cond.Broadcast()
	}
	l.mu.Unlock()
}

// Read reads from the transport unless the Link is closed.
func (l *Link) Read(p []byte) (int, error) {
	if !l.begin() {
		return 0, ErrLinkClosed
	}
	defer l.end()
	return l.t.Read(p)
}

// Write writes to the transport unless the Link is closed.
func (l *Link) Write(p []byte) (int, error) {
	if !l.begin() {
		return 0, ErrLinkClosed
	}
	defer l.end()
	return l.t.Write(p)
}

// Close ends the Link: later Reads and Writes fail with ErrLinkClosed, and
// those in progress are interrupted; Close returns once they all have. The
// transport stays open (with its deadlines cleared), unless it does not
// support deadlines: then it is closed, since nothing else can stop a
// blocked read.
func (l *Link) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	busy := l.active > 0
	l.mu.Unlock()
	if !busy {
		return nil
	}
	past := time.Unix(1, 0)
	rerr := l.t.SetReadDeadline(past)
	werr := l.t.SetWriteDeadline(past)
	if rerr != nil || werr != nil {
		l.t.Close()
	}
	l.mu.Lock()
	for l.active > 0 {
		l.cond.Wait()
	}
	l.mu.Unlock()
	if rerr == nil && werr == nil {
		l.t.SetReadDeadline(time.Time{})
		l.t.SetWriteDeadline(time.Time{})
	}
	return nil
}
