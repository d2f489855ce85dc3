// Package link is a gVisor link endpoint that carries Ethernet frames over a
// byte stream, framed as QEMU's "-netdev stream" does:
//
//	frame = length:uint32 big-endian | ethernet frame (length bytes)
//
// Inbound, a frame shorter than an Ethernet header or longer than the MTU
// plus the header is skipped without allocating anything from its length
// (lengths over HardMaxFrame end the link: the stream is not QEMU's). An
// optional Filter sees every frame before the stack does. Outbound frames
// go through a bounded queue to one writer goroutine; when the queue is full
// packets are dropped (TCP retransmits), so a peer that stops reading never
// blocks the stack.
package link

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

const (
	// HardMaxFrame is the largest length prefix tolerated at all; past it
	// the stream is considered corrupt and the link is closed. QEMU never
	// sends frames over 64 KiB + a header.
	HardMaxFrame = 1 << 17
	// MinMTU and MaxMTU bound Options.MTU (IP MTU, without the Ethernet
	// header). 65520 is the largest MTU virtio-net offers (host_mtu).
	MinMTU = 576
	MaxMTU = 65520
	// queueBytes bounds the memory held by the outbound queue.
	queueBytes = 8 << 20
	maxQueue   = 1024
	minQueue   = 64
)

// Options configure an Endpoint.
type Options struct {
	// Conn carries the frames. The Endpoint owns it and closes it.
	Conn io.ReadWriteCloser
	// MTU is the IP MTU (default 1500).
	MTU uint32
	// MAC is this end's Ethernet address.
	MAC tcpip.LinkAddress
	// Filter, if set, is called with each inbound frame (Ethernet header
	// included; valid only during the call). Returning false drops it.
	Filter func(frame []byte) bool
	// RXChecksumOffload tells the stack not to verify inbound checksums.
	RXChecksumOffload bool
	// OnClose, if set, is called once when the link stops (err is nil after
	// Close, the read or write error otherwise).
	OnClose func(err error)
}

// Stats counts link-level events.
type Stats struct {
	RxFrames, TxFrames uint64
	RxBadLength        uint64 // frames skipped for their length
	RxFiltered         uint64 // frames the Filter dropped
	TxDropped          uint64 // outbound packets dropped (queue full or closed)
}

// Endpoint implements stack.LinkEndpoint over a framed stream.
type Endpoint struct {
	conn     io.ReadWriteCloser
	mtu      uint32
	mac      tcpip.LinkAddress
	filter   func([]byte) bool
	caps     stack.LinkEndpointCapabilities
	onClose  func(error)
	maxFrame int

	mu         sync.RWMutex
	dispatcher stack.NetworkDispatcher // guarded by mu
	started    bool                    // guarded by mu

	// out carries length-prefixed frames to the writer. closing is closed
	// once to stop the writer; out itself is never closed (writers may race).
	out       chan []byte
	closing   chan struct{}
	closeOnce sync.Once
	wg        sync.WaitGroup
	pool      sync.Pool

	rxFrames, txFrames, rxBadLen, rxFiltered, txDropped atomic.Uint64
}

var _ stack.LinkEndpoint = (*Endpoint)(nil)

// New returns an Endpoint. Its goroutines start when the stack attaches it.
func New(opts Options) (*Endpoint, error) {
	if opts.Conn == nil {
		return nil, errors.New("link: nil Conn")
	}
	if opts.MTU == 0 {
		opts.MTU = 1500
	}
	if opts.MTU < MinMTU || opts.MTU > MaxMTU {
		return nil, fmt.Errorf("link: MTU %d out of range %d-%d", opts.MTU, MinMTU, MaxMTU)
	}
	if len(opts.MAC) != header.EthernetAddressSize {
		return nil, errors.New("link: MAC must be 6 bytes")
	}
	maxFrame := int(opts.MTU) + header.EthernetMinimumSize
	q := queueBytes / maxFrame
	q = max(minQueue, min(maxQueue, q))
	e := &Endpoint{
		conn:     opts.Conn,
		mtu:      opts.MTU,
		mac:      opts.MAC,
		filter:   opts.Filter,
		onClose:  opts.OnClose,
		maxFrame: maxFrame,
		caps:     stack.CapabilityResolutionRequired,
		out:      make(chan []byte, q),
		closing:  make(chan struct{}),
	}
	if opts.RXChecksumOffload {
		e.caps |= stack.CapabilityRXChecksumOffload
	}
	e.pool.New = func() any { b := make([]byte, 4+maxFrame); return &b }
	return e, nil
}

