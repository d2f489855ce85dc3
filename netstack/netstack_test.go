package netstack

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"matchlock.dev/matchlock/netstack/internal/testguest"
	"matchlock.dev/matchlock/netstack/policy"
)

func TestSealedByDefault(t *testing.T) {
	e := newEnv(t, nil, nil)
	echo := newEchoServer(t)
	e.res.set("api.openai.com", "203.0.113.10")
	for _, n := range []string{"api.openai.com", "localhost", "example.com", "x"} {
		if rc, ip := e.lookup(n); rc != dnsmessage.RCodeNameError || ip.IsValid() {
			t.Errorf("lookup %s: %v %v, want NXDOMAIN", n, rc, ip)
		}
	}
	for _, dst := range []netip.AddrPort{
		ap("203.0.113.7:443"),
		ap("203.0.113.10:443"),
		ap("10.0.0.1:80"),
		ap("198.18.0.5:443"),
		ap("8.8.8.8:53"),
		ap("169.254.169.254:80"),
	} {
		e.mustRefuse(dst)
	}
	if c := e.res.Calls(); len(c) != 0 {
		t.Errorf("sealed stack resolved %q", c)
	}
	if c := e.dialer.Calls(); len(c) != 0 {
		t.Errorf("sealed stack dialled %q", c)
	}
	if echo.conns.Load() != 0 {
		t.Error("loopback server got a connection")
	}
	if !e.hasEvent(func(ev Event) bool { return ev.Proto == "tcp" && ev.Verdict == Deny && ev.Port == 443 }) {
		t.Error("no deny event logged")
	}
	if s := e.st.Stats(); s.ConnsDenied < 6 || s.ConnsAllowed != 0 {
		t.Errorf("stats %+v", s)
	}
}

func TestAllowedNameNeedsAllowPrivateForLoopback(t *testing.T) {
	echo := newEchoServer(t)
	port := echo.port()

	// Allowed but resolving to loopback: refused at DNS time.
	e := newEnv(t, []string{"svc.test"}, nil)
	e.res.set("svc.test", "127.0.0.1")
	if rc, _ := e.lookup("svc.test"); rc != dnsmessage.RCodeNameError {
		t.Fatalf("svc.test without allow-private: %v", rc)
	}
	if len(e.dialer.Calls()) != 0 {
		t.Fatal("dialled")
	}

	// With --allow-private for it: reachable through its synthetic address.
	e2 := newEnv(t, []string{"svc.test"}, []string{"svc.test"})
	e2.res.set("svc.test", "127.0.0.1")
	ip := e2.mustResolve("svc.test")
	if ip2 := e2.mustResolve("SVC.test."); ip2 != ip {
		t.Fatalf("synthetic address not stable: %s %s", ip, ip2)
	}
	e2.mustEcho(netip.AddrPortFrom(ip, port))
	if n, ok := e2.st.SyntheticName(ip); !ok || n != "svc.test" {
		t.Fatalf("SyntheticName = %q %v", n, ok)
	}
	// Dialled by number, on the host's own resolution, never the synthetic IP.
	for _, c := range e2.dialer.Calls() {
		if c != fmt.Sprintf("127.0.0.1:%d", port) {
			t.Fatalf("dialled %q", c)
		}
	}
	// The resolver was asked at DNS time and again at connect time.
	if n := len(e2.res.Calls()); n < 3 {
		t.Fatalf("resolver calls %q", e2.res.Calls())
	}
	// Taking allow-private away at run time refuses new connections.
	if err := e2.st.Policy().RemovePrivate("svc.test"); err != nil {
		t.Fatal(err)
	}
	e2.mustRefuse(netip.AddrPort(netip.AddrPortFrom(ip, port)))
	if !e2.hasEvent(func(ev Event) bool {
		return ev.Verdict == Deny && strings.Contains(ev.Reason, "private")
	}) {
		t.Fatal("no private-address deny event")
	}
}

func TestDNSRebindingRefused(t *testing.T) {
	echo := newEchoServer(t)
	e := newEnv(t, []string{"rebind.test"}, nil)
	e.res.set("rebind.test", "203.0.113.9")
	ip := e.mustResolve("rebind.test")
	// The name now resolves to loopback: the connect-time check refuses it.
	e.res.set("rebind.test", "127.0.0.1", "::ffff:10.0.0.1")
	e.mustRefuse(netip.AddrPortFrom(ip, echo.port()))
	if c := e.dialer.Calls(); len(c) != 0 {
		t.Fatalf("dialled %q", c)
	}
}

