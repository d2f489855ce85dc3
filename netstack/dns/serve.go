package dns

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"time"
)

// Limits of the serving loops.
const (
	// MaxPending bounds the queries ServePacket handles at once; a datagram
	// arriving past it is dropped (the guest retries).
	MaxPending = 2 * MaxInFlight
	// TCPIdleTimeout closes a DNS-over-TCP connection with no query for
	// that long.
	TCPIdleTimeout = 10 * time.Second
	// MaxTCPQueries bounds the queries answered on one TCP connection.
	MaxTCPQueries = 100
)

// ServePacket answers queries arriving on pc until ctx is done or pc fails.
// It closes pc when ctx is done.
func (r *Responder) ServePacket(ctx context.Context, pc net.PacketConn) error {
	stop := context.AfterFunc(ctx, func() { pc.Close() })
	defer stop()
	pending := make(chan struct{}, MaxPending)
	buf := make([]byte, MaxMessageSize+1)
	for {
		n, addr, err := pc.ReadFrom(buf)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return err
		}
		if n > MaxMessageSize {
			continue // oversized datagram: drop
		}
		select {
		case pending <- struct{}{}:
		default:
			continue // too many queries at once: drop
		}
		msg := append([]byte(nil), buf[:n]...)
		go func() {
			defer func() { <-pending }()
			if reply := r.Answer(ctx, msg); reply != nil {
				pc.WriteTo(reply, addr)
			}
		}()
	}
}

// ServeConn answers DNS-over-TCP queries (2-byte big-endian length +
// message) on c, one at a time, until the peer closes, TCPIdleTimeout
// passes without a query, MaxTCPQueries are answered or ctx is done. It
// closes c.
func (r *Responder) ServeConn(ctx context.Context, c net.Conn) error {
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	var lenBuf [2]byte
	msg := make([]byte, MaxMessageSize)
	for i := 0; i < MaxTCPQueries; i++ {
		c.SetReadDeadline(time.Now().Add(TCPIdleTimeout))
		if _, err := io.ReadFull(c, lenBuf[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		n := int(binary.BigEndian.Uint16(lenBuf[:]))
		if n == 0 || n > MaxMessageSize {
			return errors.New("dns: bad TCP message length")
		}
		if _, err := io.ReadFull(c, msg[:n]); err != nil {
			return err
		}
		reply := r.Answer(ctx, msg[:n])
		if reply == nil {
			return errors.New("dns: unanswerable message on TCP")
		}
		out := make([]byte, 2+len(reply))
		binary.BigEndian.PutUint16(out, uint16(len(reply)))
		copy(out[2:], reply)
		c.SetWriteDeadline(time.Now().Add(TCPIdleTimeout))
		if _, err := c.Write(out); err != nil {
			return err
		}
	}
	return nil
}
