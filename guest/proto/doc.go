// Package proto is the wire protocol between the matchlock host and the
// guest agent: framed, multiplexed streams with per-channel flow control,
// over one reliable byte stream (a virtio-serial port). It uses the standard
// library only.
//
// The host treats every byte from the guest as hostile: every length is
// bounded and validated before use, memory is bounded (see below), and the
// read loop never blocks on anything the peer controls except reading.
//
// # Wire format
//
//	frame = type u8 | flags u8 | reserved u16 (0) | stream u32 | length u32 | payload[length]   (big-endian, 12-byte header, length ≤ MaxPayload)
//
// A length above MaxPayload (64 KiB), a nonzero reserved field or an unknown
// type is a protocol error: the connection is closed and Conn.Err matches
// ErrProtocol. Flags are sent as 0 and ignored. Frame types and payloads:
//
//	Hello  (1)  stream 0   JSON {"version":1,"role":"host"|"guest","window":W,"info":{...}}
//	Open   (2)  stream S   opaque header bytes chosen by the opener
//	Data   (3)  stream S   channel u8 | bytes
//	EOF    (4)  stream S   channel u8
//	Window (5)  stream S   channel u8 | increment u32 (nonzero)
//	Msg    (6)  stream S   opaque control message
//	Close  (7)  stream S   empty
//	Reset  (8)  stream S   optional UTF-8 reason (the first MaxResetReason bytes are used)
//	Ping   (9)  stream 0   ≤ MaxPingPayload bytes
//	Pong   (10) stream 0   the Ping payload, echoed
//
// # Connection
//
// Both sides first send Hello; Handshake checks the peer's (same Version,
// the other role, a window in [MinWindow, MaxWindow]) before the connection
// is usable (NewConn then Handshake; Dial does both). Hello.Window is the
// sender's receive window: the initial credit the other side has on every
// (stream, channel) of every stream, in either direction.
//
// Ping/Pong measure the round trip; since the peer's read loop processes
// frames in order, a Pong also proves that all frames sent before the Ping
// were processed.
//
// # Streams
//
// The initiator (the host) opens odd stream IDs, the other side even ones;
// each side's IDs strictly increase and are never reused. An Open with the
// wrong parity, a non-increasing ID, beyond Config.MaxStreams live streams
// (both directions together) or beyond MaxAcceptQueue unaccepted streams is
// refused with a Reset; the connection stays up. (An Open that reuses the ID
// of a live stream resets that stream too.)
//
// Each stream has four channels (Stdin, Stdout, Stderr, Aux) in each
// direction, each with its own credit and EOF, plus an ordered message queue
// (Msg). Close means "the sender is done with the stream entirely" (it
// implies EOF on every channel); a stream is finished when both sides have
// sent Close, or at once when either side sends Reset. After our Reset the
// peer may still have frames in flight: they are ignored (Data up to the
// credit it had, other frames up to a small count), for the most recent
// 2×MaxStreams+MaxAcceptQueue reset streams. Other frames for finished or
// never-opened streams are protocol errors, except Close and Reset for a
// finished stream, which are ignored.
//
// # Flow control
//
// The receiver grants credit per (stream, channel): Config.Window bytes at
// open, then Window increments as the application consumes data (once half
// the window is consumed). A writer blocks while it has no credit; Data
// beyond the granted credit is a protocol error, as is credit beyond
// 16 × the advertised window. Received data is buffered per (stream,
// channel), never more than the window, so a slow reader only stalls its
// own channel: there is no head-of-line blocking between streams or
// channels. Messages are not flow controlled: at most MaxMsgQueue messages
// and MaxMsgQueueBytes bytes are queued per stream, and a peer that sends
// more gets the stream reset. Writes to the transport are serialised and
// synchronous, so a peer that stops reading makes our writers block rather
// than frames pile up in memory; the few frames the read loop itself must
// send (Pong, Reset, and Window grants) go through a bounded queue whose
// overflow (a peer flooding us without reading) is a protocol error.
//
// # Memory bound
//
// With W = Config.Window and N = Config.MaxStreams, what a malicious peer
// can make a Conn hold is at most
//
//	N × (4·W  receive buffers
//	     + MaxMsgQueueBytes  message queue (plus ≤ MaxMsgQueue slice headers)
//	     + MaxPayload  Open header
//	     + ~1 KiB  stream state)
//	+ 3 × MaxPayload  read, bufio and write buffers
//	+ (8N+256) × ~100 B  queued control frames (Pong ≤ 64 B payload;
//	                     only our own Reset calls queue up to 1 KiB each)
//	+ (2N+64) × ~100 B  tombstones
//
// about 1.3 GiB for the defaults (W = 256 KiB, N = 1024), or about 83 MiB
// for N = 64. Buffers grow on demand, so an idle connection holds little.
// Nothing else scales with peer input.
package proto
