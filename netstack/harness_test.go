package netstack

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"matchlock.dev/matchlock/netstack/internal/testguest"
	"matchlock.dev/matchlock/netstack/policy"
)

// fakeResolver answers from a table and records every lookup. Nothing it
// does leaves the process.
type fakeResolver struct {
	mu    sync.Mutex
	table map[string][]netip.Addr
	calls []string
}

func (f *fakeResolver) LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, host)
	a, ok := f.table[host]
	if !ok {
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	return a, nil
}

func (f *fakeResolver) set(name string, addrs ...string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []netip.Addr
	for _, s := range addrs {
		out = append(out, netip.MustParseAddr(s))
	}
	f.table[name] = out
}

func (f *fakeResolver) Calls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.calls...)
}

// recDialer records every upstream dial. It really dials only loopback
// addresses, and addresses in redirect (mapped to a loopback server); any
// other address fails the test: tests never send traffic off the machine.
type recDialer struct {
	t        testing.TB
	mu       sync.Mutex
	calls    []string
	redirect map[string]string
}

func (d *recDialer) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	d.mu.Lock()
	d.calls = append(d.calls, addr)
	to, ok := d.redirect[addr]
	d.mu.Unlock()
	if !ok {
		ap, err := netip.ParseAddrPort(addr)
		if err != nil || !ap.Addr().IsLoopback() {
			d.t.Errorf("dial to non-loopback address %q", addr)
			return nil, errors.New("test dialer: refusing non-loopback address")
		}
		to = addr
	}
	var nd net.Dialer
	return nd.DialContext(ctx, network, to)
}

func (d *recDialer) Calls() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string(nil), d.calls...)
}

type env struct {
	t      testing.TB
	st     *Stack
	g      *testguest.Guest
	res    *fakeResolver
	dialer *recDialer
	mu     sync.Mutex
	events []Event
}

type envOpt func(*Config)

func withMTU(m uint32) envOpt { return func(c *Config) { c.MTU = m } }

func newEnv(t testing.TB, allow, private []string, opts ...envOpt) *env {
	t.Helper()
	pol, err := policy.Parse(allow, private)
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, res: &fakeResolver{table: map[string][]netip.Addr{}}}
	e.dialer = &recDialer{t: t, redirect: map[string]string{}}
	host, guestConn, err := testguest.Socketpair()
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{
		Conn:     host,
		GuestMAC: testguest.DefaultMAC,
		Policy:   pol,
		Dialer:   e.dialer.Dial,
		Resolver: e.res,
		Log: func(ev Event) {
			e.mu.Lock()
			e.events = append(e.events, ev)
			e.mu.Unlock()
		},
		DialTimeout: 3 * time.Second,
	}
	for _, o := range opts {
		o(&cfg)
	}
	st, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	g, err := testguest.New(testguest.Options{Conn: guestConn, MTU: cfg.MTU})
	if err != nil {
		st.Close()
		t.Fatal(err)
	}
	e.st, e.g = st, g
	t.Cleanup(func() {
		g.Close()
		st.Close()
	})
	return e
}

func (e *env) Events() []Event {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]Event(nil), e.events...)
}

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

var dnsServer = netip.AddrPortFrom(GatewayIP, DNSPort)

func buildQuery(t testing.TB, name string, typ dnsmessage.Type) []byte {
	t.Helper()
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: 0x4242, RecursionDesired: true})
	b.StartQuestions()
	if !strings.HasSuffix(name, ".") {
		name += "."
	}
	n, err := dnsmessage.NewName(name)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Question(dnsmessage.Question{Name: n, Type: typ, Class: dnsmessage.ClassINET}); err != nil {
		t.Fatal(err)
	}
	m, err := b.Finish()
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// rawQuery builds a query whose name is given as raw wire labels (may hold
// any byte).
func rawQuery(labels ...string) []byte {
	m := []byte{0x42, 0x42, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0}
	for _, l := range labels {
		m = append(m, byte(len(l)))
		m = append(m, l...)
	}
	return append(m, 0, 0, 1, 0, 1)
}

func parseAnswer(t testing.TB, msg []byte) (dnsmessage.RCode, netip.Addr) {
	t.Helper()
	var p dnsmessage.Parser
	h, err := p.Start(msg)
	if err != nil {
		t.Fatalf("DNS reply: %v", err)
	}
	p.SkipAllQuestions()
	ans, _ := p.AllAnswers()
	var ip netip.Addr
	for _, a := range ans {
		if r, ok := a.Body.(*dnsmessage.AResource); ok {
			ip = netip.AddrFrom4(r.A)
		}
	}
	return h.RCode, ip
}

