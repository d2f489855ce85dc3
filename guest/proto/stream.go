package proto

import (
	"context"
	"fmt"
	"io"
	"sync"
)

// Channel is a byte channel of a stream. Each channel has its own flow
// control and EOF in each direction.
type Channel uint8

// Channels.
const (
	Stdin  Channel = 0
	Stdout Channel = 1
	Stderr Channel = 2
	Aux    Channel = 3
	// NumChannels is the number of channels of a stream.
	NumChannels = 4
)

func (ch Channel) valid() error {
	if ch >= NumChannels {
		return fmt.Errorf("proto: bad channel %d", ch)
	}
	return nil
}

// Stream is one multiplexed stream: four byte channels in each direction
// plus an ordered message queue. All methods are safe for concurrent use;
// concurrent Writes on the same channel are serialised (each Write's bytes
// stay contiguous).
//
// Lifecycle: Close says "I am done with the stream"; the stream is finished
// (Done closed, resources released) once both sides sent Close, or at once
// on Reset from either side or when the connection ends. A stream whose
// peer closed it stays open locally until Close or Reset is called.
//
// Locking: the fields after "Guarded by c.mu" are guarded by the
// connection's mu. wlock[ch] is held for the whole of a Write on ch
// (including its waits for credit); it is never taken with c.mu held.
type Stream struct {
	c      *Conn
	id     uint32
	header []byte
	done   chan struct{}
	wlock  [NumChannels]sync.Mutex

	// Guarded by c.mu:
	recv         [NumChannels]recvState
	send         [NumChannels]sendState
	msgs         [][]byte
	msgBytes     int
	msgEv        event
	localClosed  bool  // we called Close
	remoteClosed bool  // the peer sent Close
	resetErr     error // reset by either side
	freed        bool  // removed from the conn
	finished     bool  // done is closed
}

// recvState is one channel in the receive direction. Invariant (until the
// stream ends): credit + buf.Len() + unacked == Config.Window.
type recvState struct {
	buf         ring
	credit      uint32 // bytes the peer may still send
	unacked     uint32 // consumed by the application, not yet granted back
	grant       uint32 // granted back, not yet written in a Window frame
	grantQueued bool   // a Window ctlFrame is queued for this channel
	eof         bool   // the peer sent EOF
	ev          event  // data, EOF or stream state changed
}

// sendState is one channel in the send direction.
type sendState struct {
	credit  uint64 // bytes we may still send
	eofSent bool   // CloseWrite was called
	ev      event  // credit or stream state changed
}

func (c *Conn) newStreamLocked(id uint32, header []byte) *Stream {
	s := &Stream{c: c, id: id, header: header, done: make(chan struct{})}
	for i := range s.recv {
		s.recv[i].credit = c.cfg.Window
		s.send[i].credit = uint64(c.peerWindow)
	}
	return s
}

// ID returns the stream ID (odd if the initiator opened it).
func (s *Stream) ID() uint32 { return s.id }

// Header returns the bytes of the Open frame. Do not modify them.
func (s *Stream) Header() []byte { return s.header }

// Done is closed when the stream is finished: both sides sent Close, either
// side reset it, or the connection ended.
func (s *Stream) Done() <-chan struct{} { return s.done }

func (s *Stream) signalAllLocked() {
	for i := range s.recv {
		s.recv[i].ev.signal()
		s.send[i].ev.signal()
	}
	s.msgEv.signal()
}

func (s *Stream) finishLocked() {
	if !s.finished {
		s.finished = true
		close(s.done)
	}
	s.signalAllLocked()
}

// dropLocked releases buffered data.
func (s *Stream) dropLocked() {
	for i := range s.recv {
		s.recv[i].buf.release()
	}
	s.msgs, s.msgBytes = nil, 0
}

// sendErrLocked returns why nothing can be sent on ch (ch < 0: on the
// stream), or nil.
func (s *Stream) sendErrLocked(ch int) error {
	switch {
	case s.resetErr != nil:
		return s.resetErr
	case s.localClosed:
		return fmt.Errorf("proto: stream %d: %w", s.id, ErrStreamClosed)
	case s.remoteClosed:
		return fmt.Errorf("proto: stream %d: %w", s.id, errPeerClosed)
	case ch >= 0 && s.send[ch].eofSent:
		return fmt.Errorf("proto: stream %d channel %d: %w", s.id, ch, errWriteAfterEOF)
	case s.c.err != nil:
		return s.c.connErrLocked()
	}
	return nil
}

