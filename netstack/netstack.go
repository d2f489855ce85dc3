// Package netstack is the sandbox's network: a userspace TCP/IP stack
// (gVisor netstack) inside the matchlock process, attached to the VM's
// virtio-net through QEMU "-netdev stream" on one end of a socketpair. There
// is no TAP device, no root and no host routing: the only packets that leave
// the host are connections matchlock itself dials after the policy said yes.
//
// # Addresses (fixed)
//
//	guest     10.213.0.2/24 (set statically by the guest agent), MAC from Config
//	gateway   10.213.0.1, also the guest's only DNS server (UDP and TCP 53)
//	names     198.18.0.0/15: one synthetic address per allowed name, per sandbox
//
// # What the guest can do
//
//   - ARP for the gateway.
//   - DNS to 10.213.0.1:53 (package dns): allowed names resolve to synthetic
//     addresses, everything else is NXDOMAIN; nothing is forwarded upstream.
//   - TCP to a synthetic address: the host resolves the name again, drops
//     private results (unless --allow-private names them) and dials the name
//     on the port, if the policy allows that port. The guest-chosen IP is
//     never dialled.
//   - TCP to an address an IP/CIDR pattern allows (not private, unless
//     --allow-private names it).
//
// Everything else is refused: TCP with a reset (sent at once, without
// completing the handshake), all other IPv4 (UDP elsewhere, ICMP,
// fragments, other protocols), IPv6 and other EtherTypes are dropped before
// the stack sees them. TCP to the gateway other than port 53 and to any
// other address of 10.213.0.0/24 is reset.
//
// For a connection to a name the forwarder peeks at what the guest sends
// first: a TLS ClientHello must carry the name as SNI (or no SNI); an HTTP/1
// request must carry it as Host (and in an absolute-form target). Otherwise
// the connection is reset before a byte reaches the upstream server.
//
// # Limits
//
// Every frame length is checked against MTU+14 before anything is read into
// memory (the link drops longer frames; lengths over 128 KiB end the link).
// MaxInFlight TCP connection attempts (SYN handled, upstream dial not yet
// done) and MaxConns connections in total are allowed per sandbox; past
// those a SYN is dropped (in flight) or reset (total). An upstream dial takes
// at most Config.DialTimeout (DefaultDialTimeout). The inspection reads at
// most MaxClientHello / MaxHTTPHead bytes within InspectTimeout. The DNS
// responder has its own limits (package dns).
package netstack

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	gvlog "gvisor.dev/gvisor/pkg/log"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"

	"matchlock.dev/matchlock/netstack/dns"
	"matchlock.dev/matchlock/netstack/internal/link"
	"matchlock.dev/matchlock/netstack/policy"
)

// Fixed addressing of every sandbox network.
var (
	GatewayIP = netip.MustParseAddr("10.213.0.1")
	GuestIP   = netip.MustParseAddr("10.213.0.2")
	Subnet    = netip.MustParsePrefix("10.213.0.0/24")
	// DefaultGatewayMAC is the gateway's Ethernet address unless
	// Config.GatewayMAC says otherwise (locally administered, unicast).
	DefaultGatewayMAC = net.HardwareAddr{0x02, 0x6d, 0x6c, 0x00, 0x00, 0x01}
)

// Limits (per Stack).
const (
	DNSPort = 53
	// DefaultMTU is the IP MTU used when Config.MTU is 0. MaxMTU is the
	// largest supported (virtio-net host_mtu=65520).
	DefaultMTU = 1500
	MaxMTU     = link.MaxMTU
	// MaxInFlight bounds TCP connection attempts being decided and dialled
	// at once; further SYNs are dropped until one finishes (the guest
	// retransmits).
	MaxInFlight = 64
	// MaxConns bounds TCP connections (being dialled or established,
	// DNS-over-TCP included); past it a SYN is reset.
	MaxConns = 1024
	// DefaultDialTimeout bounds one upstream dial (all addresses of a name).
	DefaultDialTimeout = 10 * time.Second
	// InspectTimeout bounds reading a ClientHello or request head once its
	// first byte arrived.
	InspectTimeout = 10 * time.Second
	// copyBufSize is the splice buffer per direction.
	copyBufSize = 32 << 10
	// MaxDenyEventsPerSecond bounds the deny Events passed to Config.Log
	// (the guest decides how many it causes); the rest are only counted
	// (Stats.EventsSuppressed).
	MaxDenyEventsPerSecond = 50
)