func TestPortRestricted(t *testing.T) {
	echo := newEchoServer(t)
	other := newEchoServer(t)
	e := newEnv(t, []string{fmt.Sprintf("svc.test:%d", echo.port())}, []string{fmt.Sprintf("svc.test:%d", echo.port())})
	e.res.set("svc.test", "127.0.0.1")
	ip := e.mustResolve("svc.test")
	e.mustEcho(netip.AddrPortFrom(ip, echo.port()))
	e.mustRefuse(netip.AddrPortFrom(ip, other.port()))
	if other.conns.Load() != 0 {
		t.Fatal("restricted port reached")
	}
	// A pattern for another port of another name changes nothing.
	if err := e.st.Policy().Add(fmt.Sprintf("else.test:%d", other.port())); err != nil {
		t.Fatal(err)
	}
	e.mustRefuse(netip.AddrPortFrom(ip, other.port()))
	// Adding the port at run time opens it, once both lists name it.
	if err := e.st.Policy().AddPrivate(fmt.Sprintf("svc.test:%d", other.port())); err != nil {
		t.Fatal(err)
	}
	e.mustRefuse(netip.AddrPortFrom(ip, other.port())) // allow-private alone allows nothing
	if err := e.st.Policy().Add(fmt.Sprintf("svc.test:%d", other.port())); err != nil {
		t.Fatal(err)
	}
	e.mustEcho(netip.AddrPortFrom(ip, other.port()))
}

func TestCIDRRules(t *testing.T) {
	echo := newEchoServer(t)
	e := newEnv(t, []string{"203.0.113.0/24:5432", "198.51.100.7", "10.9.9.0/24"}, []string{"10.9.9.9:6379"})
	loop := fmt.Sprintf("127.0.0.1:%d", echo.port())
	e.dialer.redirect["203.0.113.7:5432"] = loop
	e.dialer.redirect["203.0.113.255:5432"] = loop
	e.dialer.redirect["198.51.100.7:22"] = loop
	e.dialer.redirect["10.9.9.9:6379"] = loop

	e.mustEcho(ap("203.0.113.7:5432"))
	e.mustEcho(ap("203.0.113.255:5432"))
	e.mustEcho(ap("198.51.100.7:22"))
	e.mustRefuse(ap("203.0.113.7:5433"))
	e.mustRefuse(ap("203.0.114.7:5432"))
	e.mustRefuse(ap("198.51.100.8:22"))
	// Private by address: only what allow-private names.
	e.mustEcho(ap("10.9.9.9:6379"))
	e.mustRefuse(ap("10.9.9.8:6379"))
	e.mustRefuse(ap("10.9.9.9:6380"))
	// Loopback destinations never arrive from a real guest (its kernel keeps
	// them); the stack drops them as martians.

	want := map[string]bool{"203.0.113.7:5432": true, "203.0.113.255:5432": true, "198.51.100.7:22": true, "10.9.9.9:6379": true}
	for _, c := range e.dialer.Calls() {
		if !want[c] {
			t.Errorf("unexpected dial %q", c)
		}
	}
	if len(e.res.Calls()) != 0 {
		t.Errorf("IP rules resolved names: %q", e.res.Calls())
	}

	// allow-host alone does not open a private address.
	e2 := newEnv(t, []string{"10.0.0.0/8", "169.254.169.254"}, nil)
	e2.mustRefuse(ap("10.1.2.3:80"))
	e2.mustRefuse(ap("169.254.169.254:80"))
	if len(e2.dialer.Calls()) != 0 {
		t.Error("dialled a private address")
	}
	// Nor does allow-private alone.
	e3 := newEnv(t, nil, []string{"10.9.9.9:6379", "svc.test"})
	e3.res.set("svc.test", "127.0.0.1")
	e3.mustRefuse(ap("10.9.9.9:6379"))
	if rc, _ := e3.lookup("svc.test"); rc != dnsmessage.RCodeNameError {
		t.Errorf("allow-private alone: DNS %v, want NXDOMAIN", rc)
	}
	if len(e3.dialer.Calls()) != 0 {
		t.Error("allow-private alone dialled")
	}
}

func TestRealIPOfAllowedNameRefused(t *testing.T) {
	e := newEnv(t, []string{"api.test"}, nil)
	e.res.set("api.test", "203.0.113.10")
	e.dialer.redirect["203.0.113.10:443"] = "127.0.0.1:1" // would be used if dialled
	ip := e.mustResolve("api.test")
	if ip == netip.MustParseAddr("203.0.113.10") {
		t.Fatal("answered the real address")
	}
	e.mustRefuse(ap("203.0.113.10:443"))
	// An unassigned synthetic address is refused too.
	e.mustRefuse(netip.AddrPortFrom(ip.Next(), 443))
	if c := e.dialer.Calls(); len(c) != 0 {
		t.Fatalf("dialled %q", c)
	}
}

func TestDialFailureResets(t *testing.T) {
	dead := freePort(t)
	e := newEnv(t, []string{"svc.test"}, []string{"svc.test"})
	e.res.set("svc.test", "127.0.0.1")
	ip := e.mustResolve("svc.test")
	e.mustRefuse(netip.AddrPortFrom(ip, dead))
	if !e.hasEvent(func(ev Event) bool { return ev.Verdict == Deny && strings.Contains(ev.Reason, "dial") }) {
		t.Fatal("no dial-failure event")
	}
	// A name whose lookup fails at connect time is refused too.
	e.res.mu.Lock()
	delete(e.res.table, "svc.test")
	e.res.mu.Unlock()
	e.mustRefuse(netip.AddrPortFrom(ip, dead))
}

