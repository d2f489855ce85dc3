// Package testguest is a fake VM for netstack tests: a second gVisor stack
// configured as the guest agent configures the real guest (10.213.0.2/24,
// default route via 10.213.0.1), speaking the same length-prefixed frame
// stream over a real socketpair.
package testguest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"

	"matchlock.dev/matchlock/netstack/internal/link"
)

// Default addressing, as the guest agent sets it.
var (
	DefaultIP      = netip.MustParseAddr("10.213.0.2")
	DefaultGateway = netip.MustParseAddr("10.213.0.1")
	DefaultMAC     = net.HardwareAddr{0x02, 0x6d, 0x6c, 0x00, 0x00, 0x02}
)

// Socketpair returns the two ends of an AF_UNIX stream socketpair: the host
// end as an *os.File (as matchlock gets it) and the guest end as a net.Conn.
func Socketpair() (host *os.File, guest net.Conn, err error) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, err
	}
	host = os.NewFile(uintptr(fds[0]), "netstack-host")
	gf := os.NewFile(uintptr(fds[1]), "netstack-guest")
	guest, err = net.FileConn(gf)
	gf.Close()
	if err != nil {
		host.Close()
		return nil, nil, err
	}
	return host, guest, nil
}

// Options configure a Guest.
type Options struct {
	Conn    net.Conn // the guest end of the frame stream; the Guest owns it
	MTU     uint32   // default 1500
	MAC     net.HardwareAddr
	IP      netip.Addr // default DefaultIP
	Gateway netip.Addr // default DefaultGateway
}

// Guest is a fake VM's network stack.
type Guest struct {
	Stack *stack.Stack
	ep    *link.Endpoint
	ip    netip.Addr

	mu     sync.Mutex
	frames [][]byte // guarded by mu; every inbound frame, for assertions
}

const nicID tcpip.NICID = 1

// New starts a Guest.
func New(opts Options) (*Guest, error) {
	if opts.MAC == nil {
		opts.MAC = DefaultMAC
	}
	if !opts.IP.IsValid() {
		opts.IP = DefaultIP
	}
	if !opts.Gateway.IsValid() {
		opts.Gateway = DefaultGateway
	}
	g := &Guest{ip: opts.IP}
	ep, err := link.New(link.Options{
		Conn:              opts.Conn,
		MTU:               opts.MTU,
		MAC:               tcpip.LinkAddress(opts.MAC),
		RXChecksumOffload: true,
		Filter: func(f []byte) bool {
			g.mu.Lock()
			if len(g.frames) < 100000 {
				g.frames = append(g.frames, append([]byte(nil), f...))
			}
			g.mu.Unlock()
			return true
		},
	})
	if err != nil {
		return nil, err
	}
	g.ep = ep
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol},
	})
	g.Stack = s
	sack := tcpip.TCPSACKEnabled(true)
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &sack)
	rcv := tcpip.TCPReceiveBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: 4 << 20}
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &rcv)
	snd := tcpip.TCPSendBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: 4 << 20}
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &snd)
	if terr := s.CreateNIC(nicID, ep); terr != nil {
		return nil, fmt.Errorf("testguest: NIC: %s", terr)
	}
	if terr := s.AddProtocolAddress(nicID, tcpip.ProtocolAddress{
		Protocol:          ipv4.ProtocolNumber,
		AddressWithPrefix: tcpip.AddressWithPrefix{Address: tcpip.AddrFrom4(opts.IP.As4()), PrefixLen: 24},
	}, stack.AddressProperties{}); terr != nil {
		return nil, fmt.Errorf("testguest: address: %s", terr)
	}
	gw := tcpip.AddrFrom4(opts.Gateway.As4())
	sub, _ := tcpip.NewSubnet(tcpip.AddrFrom4(netip.PrefixFrom(opts.IP, 24).Masked().Addr().As4()), tcpip.MaskFromBytes(net.CIDRMask(24, 32)))
	s.SetRouteTable([]tcpip.Route{
		{Destination: sub, NIC: nicID},
		{Destination: header.IPv4EmptySubnet, Gateway: gw, NIC: nicID},
	})
	return g, nil
}

// Close stops the guest.
func (g *Guest) Close() {
	// Stop the link first: gVisor's Stack.Wait waits for the link's
	// goroutines while holding the stack lock a delivery may need.
	g.ep.Close()
	g.ep.Wait()
	g.Stack.Close()
	g.Stack.Wait()
}

func full(ap netip.AddrPort) tcpip.FullAddress {
	return tcpip.FullAddress{NIC: nicID, Addr: tcpip.AddrFrom4(ap.Addr().As4()), Port: ap.Port()}
}

// DialTCP connects from the guest.
func (g *Guest) DialTCP(ctx context.Context, ap netip.AddrPort) (*gonet.TCPConn, error) {
	return gonet.DialContextTCP(ctx, g.Stack, full(ap), ipv4.ProtocolNumber)
}

// Exchange sends one UDP datagram from the guest to dst and waits for one
// reply until timeout. It returns os.ErrDeadlineExceeded if none came.
func (g *Guest) Exchange(dst netip.AddrPort, msg []byte, timeout time.Duration) ([]byte, error) {
	raddr := full(dst)
	c, err := gonet.DialUDP(g.Stack, nil, &raddr, ipv4.ProtocolNumber)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if _, err := c.Write(msg); err != nil {
		return nil, err
	}
	c.SetReadDeadline(time.Now().Add(timeout))
	buf := make([]byte, 65536)
	n, err := c.Read(buf)
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return nil, os.ErrDeadlineExceeded
		}
		return nil, err
	}
	return buf[:n], nil
}

// WriteFrame sends a raw Ethernet frame as the guest.
func (g *Guest) WriteFrame(frame []byte) error { return g.ep.WriteRaw(frame) }

// LinkStats returns the guest link's counters.
func (g *Guest) LinkStats() link.Stats { return g.ep.Stats() }

// Frames returns how many inbound frames so far satisfy match.
func (g *Guest) Frames(match func(frame []byte) bool) int {
	g.mu.Lock()
	defer g.mu.Unlock()
	n := 0
	for _, f := range g.frames {
		if match(f) {
			n++
		}
	}
	return n
}