// Write sends p on channel ch, in frames of at most MaxPayload-1 bytes,
// blocking while the peer has granted no credit. It returns early with an
// error if the stream is reset or closed (by either side), ch was closed
// with CloseWrite, or the connection ends.
func (s *Stream) Write(ch Channel, p []byte) (int, error) {
	if err := ch.valid(); err != nil {
		return 0, err
	}
	s.wlock[ch].Lock()
	defer s.wlock[ch].Unlock()
	c := s.c
	check := func() error { return s.sendErrLocked(int(ch)) }
	written := 0
	for {
		c.mu.Lock()
		var n int
		for {
			if err := s.sendErrLocked(int(ch)); err != nil {
				c.mu.Unlock()
				return written, err
			}
			if len(p) == written {
				c.mu.Unlock()
				return written, nil
			}
			if cr := s.send[ch].credit; cr > 0 {
				n = int(min(uint64(len(p)-written), uint64(MaxPayload-1), cr))
				s.send[ch].credit -= uint64(n)
				break
			}
			w := s.send[ch].ev.wait()
			c.mu.Unlock()
			<-w
			c.mu.Lock()
		}
		c.mu.Unlock()
		if err := c.writeFrame(check, FrameData, s.id, int(ch), p[written:written+n]); err != nil {
			return written, err
		}
		written += n
		if written == len(p) {
			return written, nil
		}
	}
}

// CloseWrite sends EOF on channel ch: the peer's reads of ch return io.EOF
// after the data sent before. Further Writes on ch fail. Calling it again,
// or after the peer closed the stream, does nothing.
func (s *Stream) CloseWrite(ch Channel) error {
	if err := ch.valid(); err != nil {
		return err
	}
	return s.c.writeFrame(func() error {
		if s.resetErr == nil && !s.localClosed && (s.remoteClosed || s.send[ch].eofSent) {
			return errSkip
		}
		if err := s.sendErrLocked(-1); err != nil {
			return err
		}
		s.send[ch].eofSent = true
		s.send[ch].ev.signal()
		return nil
	}, FrameEOF, s.id, int(ch), nil)
}

// Read reads from channel ch. It blocks until data is available and returns
// io.EOF once the peer sent EOF on ch (or closed the stream) and the
// buffered data is drained, even if the connection has ended since. Consumed
// bytes are granted back to the peer. After a Reset it returns an error
// matching ErrReset; after our own Close, ErrStreamClosed.
func (s *Stream) Read(ch Channel, p []byte) (int, error) {
	if err := ch.valid(); err != nil {
		return 0, err
	}
	c := s.c
	c.mu.Lock()
	for {
		r := &s.recv[ch]
		switch {
		case s.resetErr != nil:
			c.mu.Unlock()
			return 0, s.resetErr
		case s.localClosed:
			c.mu.Unlock()
			return 0, fmt.Errorf("proto: stream %d: %w", s.id, ErrStreamClosed)
		case len(p) == 0:
			c.mu.Unlock()
			return 0, nil
		case r.buf.Len() > 0:
			n := r.buf.read(p)
			err := s.grantLocked(ch, n)
			fatal := err != nil && c.failLocked(err)
			c.mu.Unlock()
			if fatal {
				c.closeRW()
			}
			return n, nil
		case r.eof || s.remoteClosed:
			c.mu.Unlock()
			return 0, io.EOF
		case c.err != nil:
			err := c.connErrLocked()
			c.mu.Unlock()
			return 0, err
		}
		w := r.ev.wait()
		c.mu.Unlock()
		<-w
		c.mu.Lock()
	}
}

// grantLocked accounts for n bytes consumed from ch and queues a Window
// frame once half the window has been consumed.
func (s *Stream) grantLocked(ch Channel, n int) error {
	c := s.c
	r := &s.recv[ch]
	r.unacked += uint32(n)
	if r.unacked < c.cfg.Window/2 || r.eof || s.remoteClosed || c.err != nil {
		return nil
	}
	r.credit += r.unacked
	r.grant += r.unacked
	r.unacked = 0
	if r.grantQueued {
		return nil
	}
	r.grantQueued = true
	return c.enqueueLocked(ctlFrame{typ: FrameWindow, id: s.id, ch: ch})
}