// Verdict is the outcome recorded in an Event.
type Verdict string

// Verdicts.
const (
	Allow Verdict = "allow"
	Deny  Verdict = "deny"
)

// Event describes one decision or one finished connection.
type Event struct {
	Time  time.Time
	Proto string // "tcp", "udp", "dns", "icmp", "ipv6", ...
	// Name is the destination name (DNS query name, or the name behind a
	// synthetic address); empty for connections by address.
	Name string
	// IP is the destination the guest used (a synthetic address for names).
	IP   netip.Addr
	Port uint16
	// Upstream is the address matchlock dialled, when it dialled.
	Upstream netip.AddrPort
	Verdict  Verdict
	Reason   string
	// BytesUp (guest → upstream) and BytesDown are set on the final event
	// of an allowed connection (Closed).
	BytesUp, BytesDown int64
	Closed             bool
}

// String formats the event on one line (no time), e.g.
// "allow tcp api.test:443 -> 203.0.113.7:443" or
// "deny https api.test:443 (mitm: GET /v1: blocked: ...)".
func (e Event) String() string {
	dest := e.Name
	if dest == "" && e.IP.IsValid() {
		dest = e.IP.String()
	}
	line := fmt.Sprintf("%s %s %s:%d", e.Verdict, e.Proto, dest, e.Port)
	if e.Upstream.IsValid() && !e.Closed {
		line += " -> " + e.Upstream.String()
	}
	if e.Reason != "" {
		line += " (" + e.Reason + ")"
	}
	if e.Closed {
		line += fmt.Sprintf(" closed up=%dB down=%dB", e.BytesUp, e.BytesDown)
	}
	return line
}

// DialFunc dials upstream. The address is always a numeric IP:port.
type DialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// Flow is an allowed connection to a name, handed to an Interceptor.
type Flow struct {
	Name string
	Port uint16
	// Kind is what the guest's first bytes are: "tls" (a ClientHello whose
	// SNI is Name or absent), "http" (an HTTP/1 request head whose Host is
	// Name) or "" (anything else).
	Kind string
	// Prefix are the guest's first bytes, as read by the inspection. They
	// have not been forwarded; reading Guest returns them first.
	Prefix []byte
	// Guest is the guest's side; the interceptor owns it if it handles the
	// flow.
	Guest net.Conn
	// Dial returns a connection to the name's upstream. The first call
	// returns the connection the forwarder dialled before completing the
	// guest's handshake; later calls dial again (re-resolved and re-checked
	// against the policy).
	Dial func(ctx context.Context) (net.Conn, error)
}

// Interceptor is the hook of the TLS-terminating proxy (secrets injection,
// package netstack/mitm). It is called for each allowed connection to a
// name once the forwarder has inspected (and accepted) the guest's first
// bytes, before any of them is forwarded, and only when the server has not
// spoken first (a server that speaks first, e.g. SSH, is never
// intercepted). Returning true means it handled the flow: it owns (and must
// close) Guest and every connection it got from Dial. Returning false means
// the forwarder carries on as if it were not there; it must then not have
// read from Guest nor called Dial (Kind and Prefix are there to decide).
type Interceptor func(ctx context.Context, f *Flow) (handled bool)