func TestTLSSNI(t *testing.T) {
	echo := newEchoServer(t)
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, "tls ok")
	}))
	defer srv.Close()
	tlsPort := uint16(srv.Listener.Addr().(*net.TCPAddr).Port)
	e := newEnv(t, []string{"svc.test"}, []string{"svc.test"})
	e.res.set("svc.test", "127.0.0.1")
	ip := e.mustResolve("svc.test")

	// Matching SNI: a real TLS exchange works.
	get := func(sni string) (string, error) {
		c, err := e.dial(netip.AddrPortFrom(ip, tlsPort))
		if err != nil {
			return "", err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		tc := tls.Client(c, &tls.Config{ServerName: sni, InsecureSkipVerify: true})
		if err := tc.Handshake(); err != nil {
			return "", err
		}
		fmt.Fprintf(tc, "GET / HTTP/1.1\r\nHost: svc.test\r\nConnection: close\r\n\r\n")
		b, err := io.ReadAll(tc)
		return string(b), err
	}
	if body, err := get("svc.test"); err != nil || !strings.HasSuffix(body, "tls ok") {
		t.Fatalf("SNI svc.test: %q %v", body, err)
	}
	if body, err := get("SVC.Test"); err != nil || !strings.HasSuffix(body, "tls ok") {
		t.Fatalf("SNI SVC.Test: %q %v", body, err)
	}
	if _, err := get("other.test"); err == nil {
		t.Fatal("SNI other.test was forwarded")
	}

	// Raw ClientHellos against the echo server: nothing reaches it on a
	// mismatch.
	cases := []struct {
		hello   []byte
		forward bool
	}{
		{clientHello("svc.test"), true},
		{clientHello(), true}, // no SNI
		{clientHello("svc.test."), true},
		{clientHello("evil.test"), false},
		{clientHello("svc.test.evil.test"), false},
		{clientHello("evil-svc.test"), false},
		{clientHello("x.svc.test"), false},
		{clientHello("svc.test\x00"), false},
		{clientHello("svc.test\x00.evil.test"), false},
		{clientHello("svc.test", "evil.test"), false},                        // two host names
		{clientHello("svc.test")[:20], false},                                // truncated, then EOF
		{append([]byte{0x16, 3, 1, 0, 5}, 2, 0, 0, 1, 0), false},             // not a ClientHello
		{append([]byte{0x16, 3, 1, 0x40, 0x01}, make([]byte, 10)...), false}, // record too long
	}
	for i, tc := range cases {
		before := echo.bytes.Load()
		c, err := e.dial(netip.AddrPortFrom(ip, echo.port()))
		if err != nil {
			t.Fatalf("case %d: dial: %v", i, err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		c.Write(tc.hello)
		c.(interface{ CloseWrite() error }).CloseWrite()
		got, err := io.ReadAll(c)
		c.Close()
		if tc.forward {
			if err != nil || string(got) != string(tc.hello) {
				t.Errorf("case %d: forwarded hello not echoed: %v (%d bytes)", i, err, len(got))
			}
		} else {
			if err == nil && len(got) > 0 {
				t.Errorf("case %d: mismatching hello echoed", i)
			}
			time.Sleep(20 * time.Millisecond)
			if n := echo.bytes.Load() - before; n != 0 {
				t.Errorf("case %d: %d bytes reached the server", i, n)
			}
		}
	}
	if !e.hasEvent(func(ev Event) bool { return ev.Verdict == Deny && strings.Contains(ev.Reason, "SNI") }) {
		t.Error("no SNI deny event")
	}
}

func TestHTTPHost(t *testing.T) {
	var hits atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		fmt.Fprintf(w, "host=%s", r.Host)
	}))
	defer srv.Close()
	port := uint16(srv.Listener.Addr().(*net.TCPAddr).Port)
	e := newEnv(t, []string{"svc.test"}, []string{"svc.test"})
	e.res.set("svc.test", "127.0.0.1")
	ip := e.mustResolve("svc.test")

	send := func(req string) (string, error) {
		c, err := e.dial(netip.AddrPortFrom(ip, port))
		if err != nil {
			return "", err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.WriteString(c, req); err != nil {
			return "", err
		}
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return string(b), err
	}
	hostPort := fmt.Sprintf("svc.test:%d", port)
	ok := []string{
		"GET / HTTP/1.1\r\nHost: svc.test\r\nConnection: close\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: " + hostPort + "\r\nConnection: close\r\n\r\n",
		"GET / HTTP/1.1\r\nhost:SVC.TEST.\r\nConnection: close\r\n\r\n",
		"GET / HTTP/1.0\r\nHost: svc.test\r\n\r\n",
		"GET http://svc.test/ HTTP/1.1\r\nHost: svc.test\r\nConnection: close\r\n\r\n",
		"POST /x HTTP/1.1\r\nHost: svc.test\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
	}
	for _, req := range ok {
		body, err := send(req)
		if err != nil || !strings.HasPrefix(body, "host=") {
			t.Errorf("%q: %q %v", req, body, err)
		}
	}
	before := hits.Load()
	bad := []string{
		"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: svc.test.evil.test\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: evil-svc.test\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: x.svc.test\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: svc.test\x00.evil.test\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: svc.test\r\nHost: evil.test\r\n\r\n",
		"GET / HTTP/1.1\r\nUser-Agent: x\r\n\r\n",
		"GET http://evil.test/ HTTP/1.1\r\nHost: svc.test\r\n\r\n",
		"GET http://user@evil.test:80/ HTTP/1.1\r\nHost: svc.test\r\n\r\n",
		"CONNECT evil.test:443 HTTP/1.1\r\nHost: svc.test\r\n\r\n",
		"\r\n\r\nGET / HTTP/1.1\r\nHost: evil.test\r\n\r\n",
		"get / HTTP/1.1\r\nHost: evil.test\r\n\r\n",
		"GET / HTTP/1.1\r\nHost : evil.test\r\n\r\n",
		"GET / HTTP/1.1\r\nX: y\r\n Host: evil.test\r\n\r\n",
		"GET / HTTP/1.1\nHost: evil.test\n\n",
		"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: svc.test\r\n" + strings.Repeat("X-Pad: aaaaaaaaaaaaaaaaaaaaaaaa\r\n", 800) + "\r\n",
	}
	for _, req := range bad {
		if body, err := send(req); err == nil {
			t.Errorf("%q was forwarded: %q", req, body)
		}
	}
	if n := hits.Load() - before; n != 0 {
		t.Fatalf("%d mismatching requests reached the server", n)
	}
	if !e.hasEvent(func(ev Event) bool { return ev.Verdict == Deny && strings.Contains(ev.Reason, "Host") }) {
		t.Error("no Host deny event")
	}
}

