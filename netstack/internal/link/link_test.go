package link

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

type recDispatcher struct {
	mu    sync.Mutex
	pkts  [][]byte
	proto []tcpip.NetworkProtocolNumber
}

func (d *recDispatcher) DeliverNetworkPacket(p tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.proto = append(d.proto, p)
	d.pkts = append(d.pkts, pkt.ToView().AsSlice())
}

func (d *recDispatcher) DeliverLinkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer) {}

func (d *recDispatcher) count() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.pkts)
}

var mac = tcpip.LinkAddress("\x02\x00\x00\x00\x00\x01")

func frame(typ tcpip.NetworkProtocolNumber, payload []byte) []byte {
	f := make([]byte, header.EthernetMinimumSize+len(payload))
	header.Ethernet(f).Encode(&header.EthernetFields{SrcAddr: "\x02\x00\x00\x00\x00\x02", DstAddr: mac, Type: typ})
	copy(f[header.EthernetMinimumSize:], payload)
	return f
}

func framed(f []byte) []byte { return append(binary.BigEndian.AppendUint32(nil, uint32(len(f))), f...) }

func waitUntil(cond func() bool) bool {
	for i := 0; i < 300; i++ {
		if cond() {
			return true
		}
		time.Sleep(10 * time.Millisecond)
	}
	return false
}

func TestNewValidates(t *testing.T) {
	a, _ := net.Pipe()
	for _, o := range []Options{
		{},
		{Conn: a, MAC: mac, MTU: MinMTU - 1},
		{Conn: a, MAC: mac, MTU: MaxMTU + 1},
		{Conn: a, MAC: "\x01"},
	} {
		if _, err := New(o); err == nil {
			t.Errorf("accepted %+v", o)
		}
	}
}

func TestReadFramesAndBadLengths(t *testing.T) {
	host, peer := net.Pipe()
	var closedErr error
	closed := make(chan struct{})
	filtered := 0
	e, err := New(Options{Conn: host, MAC: mac, MTU: 1500, OnClose: func(err error) { closedErr = err; close(closed) },
		Filter: func(f []byte) bool {
			if bytes.Contains(f, []byte("drop")) {
				filtered++
				return false
			}
			return true
		}})
	if err != nil {
		t.Fatal(err)
	}
	d := &recDispatcher{}
	e.Attach(d)
	go io.Copy(io.Discard, peer)
	var in []byte
	in = append(in, framed(frame(header.IPv4ProtocolNumber, []byte("one")))...)
	in = append(in, binary.BigEndian.AppendUint32(nil, 1515)...) // MTU+14+1
	in = append(in, make([]byte, 1515)...)
	in = append(in, framed([]byte{1, 2, 3})...) // runt
	in = append(in, framed(frame(header.ARPProtocolNumber, []byte("drop me")))...)
	in = append(in, framed(frame(header.IPv4ProtocolNumber, make([]byte, 1500)))...) // exactly MTU
	in = append(in, framed(frame(header.IPv4ProtocolNumber, []byte("two")))...)
	if _, err := peer.Write(in); err != nil {
		t.Fatal(err)
	}
	if !waitUntil(func() bool { return d.count() == 3 }) {
		t.Fatalf("delivered %d", d.count())
	}
	// The delivered view still holds the (consumed) link header.
	if string(d.pkts[0][14:]) != "one" || d.proto[0] != header.IPv4ProtocolNumber || len(d.pkts[1]) != 1514 || string(d.pkts[2][14:]) != "two" {
		t.Fatalf("payloads %q ... %q", d.pkts[0], d.pkts[2])
	}
	s := e.Stats()
	if s.RxBadLength != 2 || s.RxFiltered != 1 || s.RxFrames != 4 || filtered != 1 {
		t.Fatalf("stats %+v", s)
	}
	peer.Write([]byte{0, 2, 0, 1}) // 131073 > HardMaxFrame
	select {
	case <-closed:
	case <-time.After(3 * time.Second):
		t.Fatal("hostile length did not close the link")
	}
	if closedErr == nil {
		t.Fatal("no error for a hostile length")
	}
	e.Wait()
}

func TestWriteFraming(t *testing.T) {
	host, peer := net.Pipe()
	e, err := New(Options{Conn: host, MAC: mac, MTU: 1500})
	if err != nil {
		t.Fatal(err)
	}
	e.Attach(&recDispatcher{})
	defer func() { e.Close(); e.Wait() }()
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
		ReserveHeaderBytes: int(e.MaxHeaderLength()),
		Payload:            buffer.MakeWithData([]byte("payload")),
	})
	pkt.NetworkProtocolNumber = header.IPv4ProtocolNumber
	pkt.EgressRoute.RemoteLinkAddress = "\x02\x00\x00\x00\x00\x02"
	e.AddHeader(pkt)
	var l stack.PacketBufferList
	l.PushBack(pkt)
	if n, err := e.WritePackets(l); n != 1 || err != nil {
		t.Fatalf("WritePackets = %d %v", n, err)
	}
	pkt.DecRef()
	peer.SetReadDeadline(time.Now().Add(3 * time.Second))
	var lb [4]byte
	if _, err := io.ReadFull(peer, lb[:]); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, binary.BigEndian.Uint32(lb[:]))
	if _, err := io.ReadFull(peer, got); err != nil {
		t.Fatal(err)
	}
	eth := header.Ethernet(got)
	if eth.SourceAddress() != mac || eth.Type() != header.IPv4ProtocolNumber || string(got[14:]) != "payload" {
		t.Fatalf("frame % x", got)
	}
}

func TestWriteQueueDropsWhenPeerStalls(t *testing.T) {
	host, _ := net.Pipe() // nobody reads the peer end
	e, err := New(Options{Conn: host, MAC: mac, MTU: 1500})
	if err != nil {
		t.Fatal(err)
	}
	e.Attach(&recDispatcher{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < 5000; i++ {
			pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
				ReserveHeaderBytes: 14, Payload: buffer.MakeWithData(make([]byte, 100)),
			})
			e.AddHeader(pkt)
			var l stack.PacketBufferList
			l.PushBack(pkt)
			e.WritePackets(l)
			pkt.DecRef()
		}
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("WritePackets blocked on a stalled peer")
	}
	if e.Stats().TxDropped == 0 {
		t.Fatal("nothing dropped")
	}
	e.Close()
	e.Wait()
}

// FuzzReadStream feeds arbitrary bytes as the frame stream.
func FuzzReadStream(f *testing.F) {
	f.Add(framed(frame(header.IPv4ProtocolNumber, []byte("x"))))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Add([]byte{0, 0, 0, 1, 0})
	f.Fuzz(func(t *testing.T, in []byte) {
		host, peer := net.Pipe()
		closed := make(chan struct{})
		e, err := New(Options{Conn: host, MAC: mac, MTU: 1500, OnClose: func(error) { close(closed) }})
		if err != nil {
			t.Fatal(err)
		}
		d := &recDispatcher{}
		e.Attach(d)
		go io.Copy(io.Discard, peer)
		peer.Write(in)
		peer.Close()
		<-closed
		e.Wait()
		for _, p := range d.pkts {
			if len(p) > 1500+14 {
				t.Fatalf("delivered %d bytes", len(p))
			}
		}
	})
}