// lookup resolves name through the guest's DNS (the gateway).
func (e *env) lookup(name string) (dnsmessage.RCode, netip.Addr) {
	e.t.Helper()
	reply, err := e.g.Exchange(dnsServer, buildQuery(e.t, name, dnsmessage.TypeA), 3*time.Second)
	if err != nil {
		e.t.Fatalf("DNS %s: %v", name, err)
	}
	return parseAnswer(e.t, reply)
}

// mustResolve returns the synthetic address of an allowed name.
func (e *env) mustResolve(name string) netip.Addr {
	e.t.Helper()
	rc, ip := e.lookup(name)
	if rc != dnsmessage.RCodeSuccess || !policy.SyntheticPrefix.Contains(ip) {
		e.t.Fatalf("lookup %s: %v %v", name, rc, ip)
	}
	return ip
}

func (e *env) dial(dst netip.AddrPort) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := e.g.DialTCP(ctx, dst)
	if err != nil {
		return nil, err
	}
	return c, nil
}

// mustRefuse checks that a guest connection to dst is reset at once.
func (e *env) mustRefuse(dst netip.AddrPort) {
	e.t.Helper()
	start := time.Now()
	c, err := e.dial(dst)
	if err == nil {
		c.Close()
		e.t.Fatalf("connection to %s was accepted", dst)
	}
	if !strings.Contains(err.Error(), "refused") {
		e.t.Fatalf("connection to %s: %v, want refused", dst, err)
	}
	if d := time.Since(start); d > 2*time.Second {
		e.t.Fatalf("refusal of %s took %v", dst, d)
	}
}

// mustEcho checks that dst is an echo service reachable from the guest.
func (e *env) mustEcho(dst netip.AddrPort) {
	e.t.Helper()
	c, err := e.dial(dst)
	if err != nil {
		e.t.Fatalf("dial %s: %v", dst, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	msg := []byte("\x00\x01binary hello " + dst.String())
	if _, err := c.Write(msg); err != nil {
		e.t.Fatalf("write %s: %v", dst, err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		e.t.Fatalf("read %s: %v", dst, err)
	}
	if string(got) != string(msg) {
		e.t.Fatalf("echo %s: %q", dst, got)
	}
}

// echoServer is a TCP echo server on loopback that counts the bytes it got
// and half-closes after EOF.
type echoServer struct {
	ln    net.Listener
	bytes atomic.Int64
	conns atomic.Int64
}

func newEchoServer(t testing.TB) *echoServer {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &echoServer{ln: ln}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.conns.Add(1)
			go func() {
				defer c.Close()
				n, _ := io.Copy(c, countingReader{c, &s.bytes})
				_ = n
				c.(*net.TCPConn).CloseWrite()
			}()
		}
	}()
	t.Cleanup(func() { ln.Close() })
	return s
}

func (s *echoServer) port() uint16 { return uint16(s.ln.Addr().(*net.TCPAddr).Port) }

type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// freePort returns a loopback port nothing listens on.
func freePort(t testing.TB) uint16 {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := uint16(ln.Addr().(*net.TCPAddr).Port)
	ln.Close()
	return p
}

// Raw frames, for what the guest stack would not send by itself.

func ethFrame(src, dst net.HardwareAddr, typ tcpip.NetworkProtocolNumber, payload []byte) []byte {
	f := make([]byte, header.EthernetMinimumSize+len(payload))
	header.Ethernet(f).Encode(&header.EthernetFields{
		SrcAddr: tcpip.LinkAddress(src), DstAddr: tcpip.LinkAddress(dst), Type: typ,
	})
	copy(f[header.EthernetMinimumSize:], payload)
	return f
}

func ipv4Packet(src, dst netip.Addr, proto uint8, payload []byte, flags uint8, fragOff uint16) []byte {
	p := make([]byte, header.IPv4MinimumSize+len(payload))
	ip := header.IPv4(p)
	ip.Encode(&header.IPv4Fields{
		TotalLength: uint16(len(p)), TTL: 64, Protocol: proto, Flags: flags, FragmentOffset: fragOff,
		SrcAddr: tcpip.AddrFrom4(src.As4()), DstAddr: tcpip.AddrFrom4(dst.As4()),
	})
	ip.SetChecksum(^ip.CalculateChecksum())
	copy(p[header.IPv4MinimumSize:], payload)
	return p
}

func icmpEcho() []byte {
	b := make([]byte, header.ICMPv4MinimumSize+8)
	h := header.ICMPv4(b)
	h.SetType(header.ICMPv4Echo)
	h.SetIdent(7)
	h.SetSequence(1)
	h.SetChecksum(^checksum.Checksum(b, 0))
	return b
}

func tcpSYN(src, dst netip.Addr, dport uint16) []byte {
	b := make([]byte, header.TCPMinimumSize)
	h := header.TCP(b)
	h.Encode(&header.TCPFields{SrcPort: 40000, DstPort: dport, SeqNum: 1, DataOffset: header.TCPMinimumSize, Flags: header.TCPFlagSyn, WindowSize: 65535})
	xsum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, tcpip.AddrFrom4(src.As4()), tcpip.AddrFrom4(dst.As4()), uint16(len(b)))
	h.SetChecksum(^checksum.Checksum(b, xsum))
	return b
}