func TestNonHTTPPassesAndServerSpeaksFirst(t *testing.T) {
	// A server that greets first (like SSH or SMTP) must not wait for the
	// inspection, with or without an interceptor (which never sees it).
	for _, withInterceptor := range []bool{false, true} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			io.WriteString(c, "SSH-2.0-test\r\n")
			line, _ := bufio.NewReader(c).ReadString('\n')
			io.WriteString(c, "got "+line)
		}()
		port := uint16(ln.Addr().(*net.TCPAddr).Port)
		var offered atomic.Bool
		e := newEnv(t, []string{"ssh.test"}, []string{"ssh.test"}, func(c *Config) {
			if withInterceptor {
				c.Interceptor = func(ctx context.Context, f *Flow) bool {
					offered.Store(true)
					f.Guest.Close()
					return true
				}
			}
		})
		e.res.set("ssh.test", "127.0.0.1")
		ip := e.mustResolve("ssh.test")
		c, err := e.dial(netip.AddrPortFrom(ip, port))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		r := bufio.NewReader(c)
		greet, err := r.ReadString('\n')
		if err != nil || greet != "SSH-2.0-test\r\n" {
			t.Fatalf("greeting %q %v", greet, err)
		}
		io.WriteString(c, "SSH-2.0-client\r\n")
		reply, err := r.ReadString('\n')
		if err != nil || reply != "got SSH-2.0-client\r\n" {
			t.Fatalf("reply %q %v", reply, err)
		}
		if offered.Load() {
			t.Fatal("a server-first connection was offered to the interceptor")
		}
	}
}

func TestUDPDropped(t *testing.T) {
	e := newEnv(t, []string{"*"}, nil)
	q := buildQuery(t, "example.com", dnsmessage.TypeA)
	for _, dst := range []netip.AddrPort{ap("8.8.8.8:53"), ap("1.1.1.1:53"), ap("10.213.0.1:5353"), ap("10.213.0.3:53"), ap("198.18.0.1:53")} {
		if _, err := e.g.Exchange(dst, q, 300*time.Millisecond); err != os.ErrDeadlineExceeded {
			t.Errorf("UDP to %s: %v, want no reply", dst, err)
		}
	}
	if c := e.res.Calls(); len(c) != 0 {
		t.Errorf("resolver called: %q", c)
	}
	if c := e.dialer.Calls(); len(c) != 0 {
		t.Errorf("dialer called: %q", c)
	}
	if s := e.st.Stats(); s.DroppedUDP < 5 {
		t.Errorf("DroppedUDP = %d", s.DroppedUDP)
	}
	if !e.hasEvent(func(ev Event) bool {
		return ev.Proto == "udp" && ev.IP == netip.MustParseAddr("8.8.8.8") && ev.Port == 53
	}) {
		t.Error("no UDP deny event")
	}
	// The gateway's DNS still works.
	e.res.set("example.com", "203.0.113.1")
	e.mustResolve("example.com")
}