// Config configures a Stack.
type Config struct {
	// Conn is the host end of the socketpair whose other end QEMU uses
	// (-netdev stream,addr.type=fd). A net.Conn or an *os.File. The Stack
	// owns it.
	Conn io.ReadWriteCloser
	// MTU is the IP MTU (DefaultMTU if 0, at most MaxMTU). It must match the
	// guest's.
	MTU uint32
	// GuestMAC is the guest's Ethernet address (as given to QEMU and set
	// by the guest agent). Frames from any other address are dropped.
	GuestMAC net.HardwareAddr
	// GatewayMAC overrides DefaultGatewayMAC.
	GatewayMAC net.HardwareAddr
	// Policy decides what the guest may reach; nil allows nothing. It may
	// be changed while the Stack runs.
	Policy *policy.Policy
	// Dialer dials upstream (net.Dialer with DialTimeout if nil).
	Dialer DialFunc
	// Resolver resolves allowed names on the host (dns.SystemResolver if
	// nil). Used for DNS answers and again for each connection.
	Resolver dns.Resolver
	// Log, if set, receives Events. It is called synchronously from the
	// stack's goroutines: keep it quick.
	Log func(Event)
	// Interceptor, if set, sees allowed connections to names first.
	Interceptor Interceptor
	// DialTimeout bounds one upstream dial (DefaultDialTimeout if 0).
	DialTimeout time.Duration
}

// Stats are counters of a Stack.
type Stats struct {
	ConnsOpen      int64  // TCP connections being dialled or established
	ConnsAllowed   uint64 // TCP connections established to upstream
	ConnsDenied    uint64 // TCP SYNs reset by policy, caps or failed dials
	DNSQueries     uint64
	DroppedIPv6    uint64
	DroppedUDP     uint64 // UDP not to the gateway's port 53
	DroppedICMP    uint64
	DroppedFrag    uint64 // IPv4 fragments
	DroppedSpoofed uint64 // wrong source MAC or IP
	DroppedOther   uint64 // other EtherTypes, protocols, malformed
	// EventsSuppressed counts deny Events not logged (rate limit).
	EventsSuppressed uint64
	Link             link.Stats
}

// Stack is one sandbox's network.
type Stack struct {
	cfg       Config
	pol       *policy.Policy
	dial      DialFunc
	resolver  dns.Resolver
	responder *dns.Responder
	alloc     *dns.Allocator
	ep        *link.Endpoint
	s         *stack.Stack
	guestMAC  tcpip.LinkAddress
	gwMAC     tcpip.LinkAddress

	ctx    context.Context
	cancel context.CancelFunc
	// trackMu guards closing and orders wg.Add before Close's wg.Wait.
	trackMu sync.Mutex
	closing bool           // guarded by trackMu
	wg      sync.WaitGroup // connection and DNS goroutines (goTracked)

	conns chan struct{} // MaxConns slots

	doneOnce sync.Once
	done     chan struct{}
	errMu    sync.Mutex
	err      error // guarded by errMu; why the link stopped

	closeOnce sync.Once

	denyLog dropLimiter

	connsOpen                             atomic.Int64
	connsAllowed, connsDenied, dnsQueries atomic.Uint64
	dropV6, dropUDP, dropICMP, dropFrag   atomic.Uint64
	dropSpoof, dropOther, suppressed      atomic.Uint64
}

const nicID tcpip.NICID = 1

func addrFrom(a netip.Addr) tcpip.Address { return tcpip.AddrFromSlice(a.AsSlice()) }

func toNetip(a tcpip.Address) netip.Addr {
	ip, _ := netip.AddrFromSlice(a.AsSlice())
	return ip.Unmap()
}

// quietGVisor lowers gVisor's process-wide logger (Info lines to stderr by
// default, some of which a guest can trigger) to warnings, once.
var quietGVisor sync.Once

