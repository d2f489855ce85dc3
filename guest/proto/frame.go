package proto

import (
	"encoding/binary"
	"fmt"
	"io"
)

// Framing constants.
const (
	// HeaderSize is the size of a frame header.
	HeaderSize = 12
	// MaxPayload bounds the payload of every frame. A header claiming
	// more is a protocol error; nothing is allocated for it.
	MaxPayload = 64 << 10
	// MaxPingPayload bounds Ping and Pong payloads.
	MaxPingPayload = 64
	// MaxResetReason bounds the part of a Reset payload that is used.
	MaxResetReason = 1 << 10
)

// FrameType is the first byte of a frame header.
type FrameType uint8

// Frame types.
const (
	FrameHello  FrameType = 1  // stream 0; JSON Hello
	FrameOpen   FrameType = 2  // opens a stream; opaque header bytes
	FrameData   FrameType = 3  // channel u8 | bytes
	FrameEOF    FrameType = 4  // channel u8
	FrameWindow FrameType = 5  // channel u8 | increment u32
	FrameMsg    FrameType = 6  // opaque control message
	FrameClose  FrameType = 7  // empty; sender is done with the stream
	FrameReset  FrameType = 8  // optional UTF-8 reason
	FramePing   FrameType = 9  // stream 0; ≤ MaxPingPayload bytes
	FramePong   FrameType = 10 // stream 0; the Ping payload echoed
)

var frameNames = [...]string{
	FrameHello: "Hello", FrameOpen: "Open", FrameData: "Data", FrameEOF: "EOF",
	FrameWindow: "Window", FrameMsg: "Msg", FrameClose: "Close", FrameReset: "Reset",
	FramePing: "Ping", FramePong: "Pong",
}

// Known reports whether t is a frame type of this protocol version.
func (t FrameType) Known() bool { return t >= FrameHello && t <= FramePong }

func (t FrameType) String() string {
	if t.Known() {
		return frameNames[t]
	}
	return fmt.Sprintf("FrameType(%d)", uint8(t))
}

// Header is a frame header as it is on the wire:
//
//	type u8 | flags u8 | reserved u16 | stream u32 | length u32   (big-endian)
type Header [HeaderSize]byte

// NewHeader encodes a header.
func NewHeader(t FrameType, flags uint8, stream, length uint32) Header {
	var h Header
	h[0] = byte(t)
	h[1] = flags
	binary.BigEndian.PutUint32(h[4:8], stream)
	binary.BigEndian.PutUint32(h[8:12], length)
	return h
}

// Type returns the frame type.
func (h Header) Type() FrameType { return FrameType(h[0]) }

// Flags returns the flags byte. Version 1 defines no flags: senders set 0,
// receivers ignore it.
func (h Header) Flags() uint8 { return h[1] }

// Reserved returns the reserved field, which must be 0.
func (h Header) Reserved() uint16 { return binary.BigEndian.Uint16(h[2:4]) }

// Stream returns the stream ID (0 for connection-level frames).
func (h Header) Stream() uint32 { return binary.BigEndian.Uint32(h[4:8]) }

// Length returns the payload length.
func (h Header) Length() uint32 { return binary.BigEndian.Uint32(h[8:12]) }

func (h Header) String() string {
	return fmt.Sprintf("%v stream=%d len=%d", h.Type(), h.Stream(), h.Length())
}

// Validate checks what can be checked on a header alone: a known type, a
// zero reserved field and a length ≤ MaxPayload. Errors match ErrProtocol
// (and ErrTooLarge for the length).
func (h Header) Validate() error {
	if !h.Type().Known() {
		return protoErrorf("unknown frame type %d", h[0])
	}
	if r := h.Reserved(); r != 0 {
		return protoErrorf("%v frame with reserved field %#04x", h.Type(), r)
	}
	if n := h.Length(); n > MaxPayload {
		return fmt.Errorf("%w: %w: %v frame length %d exceeds %d", ErrProtocol, ErrTooLarge, h.Type(), n, MaxPayload)
	}
	return nil
}

// ReadFrame reads one frame. The header is validated before the payload is
// read, so a bad length is rejected without reading or allocating. The
// payload is read into buf when cap(buf) is large enough (pass a buffer of
// MaxPayload bytes to never allocate) and is only valid until buf is reused.
//
// It returns io.EOF if r ends before the first byte of a frame,
// io.ErrUnexpectedEOF if it ends inside one, and an error matching
// ErrProtocol for an invalid header.
func ReadFrame(r io.Reader, buf []byte) (Header, []byte, error) {
	var h Header
	if cap(buf) < HeaderSize {
		buf = make([]byte, HeaderSize)
	}
	if _, err := io.ReadFull(r, buf[:HeaderSize]); err != nil {
		return h, nil, err
	}
	copy(h[:], buf[:HeaderSize])
	if err := h.Validate(); err != nil {
		return h, nil, err
	}
	n := int(h.Length())
	if cap(buf) < n {
		buf = make([]byte, n)
	}
	p := buf[:n]
	if _, err := io.ReadFull(r, p); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return h, nil, err
	}
	return h, p, nil
}

// WriteFrame writes one frame. h must be valid and h.Length() must equal
// len(payload). Concurrent callers must serialise their calls.
func WriteFrame(w io.Writer, h Header, payload []byte) error {
	if len(payload) > MaxPayload {
		return fmt.Errorf("%w: payload of %d bytes exceeds %d", ErrTooLarge, len(payload), MaxPayload)
	}
	if err := h.Validate(); err != nil {
		return err
	}
	if int(h.Length()) != len(payload) {
		return fmt.Errorf("proto: header length %d != payload length %d", h.Length(), len(payload))
	}
	if _, err := w.Write(h[:]); err != nil {
		return err
	}
	if len(payload) > 0 {
		if _, err := w.Write(payload); err != nil {
			return err
		}
	}
	return nil
}

// appendHeader appends an encoded header to dst.
func appendHeader(dst []byte, t FrameType, stream uint32, length int) []byte {
	dst = append(dst, byte(t), 0, 0, 0)
	dst = binary.BigEndian.AppendUint32(dst, stream)
	return binary.BigEndian.AppendUint32(dst, uint32(length))
}