func TestDNSDeniedNeverReachesResolver(t *testing.T) {
	e := newEnv(t, []string{"api.test", "*.wild.test"}, nil)
	e.res.set("api.test", "203.0.113.10")
	e.res.set("a.wild.test", "203.0.113.11")
	denied := [][]byte{
		buildQuery(t, "denied.test.", dnsmessage.TypeA),
		buildQuery(t, "api.test.evil.test.", dnsmessage.TypeA),
		buildQuery(t, "evil-api.test.", dnsmessage.TypeA),
		buildQuery(t, "x.api.test.", dnsmessage.TypeA),
		buildQuery(t, "wild.test.", dnsmessage.TypeA),
		buildQuery(t, "evilwild.test.", dnsmessage.TypeA),
		rawQuery("api", "test\x00", "evil", "test"),
		rawQuery("api\x00", "test"),
		rawQuery("api", "test "),
		rawQuery("a*", "wild", "test"),
		rawQuery("*", "wild", "test"),
	}
	for i, q := range denied {
		reply, err := e.g.Exchange(dnsServer, q, 3*time.Second)
		if err != nil {
			t.Fatalf("query %d: %v", i, err)
		}
		rc, ip := parseAnswer(t, reply)
		if (rc != dnsmessage.RCodeNameError && rc != dnsmessage.RCodeRefused) || ip.IsValid() {
			t.Errorf("query %d: %v %v", i, rc, ip)
		}
	}
	if c := e.res.Calls(); len(c) != 0 {
		t.Fatalf("denied queries reached the resolver: %q", c)
	}
	// AAAA of an allowed name: empty NOERROR, no lookup.
	reply, err := e.g.Exchange(dnsServer, buildQuery(t, "api.test.", dnsmessage.TypeAAAA), 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if rc, ip := parseAnswer(t, reply); rc != dnsmessage.RCodeSuccess || ip.IsValid() {
		t.Fatalf("AAAA: %v %v", rc, ip)
	}
	if c := e.res.Calls(); len(c) != 0 {
		t.Fatalf("AAAA looked up: %q", c)
	}
	e.mustResolve("api.test")
	e.mustResolve("a.wild.test")
	if c := e.res.Calls(); len(c) != 2 {
		t.Fatalf("resolver calls %q", c)
	}
}

func TestIPv6AndICMPDropped(t *testing.T) {
	e := newEnv(t, []string{"*"}, nil)
	// Make sure the link is up (the gateway answered ARP and DNS).
	e.res.set("example.com", "203.0.113.1")
	e.mustResolve("example.com")

	for i := 0; i < 3; i++ {
		if err := e.g.WriteFrame(ipv6Frame(testguest.DefaultMAC)); err != nil {
			t.Fatal(err)
		}
		icmp := ipv4Packet(testguest.DefaultIP, GatewayIP, uint8(header.ICMPv4ProtocolNumber), icmpEcho(), 0, 0)
		e.g.WriteFrame(ethFrame(testguest.DefaultMAC, DefaultGatewayMAC, header.IPv4ProtocolNumber, icmp))
		icmp2 := ipv4Packet(testguest.DefaultIP, netip.MustParseAddr("8.8.8.8"), uint8(header.ICMPv4ProtocolNumber), icmpEcho(), 0, 0)
		e.g.WriteFrame(ethFrame(testguest.DefaultMAC, DefaultGatewayMAC, header.IPv4ProtocolNumber, icmp2))
	}
	if !waitFor(2*time.Second, func() bool {
		s := e.st.Stats()
		return s.DroppedIPv6 >= 3 && s.DroppedICMP >= 6
	}) {
		t.Fatalf("stats %+v", e.st.Stats())
	}
	time.Sleep(200 * time.Millisecond)
	if n := e.g.Frames(isIPv6); n != 0 {
		t.Fatalf("%d IPv6 frames came back", n)
	}
	if n := e.g.Frames(isIPv4Proto(uint8(header.ICMPv4ProtocolNumber))); n != 0 {
		t.Fatalf("%d ICMP frames came back", n)
	}
	if len(e.dialer.Calls()) != 0 {
		t.Fatal("dialled")
	}
}

func TestSpoofAndFragmentsDropped(t *testing.T) {
	echo := newEchoServer(t)
	e := newEnv(t, []string{fmt.Sprintf("10.9.9.9:%d", echo.port())}, []string{fmt.Sprintf("10.9.9.9:%d", echo.port())})
	dst := netip.MustParseAddr("10.9.9.9")
	e.dialer.redirect[fmt.Sprintf("10.9.9.9:%d", echo.port())] = fmt.Sprintf("127.0.0.1:%d", echo.port())
	other := net.HardwareAddr{0x02, 0, 0, 0, 0, 9}
	frames := [][]byte{
		// Spoofed source IP.
		ethFrame(testguest.DefaultMAC, DefaultGatewayMAC, header.IPv4ProtocolNumber,
			ipv4Packet(netip.MustParseAddr("10.213.0.9"), dst, uint8(header.TCPProtocolNumber), tcpSYN(netip.MustParseAddr("10.213.0.9"), dst, echo.port()), 0, 0)),
		// Spoofed source MAC.
		ethFrame(other, DefaultGatewayMAC, header.IPv4ProtocolNumber,
			ipv4Packet(testguest.DefaultIP, dst, uint8(header.TCPProtocolNumber), tcpSYN(testguest.DefaultIP, dst, echo.port()), 0, 0)),
		// Fragment.
		ethFrame(testguest.DefaultMAC, DefaultGatewayMAC, header.IPv4ProtocolNumber,
			ipv4Packet(testguest.DefaultIP, dst, uint8(header.TCPProtocolNumber), tcpSYN(testguest.DefaultIP, dst, echo.port()), header.IPv4FlagMoreFragments, 0)),
		// UDP fragment to the DNS port.
		ethFrame(testguest.DefaultMAC, DefaultGatewayMAC, header.IPv4ProtocolNumber,
			ipv4Packet(testguest.DefaultIP, GatewayIP, uint8(header.UDPProtocolNumber), udpDatagram(53, []byte("x")), 0, 8)),
		// Not addressed to the gateway's MAC.
		ethFrame(testguest.DefaultMAC, other, header.IPv4ProtocolNumber,
			ipv4Packet(testguest.DefaultIP, dst, uint8(header.TCPProtocolNumber), tcpSYN(testguest.DefaultIP, dst, echo.port()), 0, 0)),
		// Unknown EtherType, runt IPv4, bogus IPv4 header.
		ethFrame(testguest.DefaultMAC, DefaultGatewayMAC, 0x88b5, []byte("hello")),
		ethFrame(testguest.DefaultMAC, DefaultGatewayMAC, header.IPv4ProtocolNumber, []byte{0x45, 0}),
		ethFrame(testguest.DefaultMAC, DefaultGatewayMAC, header.IPv4ProtocolNumber, make([]byte, 40)),
		// ARP claiming another sender.
		ethFrame(testguest.DefaultMAC, bcast, header.ARPProtocolNumber, arpRequest(other, netip.MustParseAddr("10.213.0.9"))),
	}
	for _, f := range frames {
		if err := e.g.WriteFrame(f); err != nil {
			t.Fatal(err)
		}
	}
	if !waitFor(2*time.Second, func() bool {
		s := e.st.Stats()
		return s.DroppedSpoofed >= 3 && s.DroppedFrag >= 2 && s.DroppedOther >= 4
	}) {
		t.Fatalf("stats %+v", e.st.Stats())
	}
	time.Sleep(100 * time.Millisecond)
	if echo.conns.Load() != 0 || len(e.dialer.Calls()) != 0 {
		t.Fatal("a dropped SYN was forwarded")
	}
	// The real guest still gets through.
	e.mustEcho(netip.AddrPortFrom(dst, echo.port()))
}

func TestGatewayAndSandboxNetRefused(t *testing.T) {
	e := newEnv(t, []string{"*"}, []string{"10.0.0.0/8"})
	for _, p := range []uint16{22, 80, 443, 8080, 54} {
		e.mustRefuse(netip.AddrPortFrom(GatewayIP, p))
	}
	for _, a := range []string{"10.213.0.3:80", "10.213.0.254:80", "10.213.0.0:80"} {
		e.mustRefuse(ap(a))
	}
	if c := e.dialer.Calls(); len(c) != 0 {
		t.Fatalf("dialled %q", c)
	}
	// DNS over TCP on the gateway works.
	e.res.set("example.com", "203.0.113.1")
	c, err := e.dial(dnsServer)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	q := buildQuery(t, "example.com.", dnsmessage.TypeA)
	c.Write(append(binary.BigEndian.AppendUint16(nil, uint16(len(q))), q...))
	var l [2]byte
	if _, err := io.ReadFull(c, l[:]); err != nil {
		t.Fatal(err)
	}
	msg := make([]byte, binary.BigEndian.Uint16(l[:]))
	if _, err := io.ReadFull(c, msg); err != nil {
		t.Fatal(err)
	}
	if rc, ip := parseAnswer(t, msg); rc != dnsmessage.RCodeSuccess || !policy.SyntheticPrefix.Contains(ip) {
		t.Fatalf("DNS over TCP: %v %v", rc, ip)
	}
}

func TestStarAllowsPublicNotPrivate(t *testing.T) {
	e := newEnv(t, []string{"*"}, nil)
	e.res.set("public.test", "203.0.113.5")
	e.res.set("internal.test", "10.0.0.5")
	e.res.set("meta.test", "169.254.169.254")
	echo := newEchoServer(t)
	e.dialer.redirect["203.0.113.5:443"] = fmt.Sprintf("127.0.0.1:%d", echo.port())
	e.dialer.redirect["203.0.113.6:443"] = fmt.Sprintf("127.0.0.1:%d", echo.port())
	ip := e.mustResolve("public.test")
	e.mustEcho(netip.AddrPortFrom(ip, 443))
	e.mustEcho(ap("203.0.113.6:443")) // "*" allows public addresses
	for _, n := range []string{"internal.test", "meta.test"} {
		if rc, _ := e.lookup(n); rc != dnsmessage.RCodeNameError {
			t.Errorf("%s: %v", n, rc)
		}
	}
	for _, a := range []string{"10.0.0.5:443", "169.254.169.254:80", "100.64.0.1:80", "198.18.200.1:443", "240.0.0.1:80"} {
		e.mustRefuse(ap(a))
	}
	// Multicast and "this host" never even make a connection attempt.
	for _, a := range []string{"224.0.0.1:80", "0.0.0.0:80"} {
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		if c, err := e.g.DialTCP(ctx, ap(a)); err == nil {
			c.Close()
			t.Errorf("connected to %s", a)
		}
		cancel()
	}
	for _, c := range e.dialer.Calls() {
		if c != "203.0.113.5:443" && c != "203.0.113.6:443" {
			t.Errorf("dialled %q", c)
		}
	}
}

func TestInterceptor(t *testing.T) {
	echo := newEchoServer(t)
	var seen atomic.Value
	e := newEnv(t, []string{"svc.test"}, []string{"svc.test"}, func(c *Config) {
		c.Interceptor = func(ctx context.Context, f *Flow) bool {
			seen.Store(fmt.Sprintf("%s:%d %s %q", f.Name, f.Port, f.Kind, f.Prefix))
			if f.Port != echo.port() {
				return false // not ours: the forwarder carries on
			}
			up, err := f.Dial(ctx)
			if err != nil {
				f.Guest.Close()
				return true
			}
			defer up.Close()
			defer f.Guest.Close()
			// Guest returns the inspected bytes first.
			line, _ := bufio.NewReader(f.Guest).ReadString('\n')
			io.WriteString(f.Guest, "intercepted "+line)
			io.WriteString(up, "x")
			b := make([]byte, 1)
			io.ReadFull(up, b) // the pre-dialled upstream works
			io.WriteString(f.Guest, "upstream said "+string(b)+"\n")
			return true
		}
	})
	e.res.set("svc.test", "127.0.0.1")
	ip := e.mustResolve("svc.test")
	c, err := e.dial(netip.AddrPortFrom(ip, echo.port()))
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: svc.test\r\n\r\n")
	b, _ := io.ReadAll(c)
	c.Close()
	if string(b) != "intercepted GET / HTTP/1.1\r\nupstream said x\n" {
		t.Fatalf("got %q", b)
	}
	if got := seen.Load(); got != fmt.Sprintf("svc.test:%d http %q", echo.port(), "GET / HTTP/1.1\r\nHost: svc.test\r\n\r\n") {
		t.Fatalf("flow %v", got)
	}
	if n := len(e.dialer.Calls()); n != 1 {
		t.Fatalf("%d dials, want 1 (the pre-dialled connection)", n)
	}
	if !e.hasEvent(func(ev Event) bool { return ev.Closed && ev.Reason == "intercepted" }) {
		t.Fatal("no intercepted event")
	}
	// Declined flows are forwarded as usual (the inspected bytes first).
	other := newEchoServer(t)
	e.mustEcho(netip.AddrPortFrom(ip, other.port()))
	// The inspection still applies before the interceptor: a wrong Host is
	// reset and never offered.
	seen.Store("")
	c, err = e.dial(netip.AddrPortFrom(ip, echo.port()))
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n")
	b, _ = io.ReadAll(c)
	c.Close()
	if len(b) != 0 || seen.Load() != "" {
		t.Fatalf("mismatched Host: got %q, offered %v", b, seen.Load())
	}
}

func TestHalfCloseAndEvents(t *testing.T) {
	echo := newEchoServer(t)
	e := newEnv(t, []string{"svc.test"}, []string{"svc.test"})
	e.res.set("svc.test", "127.0.0.1")
	ip := e.mustResolve("svc.test")
	c, err := e.dial(netip.AddrPortFrom(ip, echo.port()))
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	payload := strings.Repeat("0123456789", 100000) // 1 MB
	go func() {
		io.WriteString(c, payload)
		c.(interface{ CloseWrite() error }).CloseWrite()
	}()
	got, err := io.ReadAll(c)
	c.Close()
	if err != nil || string(got) != payload {
		t.Fatalf("echo after half-close: %d bytes, %v", len(got), err)
	}
	if !waitFor(2*time.Second, func() bool {
		return e.hasEvent(func(ev Event) bool {
			return ev.Closed && ev.Verdict == Allow && ev.Name == "svc.test" && ev.BytesUp == int64(len(payload)) && ev.BytesDown == int64(len(payload))
		})
	}) {
		t.Fatalf("no closing event with byte counts: %+v", e.Events())
	}
	if !e.hasEvent(func(ev Event) bool {
		return ev.Verdict == Allow && !ev.Closed && ev.Upstream == netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), echo.port())
	}) {
		t.Fatal("no allow event with the upstream address")
	}
	if !waitFor(2*time.Second, func() bool { return e.st.Stats().ConnsOpen == 0 }) {
		t.Fatalf("ConnsOpen = %d after close", e.st.Stats().ConnsOpen)
	}
}