// SendMsg sends a control message (≤ MaxPayload bytes). Messages are not
// flow controlled: the peer queues at most MaxMsgQueue messages
// (MaxMsgQueueBytes bytes) per stream and resets a stream that sends more
// than it has consumed, so messages are for low-rate control traffic.
func (s *Stream) SendMsg(b []byte) error {
	if len(b) > MaxPayload {
		return fmt.Errorf("%w: message of %d bytes", ErrTooLarge, len(b))
	}
	return s.c.writeFrame(func() error { return s.sendErrLocked(-1) }, FrameMsg, s.id, -1, b)
}

// RecvMsg returns the next message, in order. It returns io.EOF once the
// peer closed the stream and the queue is drained (also after the
// connection ended), an error matching ErrReset after a Reset, and
// ErrStreamClosed after our own Close.
func (s *Stream) RecvMsg(ctx context.Context) ([]byte, error) {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		switch {
		case s.resetErr != nil:
			return nil, s.resetErr
		case s.localClosed:
			return nil, fmt.Errorf("proto: stream %d: %w", s.id, ErrStreamClosed)
		case len(s.msgs) > 0:
			m := s.msgs[0]
			s.msgs[0] = nil
			s.msgs = s.msgs[1:]
			s.msgBytes -= len(m)
			return m, nil
		case s.remoteClosed:
			return nil, io.EOF
		case c.err != nil:
			return nil, c.connErrLocked()
		}
		w := s.msgEv.wait()
		c.mu.Unlock()
		select {
		case <-w:
		case <-ctx.Done():
			c.mu.Lock()
			return nil, ctx.Err()
		}
		c.mu.Lock()
	}
}

// Close sends Close: we are done with the stream and will neither send nor
// read anything more. Buffered data and messages are discarded and blocked
// calls on the stream return ErrStreamClosed; data the peer still sends is
// discarded. The stream finishes once the peer has closed it too (use Reset
// to finish at once). Close never blocks; it is a no-op on a stream already
// closed or reset.
func (s *Stream) Close() error {
	c := s.c
	c.mu.Lock()
	if s.localClosed || s.resetErr != nil || s.freed {
		c.mu.Unlock()
		return nil
	}
	s.localClosed = true
	s.dropLocked()
	s.signalAllLocked()
	err := c.enqueueLocked(ctlFrame{typ: FrameClose, id: s.id})
	if s.remoteClosed || c.err != nil {
		c.freeLocked(s)
	}
	fatal := err != nil && c.failLocked(err)
	c.mu.Unlock()
	if fatal {
		c.closeRW()
	}
	return nil
}

// Reset aborts the stream, sending reason (truncated to MaxResetReason
// bytes) to the peer. Blocked and future calls on the stream, on both
// sides, return an error matching ErrReset. The stream finishes at once.
// Reset never blocks; it is a no-op on a finished stream.
func (s *Stream) Reset(reason string) error {
	c := s.c
	c.mu.Lock()
	err := c.resetLocked(s, truncateReason(reason), false)
	fatal := err != nil && c.failLocked(err)
	c.mu.Unlock()
	if fatal {
		c.closeRW()
	}
	return nil
}

// Reader returns an io.Reader reading channel ch.
func (s *Stream) Reader(ch Channel) io.Reader { return channelReader{s, ch} }

// Writer returns an io.WriteCloser writing channel ch; Close is CloseWrite.
func (s *Stream) Writer(ch Channel) io.WriteCloser { return channelWriter{s, ch} }

type channelReader struct {
	s  *Stream
	ch Channel
}

func (r channelReader) Read(p []byte) (int, error) { return r.s.Read(r.ch, p) }

type channelWriter struct {
	s  *Stream
	ch Channel
}

func (w channelWriter) Write(p []byte) (int, error) { return w.s.Write(w.ch, p) }
func (w channelWriter) Close() error                { return w.s.CloseWrite(w.ch) }