// Stats returns a snapshot of the link counters.
func (e *Endpoint) Stats() Stats {
	return Stats{
		RxFrames:    e.rxFrames.Load(),
		TxFrames:    e.txFrames.Load(),
		RxBadLength: e.rxBadLen.Load(),
		RxFiltered:  e.rxFiltered.Load(),
		TxDropped:   e.txDropped.Load(),
	}
}

// MTU implements stack.LinkEndpoint.
func (e *Endpoint) MTU() uint32 { return e.mtu }

// SetMTU implements stack.LinkEndpoint; the MTU is fixed at creation.
func (e *Endpoint) SetMTU(uint32) {}

// MaxHeaderLength implements stack.LinkEndpoint.
func (e *Endpoint) MaxHeaderLength() uint16 { return header.EthernetMinimumSize }

// LinkAddress implements stack.LinkEndpoint.
func (e *Endpoint) LinkAddress() tcpip.LinkAddress { return e.mac }

// SetLinkAddress implements stack.LinkEndpoint; the address is fixed.
func (e *Endpoint) SetLinkAddress(tcpip.LinkAddress) {}

// Capabilities implements stack.LinkEndpoint.
func (e *Endpoint) Capabilities() stack.LinkEndpointCapabilities { return e.caps }

// ARPHardwareType implements stack.LinkEndpoint.
func (e *Endpoint) ARPHardwareType() header.ARPHardwareType { return header.ARPHardwareEther }

// SetOnCloseAction implements stack.LinkEndpoint.
func (e *Endpoint) SetOnCloseAction(func()) {}

// AddHeader implements stack.LinkEndpoint.
func (e *Endpoint) AddHeader(pkt *stack.PacketBuffer) {
	eth := header.Ethernet(pkt.LinkHeader().Push(header.EthernetMinimumSize))
	eth.Encode(&header.EthernetFields{
		SrcAddr: e.mac,
		DstAddr: pkt.EgressRoute.RemoteLinkAddress,
		Type:    pkt.NetworkProtocolNumber,
	})
}

// ParseHeader implements stack.LinkEndpoint.
func (e *Endpoint) ParseHeader(pkt *stack.PacketBuffer) bool {
	_, ok := pkt.LinkHeader().Consume(header.EthernetMinimumSize)
	return ok
}

// Attach implements stack.LinkEndpoint. The first non-nil dispatcher starts
// the reader and writer goroutines.
func (e *Endpoint) Attach(d stack.NetworkDispatcher) {
	e.mu.Lock()
	e.dispatcher = d
	start := d != nil && !e.started
	if start {
		e.started = true
	}
	e.mu.Unlock()
	if start {
		e.wg.Add(2)
		go e.readLoop()
		go e.writeLoop()
	}
}

// IsAttached implements stack.LinkEndpoint.
func (e *Endpoint) IsAttached() bool {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.dispatcher != nil
}

// Wait implements stack.LinkEndpoint. Call it after Close and before the
// stack's Wait: the reader may be delivering a packet that needs the stack
// lock, which Stack.Wait holds while it waits for the link.
func (e *Endpoint) Wait() { e.wg.Wait() }

// Close implements stack.LinkEndpoint: it stops the goroutines and closes
// the stream.
func (e *Endpoint) Close() { e.shutdown(nil) }

func (e *Endpoint) shutdown(err error) {
	e.closeOnce.Do(func() {
		close(e.closing)
		e.conn.Close()
		if e.onClose != nil {
			e.onClose(err)
		}
	})
}

// WritePackets implements stack.LinkEndpoint.
func (e *Endpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	n := 0
	for _, pkt := range pkts.AsSlice() {
		if err := e.writePacket(pkt); err != nil {
			if n == 0 {
				return 0, err
			}
			break
		}
		n++
	}
	return n, nil
}