func TestConnectionCap(t *testing.T) {
	echo := newEchoServer(t)
	e := newEnv(t, []string{"10.9.9.9:7"}, []string{"10.9.9.9:7"})
	e.dialer.redirect["10.9.9.9:7"] = fmt.Sprintf("127.0.0.1:%d", echo.port())
	e.st.conns = make(chan struct{}, 2) // a smaller cap, same code
	dst := ap("10.9.9.9:7")
	c1, err := e.dial(dst)
	if err != nil {
		t.Fatal(err)
	}
	c2, err := e.dial(dst)
	if err != nil {
		t.Fatal(err)
	}
	e.mustRefuse(dst)
	if !e.hasEvent(func(ev Event) bool { return strings.Contains(ev.Reason, "too many connections") }) {
		t.Fatal("no cap event")
	}
	c1.Close()
	c2.Close()
	if !waitFor(3*time.Second, func() bool { return e.st.Stats().ConnsOpen == 0 }) {
		t.Fatalf("slots not released: %d", e.st.Stats().ConnsOpen)
	}
	e.mustEcho(dst)
}

func TestMTU65520(t *testing.T) {
	echo := newEchoServer(t)
	e := newEnv(t, []string{"10.9.9.9:7"}, []string{"10.9.9.9:7"}, withMTU(65520))
	e.dialer.redirect["10.9.9.9:7"] = fmt.Sprintf("127.0.0.1:%d", echo.port())
	c, err := e.dial(ap("10.9.9.9:7"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	payload := make([]byte, 4<<20)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	go func() { c.Write(payload); c.(interface{ CloseWrite() error }).CloseWrite() }()
	got, err := io.ReadAll(c)
	if err != nil || string(got) != string(payload) {
		t.Fatalf("%d bytes, %v", len(got), err)
	}
	// Big frames were really used.
	if n := e.g.Frames(func(f []byte) bool { return len(f) > 9000 }); n == 0 {
		t.Fatal("no jumbo frames at MTU 65520")
	}
}

func TestHostileFrameLengths(t *testing.T) {
	host, guest, err := testguest.Socketpair()
	if err != nil {
		t.Fatal(err)
	}
	defer guest.Close()
	st, err := New(Config{Conn: host, GuestMAC: testguest.DefaultMAC, Resolver: &fakeResolver{}, Dialer: (&recDialer{t: t}).Dial})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	write := func(b []byte) {
		if _, err := guest.Write(b); err != nil {
			t.Fatal(err)
		}
	}
	frame := func(n uint32, body []byte) []byte {
		return append(binary.BigEndian.AppendUint32(nil, n), body...)
	}
	// Too long for the MTU (skipped without reading it into memory), too
	// short for Ethernet, then a valid ARP request: the link survives.
	write(frame(1500+14+1, make([]byte, 1515)))
	write(frame(60000, make([]byte, 60000)))
	write(frame(3, []byte{1, 2, 3}))
	write(frame(0, nil))
	arp := ethFrame(testguest.DefaultMAC, bcast, header.ARPProtocolNumber,
		arpRequest(testguest.DefaultMAC, testguest.DefaultIP))
	write(frame(uint32(len(arp)), arp))
	guest.SetReadDeadline(time.Now().Add(3 * time.Second))
	var l [4]byte
	if _, err := io.ReadFull(guest, l[:]); err != nil {
		t.Fatalf("no ARP reply: %v", err)
	}
	n := binary.BigEndian.Uint32(l[:])
	reply := make([]byte, n)
	if _, err := io.ReadFull(guest, reply); err != nil {
		t.Fatal(err)
	}
	if header.Ethernet(reply).Type() != header.ARPProtocolNumber {
		t.Fatalf("reply type %v", header.Ethernet(reply).Type())
	}
	if s := st.Stats().Link; s.RxBadLength != 4 {
		t.Fatalf("link stats %+v", s)
	}
	// A length no QEMU would send ends the link.
	write([]byte{0xff, 0xff, 0xff, 0xff})
	select {
	case <-st.Done():
	case <-time.After(3 * time.Second):
		t.Fatal("a 4 GiB frame length did not stop the link")
	}
	if st.Err() == nil {
		t.Fatal("Err() is nil after a corrupt stream")
	}
}

func TestGuestGoneStopsStack(t *testing.T) {
	e := newEnv(t, nil, nil)
	e.g.Close()
	select {
	case <-e.st.Done():
	case <-time.After(3 * time.Second):
		t.Fatal("stack did not notice the guest end closing")
	}
}

func TestNewValidates(t *testing.T) {
	host, guest, _ := testguest.Socketpair()
	defer host.Close()
	defer guest.Close()
	bad := []Config{
		{},
		{Conn: host},
		{Conn: host, GuestMAC: net.HardwareAddr{1, 0, 0, 0, 0, 1}}, // multicast
		{Conn: host, GuestMAC: testguest.DefaultMAC, GatewayMAC: testguest.DefaultMAC},
		{Conn: host, GuestMAC: testguest.DefaultMAC, MTU: 100},
		{Conn: host, GuestMAC: testguest.DefaultMAC, MTU: 65521},
	}
	for i, c := range bad {
		if st, err := New(c); err == nil {
			st.Close()
			t.Errorf("config %d accepted", i)
		}
	}
}

func arpRequest(mac net.HardwareAddr, ip netip.Addr) []byte {
	b := make([]byte, header.ARPSize)
	a := header.ARP(b)
	a.SetIPv4OverEthernet()
	a.SetOp(header.ARPRequest)
	copy(a.HardwareAddressSender(), mac)
	ip4 := ip.As4()
	copy(a.ProtocolAddressSender(), ip4[:])
	gw := GatewayIP.As4()
	copy(a.ProtocolAddressTarget(), gw[:])
	return b
}

var _ = context.Background

var bcast = net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