func udpDatagram(dport uint16, payload []byte) []byte {
	b := make([]byte, header.UDPMinimumSize+len(payload))
	h := header.UDP(b)
	h.Encode(&header.UDPFields{SrcPort: 40001, DstPort: dport, Length: uint16(len(b))})
	copy(b[header.UDPMinimumSize:], payload)
	return b
}

func ipv6Frame(src net.HardwareAddr) []byte {
	p := make([]byte, header.IPv6MinimumSize+header.ICMPv6EchoMinimumSize)
	header.IPv6(p).Encode(&header.IPv6Fields{
		PayloadLength:     header.ICMPv6EchoMinimumSize,
		TransportProtocol: header.ICMPv6ProtocolNumber,
		HopLimit:          64,
		SrcAddr:           tcpip.AddrFrom16Slice(net.ParseIP("fd00::2").To16()),
		DstAddr:           tcpip.AddrFrom16Slice(net.ParseIP("fd00::1").To16()),
	})
	ic := header.ICMPv6(p[header.IPv6MinimumSize:])
	ic.SetType(header.ICMPv6EchoRequest)
	return ethFrame(src, DefaultGatewayMAC, header.IPv6ProtocolNumber, p)
}

func isIPv4Proto(proto uint8) func([]byte) bool {
	return func(f []byte) bool {
		if header.Ethernet(f).Type() != header.IPv4ProtocolNumber {
			return false
		}
		return header.IPv4(f[header.EthernetMinimumSize:]).Protocol() == proto
	}
}

func isIPv6(f []byte) bool { return header.Ethernet(f).Type() == header.IPv6ProtocolNumber }

// clientHello builds a TLS ClientHello record with the given SNI host names
// (none: no server_name extension).
func clientHello(snis ...string) []byte {
	var body []byte
	body = append(body, 3, 3)                // legacy_version
	body = append(body, make([]byte, 32)...) // random
	body = append(body, 0)                   // session id
	body = append(body, 0, 2, 0x13, 0x01)    // cipher suites
	body = append(body, 1, 0)                // compression
	var exts []byte
	exts = append(exts, 0, 0x0b, 0, 2, 1, 0) // ec_point_formats, unrelated
	if len(snis) > 0 {
		var list []byte
		for _, s := range snis {
			list = append(list, 0)
			list = binary.BigEndian.AppendUint16(list, uint16(len(s)))
			list = append(list, s...)
		}
		ext := binary.BigEndian.AppendUint16(nil, uint16(len(list)))
		ext = append(ext, list...)
		exts = append(exts, 0, 0)
		exts = binary.BigEndian.AppendUint16(exts, uint16(len(ext)))
		exts = append(exts, ext...)
	}
	body = binary.BigEndian.AppendUint16(body, uint16(len(exts)))
	body = append(body, exts...)
	hs := []byte{1, byte(len(body) >> 16), byte(len(body) >> 8), byte(len(body))}
	hs = append(hs, body...)
	rec := []byte{0x16, 3, 1}
	rec = binary.BigEndian.AppendUint16(rec, uint16(len(hs)))
	return append(rec, hs...)
}

// waitFor polls cond for up to d.
func waitFor(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if cond() {
			return true
		}
		time.Sleep(10 * time.Millisecond)
	}
	return cond()
}

func (e *env) hasEvent(match func(Event) bool) bool {
	for _, ev := range e.Events() {
		if match(ev) {
			return true
		}
	}
	return false
}

var _ = fmt.Sprintf