// New starts a Stack on cfg.Conn. The first call lowers gVisor's global
// logger to warnings (it writes Info lines, some guest-triggered, to stderr).
func New(cfg Config) (*Stack, error) {
	quietGVisor.Do(func() { gvlog.SetLevel(gvlog.Warning) })
	if cfg.Conn == nil {
		return nil, errors.New("netstack: Config.Conn is nil")
	}
	if len(cfg.GuestMAC) != 6 || cfg.GuestMAC[0]&1 != 0 {
		return nil, errors.New("netstack: Config.GuestMAC must be a unicast Ethernet address")
	}
	gwMAC := cfg.GatewayMAC
	if gwMAC == nil {
		gwMAC = DefaultGatewayMAC
	}
	if len(gwMAC) != 6 || gwMAC[0]&1 != 0 || string(gwMAC) == string(cfg.GuestMAC) {
		return nil, errors.New("netstack: Config.GatewayMAC must be a unicast Ethernet address other than the guest's")
	}
	if cfg.MTU == 0 {
		cfg.MTU = DefaultMTU
	}
	if cfg.MTU < link.MinMTU || cfg.MTU > MaxMTU {
		return nil, fmt.Errorf("netstack: MTU %d out of range %d-%d", cfg.MTU, link.MinMTU, MaxMTU)
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = DefaultDialTimeout
	}
	conn := cfg.Conn
	if f, ok := conn.(*os.File); ok {
		// A socket fd as a net.Conn uses the poller, so Close interrupts a
		// blocked read.
		if c, err := net.FileConn(f); err == nil {
			f.Close()
			conn = c
		}
	}

	st := &Stack{
		cfg:      cfg,
		pol:      cfg.Policy,
		dial:     cfg.Dialer,
		resolver: cfg.Resolver,
		guestMAC: tcpip.LinkAddress(cfg.GuestMAC),
		gwMAC:    tcpip.LinkAddress(gwMAC),
		conns:    make(chan struct{}, MaxConns),
		done:     make(chan struct{}),
	}
	st.denyLog.perSecond = MaxDenyEventsPerSecond
	if st.dial == nil {
		d := &net.Dialer{Timeout: cfg.DialTimeout}
		st.dial = d.DialContext
	}
	if st.resolver == nil {
		st.resolver = dns.SystemResolver(0)
	}
	st.alloc = dns.NewSyntheticAllocator()
	st.responder = dns.NewResponder(dns.Config{
		Policy:    st.pol,
		Resolver:  st.resolver,
		Allocator: st.alloc,
		Log:       st.logDNS,
	})
	st.ctx, st.cancel = context.WithCancel(context.Background())

	ep, err := link.New(link.Options{
		Conn:              conn,
		MTU:               cfg.MTU,
		MAC:               st.gwMAC,
		Filter:            st.filterFrame,
		RXChecksumOffload: true,
		OnClose:           st.linkClosed,
	})
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("netstack: %w", err)
	}
	st.ep = ep
	if err := st.initStack(); err != nil {
		st.Close()
		return nil, err
	}
	return st, nil
}

