package proto

import (
	"errors"
	"fmt"
)

// Sentinel errors. Errors returned by this package wrap one of these (test
// with errors.Is); the message adds the context.
var (
	// ErrProtocol: the peer violated the protocol. The connection is
	// closed and Conn.Err matches ErrProtocol.
	ErrProtocol = errors.New("proto: protocol error")

	// ErrReset: the stream was aborted, by the peer or locally. The error
	// text carries the reason.
	ErrReset = errors.New("proto: stream reset")

	// ErrClosed: the connection is closed (locally, by the peer, or after
	// an error; the error wraps the cause as well).
	ErrClosed = errors.New("proto: connection closed")

	// ErrTooLarge: a length exceeds MaxPayload (or another documented
	// bound). On receipt it also matches ErrProtocol.
	ErrTooLarge = errors.New("proto: too large")

	// ErrStreamClosed: the operation is not possible any more on this
	// stream: it was closed locally, the peer closed it, or the channel
	// was already closed with CloseWrite.
	ErrStreamClosed = errors.New("proto: stream closed")

	// ErrTooManyStreams: Open would exceed Config.MaxStreams.
	ErrTooManyStreams = errors.New("proto: too many open streams")
)

var (
	errPeerClosed    = fmt.Errorf("%w by peer", ErrStreamClosed)
	errWriteAfterEOF = fmt.Errorf("%w: write after CloseWrite", ErrStreamClosed)
	errNotReady      = errors.New("proto: Handshake has not completed")
)

// protoErrorf returns an error matching ErrProtocol.
func protoErrorf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrProtocol, fmt.Sprintf(format, args...))
}

// closedError is returned by operations on a connection that has ended. It
// matches ErrClosed and unwraps to the reason the connection ended, so that
// errors.Is(err, ErrProtocol) also works after a protocol error.
type closedError struct{ cause error }

func (e *closedError) Error() string {
	if e.cause == ErrClosed {
		return ErrClosed.Error()
	}
	return ErrClosed.Error() + ": " + e.cause.Error()
}

func (e *closedError) Is(target error) bool { return target == ErrClosed }
func (e *closedError) Unwrap() error        { return e.cause }