func (e *Endpoint) writePacket(pkt *stack.PacketBuffer) tcpip.Error {
	select {
	case <-e.closing:
		e.txDropped.Add(1)
		return &tcpip.ErrClosedForSend{}
	default:
	}
	size := pkt.Size()
	if size > e.maxFrame {
		e.txDropped.Add(1)
		return &tcpip.ErrMessageTooLong{}
	}
	bp := e.pool.Get().(*[]byte)
	b := (*bp)[:4+size]
	binary.BigEndian.PutUint32(b, uint32(size))
	off := 4
	for _, s := range pkt.AsSlices() {
		off += copy(b[off:], s)
	}
	select {
	case e.out <- b:
		return nil
	default:
		e.pool.Put(bp)
		e.txDropped.Add(1)
		return &tcpip.ErrNoBufferSpace{}
	}
}

// WriteRaw queues a complete Ethernet frame as is (tests use it to send
// frames the stack would not build).
func (e *Endpoint) WriteRaw(frame []byte) error {
	if len(frame) > e.maxFrame {
		return errors.New("link: frame too long")
	}
	b := make([]byte, 4+len(frame))
	binary.BigEndian.PutUint32(b, uint32(len(frame)))
	copy(b[4:], frame)
	select {
	case <-e.closing:
		return errors.New("link: closed")
	case e.out <- b:
		return nil
	}
}

func (e *Endpoint) writeLoop() {
	defer e.wg.Done()
	w := bufio.NewWriterSize(e.conn, 256<<10)
	put := func(b []byte) {
		if cap(b) == 4+e.maxFrame {
			b = b[:cap(b)]
			e.pool.Put(&b)
		}
	}
	for {
		var b []byte
		select {
		case <-e.closing:
			return
		case b = <-e.out:
		}
		for {
			_, err := w.Write(b)
			put(b)
			if err != nil {
				e.shutdown(fmt.Errorf("link: write: %w", err))
				return
			}
			e.txFrames.Add(1)
			select {
			case b = <-e.out:
				continue
			default:
			}
			break
		}
		if err := w.Flush(); err != nil {
			e.shutdown(fmt.Errorf("link: write: %w", err))
			return
		}
	}
}

func (e *Endpoint) readLoop() {
	defer e.wg.Done()
	r := bufio.NewReaderSize(e.conn, 256<<10)
	buf := make([]byte, e.maxFrame)
	var lenBuf [4]byte
	for {
		select {
		case <-e.closing:
			return
		default:
		}
		if _, err := io.ReadFull(r, lenBuf[:]); err != nil {
			e.readFailed(err)
			return
		}
		n := binary.BigEndian.Uint32(lenBuf[:])
		if n > HardMaxFrame {
			e.shutdown(fmt.Errorf("link: frame length %d: not a frame stream", n))
			return
		}
		if n < header.EthernetMinimumSize || int(n) > e.maxFrame {
			e.rxBadLen.Add(1)
			if _, err := r.Discard(int(n)); err != nil {
				e.readFailed(err)
				return
			}
			continue
		}
		frame := buf[:n]
		if _, err := io.ReadFull(r, frame); err != nil {
			e.readFailed(err)
			return
		}
		e.rxFrames.Add(1)
		if e.filter != nil && !e.filter(frame) {
			e.rxFiltered.Add(1)
			continue
		}
		e.deliver(frame)
	}
}

func (e *Endpoint) readFailed(err error) {
	select {
	case <-e.closing:
		e.shutdown(nil)
	default:
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			err = io.EOF
		}
		e.shutdown(fmt.Errorf("link: read: %w", err))
	}
}

func (e *Endpoint) deliver(frame []byte) {
	e.mu.RLock()
	d := e.dispatcher
	e.mu.RUnlock()
	if d == nil {
		return
	}
	eth := header.Ethernet(frame)
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
		Payload: buffer.MakeWithData(frame), // copies
	})
	defer pkt.DecRef()
	if _, ok := pkt.LinkHeader().Consume(header.EthernetMinimumSize); !ok {
		return
	}
	dst := eth.DestinationAddress()
	switch {
	case dst == header.EthernetBroadcastAddress:
		pkt.PktType = tcpip.PacketBroadcast
	case header.IsMulticastEthernetAddress(dst):
		pkt.PktType = tcpip.PacketMulticast
	case dst == e.mac:
		pkt.PktType = tcpip.PacketHost
	default:
		pkt.PktType = tcpip.PacketOtherHost
	}
	d.DeliverNetworkPacket(eth.Type(), pkt)
}