func (st *Stack) initStack() error {
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol},
	})
	st.s = s
	sack := tcpip.TCPSACKEnabled(true)
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &sack)
	rcv := tcpip.TCPReceiveBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: 4 << 20}
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &rcv)
	snd := tcpip.TCPSendBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: 4 << 20}
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &snd)
	mod := tcpip.TCPModerateReceiveBufferOption(true)
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &mod)

	if err := s.CreateNICWithOptions(nicID, st.ep, stack.NICOptions{Name: "guest"}); err != nil {
		return fmt.Errorf("netstack: create NIC: %s", err)
	}
	// Promiscuous + spoofing: accept TCP to any destination and answer
	// from it; what is actually reachable is decided per connection.
	if err := s.SetPromiscuousMode(nicID, true); err != nil {
		return fmt.Errorf("netstack: promiscuous: %s", err)
	}
	if err := s.SetSpoofing(nicID, true); err != nil {
		return fmt.Errorf("netstack: spoofing: %s", err)
	}
	if err := s.AddProtocolAddress(nicID, tcpip.ProtocolAddress{
		Protocol:          ipv4.ProtocolNumber,
		AddressWithPrefix: tcpip.AddressWithPrefix{Address: addrFrom(GatewayIP), PrefixLen: Subnet.Bits()},
	}, stack.AddressProperties{}); err != nil {
		return fmt.Errorf("netstack: gateway address: %s", err)
	}
	sub, err := tcpip.NewSubnet(addrFrom(Subnet.Addr()), tcpip.MaskFromBytes(net.CIDRMask(Subnet.Bits(), 32)))
	if err != nil {
		return fmt.Errorf("netstack: subnet: %w", err)
	}
	// Replies only ever go to the guest's subnet.
	s.SetRouteTable([]tcpip.Route{{Destination: sub, NIC: nicID}})
	if err := s.AddStaticNeighbor(nicID, ipv4.ProtocolNumber, addrFrom(GuestIP), st.guestMAC); err != nil {
		return fmt.Errorf("netstack: guest neighbor: %s", err)
	}

	fwd := tcp.NewForwarder(s, 0, MaxInFlight, st.handleTCP)
	s.SetTransportProtocolHandler(tcp.ProtocolNumber, fwd.HandlePacket)
	// UDP that reaches no endpoint is dropped silently (the frame filter
	// only lets DNS to the gateway through anyway).
	s.SetTransportProtocolHandler(udp.ProtocolNumber, func(stack.TransportEndpointID, *stack.PacketBuffer) bool { return true })

	uc, err := gonet.DialUDP(s, &tcpip.FullAddress{NIC: nicID, Addr: addrFrom(GatewayIP), Port: DNSPort}, nil, ipv4.ProtocolNumber)
	if err != nil {
		return fmt.Errorf("netstack: DNS socket: %w", err)
	}
	st.goTracked(func() { st.responder.ServePacket(st.ctx, uc) })
	return nil
}

// Close stops the stack: the link, every connection and the DNS responder.
func (st *Stack) Close() error {
	st.closeOnce.Do(func() {
		st.trackMu.Lock()
		st.closing = true
		st.trackMu.Unlock()
		st.cancel()
		// Stop the link and wait for its goroutines before the stack's
		// Wait, which waits for them again while holding the stack lock a
		// delivery in progress may need.
		st.ep.Close()
		st.ep.Wait()
		if st.s != nil {
			st.s.Close()
		}
		st.wg.Wait()
		if st.s != nil {
			st.s.Wait()
		}
		st.finish(nil)
	})
	return nil
}

// Done is closed when the link stopped (Close, or the VM's end went away).
func (st *Stack) Done() <-chan struct{} { return st.done }

// Err returns why the link stopped: nil after Close or before it stopped.
func (st *Stack) Err() error {
	st.errMu.Lock()
	defer st.errMu.Unlock()
	return st.err
}

func (st *Stack) linkClosed(err error) {
	st.cancel() // stop connections and DNS
	st.finish(err)
}

func (st *Stack) finish(err error) {
	st.doneOnce.Do(func() {
		if err != nil && !errors.Is(err, io.EOF) {
			st.errMu.Lock()
			st.err = err
			st.errMu.Unlock()
		}
		close(st.done)
	})
}

// Policy returns the stack's policy (change it with its Add/Remove methods).
func (st *Stack) Policy() *policy.Policy { return st.pol }

// SyntheticName returns the name a synthetic address stands for.
func (st *Stack) SyntheticName(ip netip.Addr) (string, bool) { return st.alloc.Lookup(ip) }

// Stats returns a snapshot of the counters.
func (st *Stack) Stats() Stats {
	return Stats{
		ConnsOpen:        st.connsOpen.Load(),
		ConnsAllowed:     st.connsAllowed.Load(),
		ConnsDenied:      st.connsDenied.Load(),
		DNSQueries:       st.dnsQueries.Load(),
		DroppedIPv6:      st.dropV6.Load(),
		DroppedUDP:       st.dropUDP.Load(),
		DroppedICMP:      st.dropICMP.Load(),
		DroppedFrag:      st.dropFrag.Load(),
		DroppedSpoofed:   st.dropSpoof.Load(),
		DroppedOther:     st.dropOther.Load(),
		EventsSuppressed: st.suppressed.Load(),
		Link:             st.ep.Stats(),
	}
}

func (st *Stack) log(e Event) {
	if st.cfg.Log == nil {
		return
	}
	if e.Verdict == Deny && !st.denyLog.allow() {
		st.suppressed.Add(1)
		return
	}
	if e.Time.IsZero() {
		e.Time = time.Now()
	}
	st.cfg.Log(e)
}

func (st *Stack) logDNS(o dns.Outcome) {
	st.dnsQueries.Add(1)
	if o.Dropped {
		return
	}
	e := Event{Proto: "dns", Name: o.Name, IP: o.Addr, Port: DNSPort, Verdict: Deny, Reason: o.Reason}
	if o.Allowed && o.RCode == 0 {
		e.Verdict = Allow
		e.Reason = o.Type.String()
	}
	st.log(e)
}

// filterFrame decides, before gVisor sees a frame, whether the guest may
// send it at all.
func (st *Stack) filterFrame(f []byte) bool {
	eth := header.Ethernet(f)
	if eth.SourceAddress() != st.guestMAC {
		st.dropSpoof.Add(1)
		return false
	}
	if dst := eth.DestinationAddress(); dst != st.gwMAC && dst != header.EthernetBroadcastAddress {
		st.dropOther.Add(1)
		return false
	}
	p := f[header.EthernetMinimumSize:]
	switch eth.Type() {
	case header.ARPProtocolNumber:
		a := header.ARP(p)
		if !a.IsValid() {
			st.dropOther.Add(1)
			return false
		}
		if tcpip.LinkAddress(a.HardwareAddressSender()) != st.guestMAC ||
			netip.AddrFrom4([4]byte(a.ProtocolAddressSender())) != GuestIP {
			st.dropSpoof.Add(1)
			return false
		}
		return true
	case header.IPv4ProtocolNumber:
		ip := header.IPv4(p)
		if !ip.IsValid(len(p)) {
			st.dropOther.Add(1)
			return false
		}
		if toNetip(ip.SourceAddress()) != GuestIP {
			st.dropSpoof.Add(1)
			return false
		}
		if ip.More() || ip.FragmentOffset() != 0 {
			st.dropFrag.Add(1)
			return false
		}
		dst := toNetip(ip.DestinationAddress())
		switch ip.TransportProtocol() {
		case header.TCPProtocolNumber:
			return true
		case header.UDPProtocolNumber:
			u := header.UDP(ip.Payload())
			if len(u) < header.UDPMinimumSize {
				st.dropOther.Add(1)
				return false
			}
			if dst == GatewayIP && u.DestinationPort() == DNSPort {
				return true
			}
			st.dropUDP.Add(1)
			st.log(Event{Proto: "udp", IP: dst, Port: u.DestinationPort(), Verdict: Deny,
				Reason: "UDP is only allowed to the gateway's DNS (10.213.0.1:53)"})
			return false
		case header.ICMPv4ProtocolNumber:
			st.dropICMP.Add(1)
			st.log(Event{Proto: "icmp", IP: dst, Verdict: Deny, Reason: "ICMP is not forwarded"})
			return false
		default:
			st.dropOther.Add(1)
			return false
		}
	case header.IPv6ProtocolNumber:
		st.dropV6.Add(1)
		st.log(Event{Proto: "ipv6", Verdict: Deny, Reason: "IPv6 is not supported"})
		return false
	default:
		st.dropOther.Add(1)
		return false
	}
}

// dropLimiter allows perSecond events per wall-clock second.
type dropLimiter struct {
	perSecond int64
	mu        sync.Mutex
	second    int64 // guarded by mu
	n         int64 // guarded by mu
}

func (d *dropLimiter) allow() bool {
	now := time.Now().Unix()
	d.mu.Lock()
	defer d.mu.Unlock()
	if now != d.second {
		d.second, d.n = now, 0
	}
	d.n++
	return d.n <= d.perSecond
}
