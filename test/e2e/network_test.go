package e2e

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha1"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"matchlock.dev/matchlock/netstack/policy"
)

// The secret's real value: it must reach the servers it is bound to and
// never the guest.
const realKey = "real-key-7Hq2zP9w"

// testPKI is a CA and a server certificate for the test names.
type testPKI struct {
	caPEM  []byte
	server tls.Certificate
}

func newTestPKI(t *testing.T) *testPKI {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "matchlock e2e test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "api.test"},
		DNSNames:    []string{"api.test", "other.test", "third.test", "port.test", "*.wild.test"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:   time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	return &testPKI{
		caPEM:  pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}),
		server: tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key},
	}
}

// seen is what the upstream servers received.
type seen struct {
	mu   sync.Mutex
	reqs []string // "proto host path key=... q=... user=... pass=..."
}

func (s *seen) add(line string) {
	s.mu.Lock()
	s.reqs = append(s.reqs, line)
	s.mu.Unlock()
}

func (s *seen) all() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return strings.Join(s.reqs, "\n")
}

// classify says whether v is the real value, a placeholder or absent,
// so that the guest only ever hears about the value, never sees it.
func classify(v string) string {
	switch {
	case v == "":
		return "none"
	case v == realKey:
		return "real"
	case strings.HasPrefix(v, "SANDBOX_SECRET_"):
		return "placeholder"
	}
	return "other"
}

func echoHandler(rec *seen) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		user, pass, _ := r.BasicAuth()
		line := fmt.Sprintf("%s %s %s key=%s q=%s user=%s pass=%s", r.Proto, r.Host, r.URL.Path,
			r.Header.Get("X-Key"), r.URL.Query().Get("k"), user, pass)
		rec.add(line)
		if r.URL.Path == "/ws" {
			serveWS(w, r)
			return
		}
		io.Copy(io.Discard, r.Body)
		fmt.Fprintf(w, "proto=%s key=%s q=%s pass=%s", r.Proto, classify(r.Header.Get("X-Key")),
			classify(r.URL.Query().Get("k")), classify(pass))
	})
}

// serveWS is a minimal WebSocket echo: one frame in, one frame back with
// what the X-Key header of the upgrade was.
func serveWS(w http.ResponseWriter, r *http.Request) {
	if !strings.EqualFold(r.Header.Get("Upgrade"), "websocket") {
		http.Error(w, "not an upgrade", 400)
		return
	}
	c, brw, err := w.(http.Hijacker).Hijack()
	if err != nil {
		return
	}
	defer c.Close()
	sum := sha1.Sum([]byte(r.Header.Get("Sec-WebSocket-Key") + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
	fmt.Fprintf(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n",
		base64.StdEncoding.EncodeToString(sum[:]))
	c.SetDeadline(time.Now().Add(10 * time.Second))
	var h [2]byte
	if _, err := io.ReadFull(brw, h[:]); err != nil {
		return
	}
	n := int(h[1] & 0x7f)
	var mask [4]byte
	io.ReadFull(brw, mask[:])
	p := make([]byte, n)
	io.ReadFull(brw, p)
	for i := range p {
		p[i] ^= mask[i%4]
	}
	out := string(p) + " key=" + classify(r.Header.Get("X-Key"))
	c.Write(append([]byte{0x81, byte(len(out))}, out...))
}

func tcpEcho(t *testing.T, addr string) int {
	t.Helper()
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); io.Copy(c, c) }()
		}
	}()
	return l.Addr().(*net.TCPAddr).Port
}

// fakeDNS counts every datagram that reaches it (it should get none).
func fakeDNS(t *testing.T) (int, *atomic.Int64) {
	t.Helper()
	pc, err := net.ListenPacket("udp4", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	var n atomic.Int64
	go func() {
		b := make([]byte, 1500)
		for {
			if _, _, err := pc.ReadFrom(b); err != nil {
				return
			}
			n.Add(1)
		}
	}()
	return pc.LocalAddr().(*net.UDPAddr).Port, &n
}

// hostIPv4 is a non-loopback address of this machine (reachable by
// address from the sandbox with the right patterns), or "".
func hostIPv4() string {
	addrs, _ := net.InterfaceAddrs()
	for _, a := range addrs {
		ipn, ok := a.(*net.IPNet)
		if !ok {
			continue
		}
		ip := ipn.IP.To4()
		if ip == nil || ip.IsLoopback() || ip.IsLinkLocalUnicast() || ip[0] == 10 && ip[1] == 213 || ip[0] == 198 && ip[1]&0xfe == 18 {
			continue
		}
		return ip.String()
	}
	return ""
}

// trustTestCA makes the matchlock processes (and their supervisors) trust
// the test CA besides the system's.
func trustTestCA(t *testing.T, pki *testPKI) {
	t.Helper()
	sys, _ := os.ReadFile("/etc/ssl/certs/ca-certificates.crt")
	bundle := filepath.Join(t.TempDir(), "bundle.pem")
	if err := os.WriteFile(bundle, append(append(sys, '\n'), pki.caPEM...), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv("SSL_CERT_FILE", bundle)
}

type netEnv struct {
	t                          *testing.T
	id                         string
	tlsPort, httpPort, tcpPort int
	rec                        *seen
}

func (e *netEnv) sh(script string) result {
	e.t.Helper()
	return ml(e.t, nil, "exec", e.id, "sh", "-c", script)
}

// ok runs a guest script that must succeed with stdout containing want.
func (e *netEnv) ok(script, want string) string {
	e.t.Helper()
	r := e.sh(script)
	if r.code != 0 || !strings.Contains(r.stdout, want) {
		e.t.Errorf("%s: exit %d, stdout %q (want %q), stderr %q", script, r.code, r.stdout, want, r.stderr)
	}
	if strings.Contains(r.stdout+r.stderr, realKey) {
		e.t.Errorf("%s: the guest saw the real secret value", script)
	}
	return r.stdout
}

// fails runs a guest script that must fail.
func (e *netEnv) fails(script string) {
	e.t.Helper()
	r := e.sh(script)
	if r.code == 0 {
		e.t.Errorf("%s: succeeded: %q", script, r.stdout)
	}
	if strings.Contains(r.stdout+r.stderr, realKey) {
		e.t.Errorf("%s: the guest saw the real secret value", script)
	}
}

func TestNetworkPolicyAndSecrets(t *testing.T) {
	pki := newTestPKI(t)
	trustTestCA(t, pki)
	rec := &seen{}

	tlsSrv := httptest.NewUnstartedServer(echoHandler(rec))
	tlsSrv.TLS = &tls.Config{Certificates: []tls.Certificate{pki.server}}
	tlsSrv.EnableHTTP2 = true
	tlsSrv.StartTLS()
	defer tlsSrv.Close()
	httpSrv := httptest.NewServer(echoHandler(rec))
	defer httpSrv.Close()
	tlsPort := tlsSrv.Listener.Addr().(*net.TCPAddr).Port
	httpPort := httpSrv.Listener.Addr().(*net.TCPAddr).Port
	tcpPort := tcpEcho(t, "127.0.0.1:0")
	dnsPort, dnsHits := fakeDNS(t)

	names := []string{"api.test", "other.test", "third.test", "port.test", "x.wild.test", "wild.test",
		"denied.test", "api.test.evil.test", "evil-api.test"}
	args := []string{"run", "-d", "--image", "busybox",
		"--allow-host", "api.test,third.test,*.wild.test,port.test:" + fmt.Sprint(httpPort),
		"--allow-private", "api.test,other.test,third.test,*.wild.test,port.test",
		"--secret", "API_KEY=" + realKey + "@api.test",
		"--secret", "OTHER_KEY=other-value@other.test",
	}
	for _, n := range names {
		args = append(args, "--add-host", n+":127.0.0.1")
	}
	hostIP := hostIPv4()
	var ipPorts [4]int
	if hostIP != "" {
		for i := range ipPorts {
			ipPorts[i] = tcpEcho(t, hostIP+":0")
		}
		mask := net.ParseIP(hostIP).To4().Mask(net.CIDRMask(24, 32)).String()
		args = append(args,
			"--add-host", "ipname.test:"+hostIP,
			// by address: port 0 by IP, port 1 by CIDR, port 2 allowed
			// but not private-allowed; ipname.test by name only.
			"--allow-host", fmt.Sprintf("%s:%d,%s/24:%d,%s:%d,ipname.test:%d", hostIP, ipPorts[0], mask, ipPorts[1], hostIP, ipPorts[2], ipPorts[3]),
			"--allow-private", fmt.Sprintf("%s:%d,%s:%d,ipname.test", hostIP, ipPorts[0], hostIP, ipPorts[1]))
	}
	r := mustRun(t, args...)
	id := strings.TrimSpace(r.stdout)
	defer ml(t, nil, "rm", "-f", id)
	guestHTTPClient(t, id)
	e := &netEnv{t: t, id: id, tlsPort: tlsPort, httpPort: httpPort, tcpPort: tcpPort, rec: rec}
	api := fmt.Sprintf("https://api.test:%d", tlsPort)

	t.Run("guest sees placeholders only", func(t *testing.T) {
		out := e.ok(`echo "$API_KEY $OTHER_KEY"; env`, "SANDBOX_SECRET_")
		if strings.Contains(out, realKey) || strings.Contains(out, "other-value") {
			t.Fatalf("real value in the guest env: %q", out)
		}
		e.ok(`test -s /etc/ssl/matchlock-ca.pem && grep -c 'BEGIN CERT' /etc/ssl/certs/ca-certificates.crt && echo "$SSL_CERT_FILE $NODE_EXTRA_CA_CERTS"`,
			"/etc/ssl/certs/ca-certificates.crt /etc/ssl/matchlock-ca.pem")
	})

	t.Run("substitution", func(t *testing.T) {
		// Header, query and Basic credentials; h2 to the guest and upstream.
		out := e.ok(fmt.Sprintf(`netprobe req -H "X-Key: $API_KEY" "https://u:$API_KEY@api.test:%d/sub?k=$API_KEY"`, tlsPort), "200 HTTP/2.0")
		if !strings.Contains(out, "proto=HTTP/2.0 key=real q=real pass=real") {
			t.Errorf("upstream did not get the value everywhere: %q", out)
		}
		// HTTP/1.1 with a body: the body is not rewritten.
		out = e.ok(fmt.Sprintf(`netprobe req -h1 -H "X-Key: $API_KEY" -d "body $API_KEY" %s/h1`, api), "200 HTTP/1.1")
		if !strings.Contains(out, "key=real") {
			t.Errorf("h1: %q", out)
		}
		if got := rec.all(); !strings.Contains(got, "HTTP/2.0 api.test:"+fmt.Sprint(tlsPort)+" /sub key="+realKey+" q="+realKey+" user=u pass="+realKey) {
			t.Errorf("server saw %q", got)
		}
		// WebSocket over TLS with the secret in the upgrade request.
		e.ok(fmt.Sprintf(`netprobe ws -H "X-Key: $API_KEY" wss://api.test:%d/ws hello`, tlsPort), "hello key=real")
		// Plain-HTTP WebSocket without a secret passes the proxy.
		e.ok(fmt.Sprintf(`netprobe ws ws://api.test:%d/ws plain`, httpPort), "plain key=none")
	})

	t.Run("placeholder bypasses blocked", func(t *testing.T) {
		// To an allowed host it is not bound to (other.test has its own
		// secret, so the proxy terminates its TLS).
		e.ok(fmt.Sprintf(`netprobe req -H "X-Key: $API_KEY" https://other.test:%d/x`, tlsPort), "403")
		// SNI names api.test, Host another name: refused.
		e.ok(fmt.Sprintf(`netprobe req -sni api.test -host other.test -H "X-Key: $API_KEY" %s/front`, api), "403")
		// SNI other than the name connected to: reset by the forwarder.
		e.fails(fmt.Sprintf(`netprobe req -sni other.test %s/sni`, api))
		// Plain HTTP to the bound host: never substituted.
		e.ok(fmt.Sprintf(`netprobe req -H "X-Key: $API_KEY" http://api.test:%d/plain`, httpPort), "403")
		e.ok(fmt.Sprintf(`netprobe req "http://api.test:%d/plainq?k=$API_KEY"`, httpPort), "403")
		// A placeholder in the path is not substituted: refused.
		e.ok(fmt.Sprintf(`netprobe req "%s/p/$API_KEY"`, api), "403")
		// TLS to an allowed host without secrets passes through untouched:
		// the server sees the placeholder, never the value.
		out := e.ok(fmt.Sprintf(`netprobe req -k -H "X-Key: $API_KEY" https://third.test:%d/pass`, tlsPort), "200")
		if !strings.Contains(out, "key=placeholder") {
			t.Errorf("passthrough: %q", out)
		}
		for _, line := range strings.Split(rec.all(), "\n") {
			if strings.Contains(line, realKey) && !strings.Contains(line, "api.test:") {
				t.Errorf("the value reached another host: %q", line)
			}
			if strings.Contains(line, "other-value") {
				t.Errorf("OTHER_KEY was sent: %q", line)
			}
		}
	})

	// Raw payloads start with "@", not an HTTP token character, so the
	// forwarder sees at once that they are not HTTP.
	t.Run("patterns", func(t *testing.T) {
		e.ok(fmt.Sprintf("netprobe get http://api.test:%d/name", httpPort), "200 ")
		e.ok(fmt.Sprintf("netprobe tcp api.test:%d @raw-echo", tcpPort), "@raw-echo")
		e.ok(fmt.Sprintf("netprobe get http://x.wild.test:%d/wild", httpPort), "200 ")
		e.fails(fmt.Sprintf("netprobe get http://wild.test:%d/apex", httpPort))
		e.ok(fmt.Sprintf("netprobe get http://port.test:%d/port", httpPort), "200 ")
		e.fails(fmt.Sprintf("netprobe tcp port.test:%d 0other-port", tcpPort))
		e.fails(fmt.Sprintf("netprobe get http://denied.test:%d/", httpPort))
		// other.test is allowed only through its secret's host list.
		e.ok(fmt.Sprintf("netprobe tcp other.test:%d @via-secret-host", tcpPort), "@via-secret-host")
		// Suffix and label tricks.
		e.fails("netprobe resolve api.test.evil.test")
		e.fails("netprobe resolve evil-api.test")
		e.fails(fmt.Sprintf("netprobe get http://api.test.evil.test:%d/", httpPort))
		e.fails(fmt.Sprintf("netprobe get http://evil-api.test:%d/", httpPort))
		// Host header of another name on an allowed connection.
		e.fails(fmt.Sprintf("netprobe req -host denied.test http://api.test:%d/", httpPort))
		if hostIP == "" {
			t.Log("no non-loopback IPv4 on this host: IP/CIDR checks skipped")
			return
		}
		e.ok(fmt.Sprintf("netprobe tcp %s:%d by-ip", hostIP, ipPorts[0]), "by-ip")
		e.ok(fmt.Sprintf("netprobe tcp %s:%d by-cidr", hostIP, ipPorts[1]), "by-cidr")
		if policy.IsPrivate(netip.MustParseAddr(hostIP)) {
			e.fails(fmt.Sprintf("netprobe tcp %s:%d 0allowed-not-private", hostIP, ipPorts[2]))
		} else {
			// Not a private address (e.g. a documentation range): the
			// --allow-host pattern is enough.
			e.ok(fmt.Sprintf("netprobe tcp %s:%d @public", hostIP, ipPorts[2]), "@public")
		}
		e.ok(fmt.Sprintf("netprobe tcp ipname.test:%d @by-name", ipPorts[3]), "@by-name")
		// The allowed name's real address, by number: refused.
		e.fails(fmt.Sprintf("netprobe tcp %s:%d 0by-number", hostIP, ipPorts[3]))
	})

	t.Run("bypass classes", func(t *testing.T) {
		e.fails("netprobe resolve denied.test")
		r := e.sh("netprobe dns 10.213.0.1:53 denied.test")
		if !strings.Contains(r.stdout, "rcode=3 answers=0") {
			t.Errorf("DNS for a denied name: %q %q", r.stdout, r.stderr)
		}
		e.fails(fmt.Sprintf("netprobe dns 127.0.0.1:%d denied.test", dnsPort))
		if hostIP != "" {
			e.fails(fmt.Sprintf("netprobe dns %s:%d denied.test", hostIP, dnsPort))
		}
		e.fails("netprobe dns 8.8.8.8:53 api.test")
		e.fails("netprobe udp 8.8.8.8:53 x")
		e.fails("netprobe tcp [2001:db8::1]:80 x")
		for _, a := range []string{"10.213.0.1:22", "10.213.0.1:80", "10.213.0.3:80", "10.0.0.1:80", "169.254.169.254:80",
			"100.64.0.1:80", "192.168.1.1:80", "172.16.0.1:80", "127.0.0.1:80"} {
			e.fails("netprobe tcp " + a + " x")
		}
		// A synthetic address nobody was given.
		e.fails("netprobe tcp 198.18.255.254:80 x")
		if n := dnsHits.Load(); n != 0 {
			t.Errorf("the fake upstream resolver got %d datagrams", n)
		}
	})

	t.Run("visibility", func(t *testing.T) {
		log, err := os.ReadFile(filepath.Join(stateDir, "sandboxes", id, "network.log"))
		if err != nil {
			t.Fatal(err)
		}
		for _, want := range []string{"secret API_KEY substituted", "blocked: secret API_KEY is not bound to other.test",
			"plain-HTTP", "TLS terminated (h2)", "deny dns denied.test", "deny udp 8.8.8.8:53", "intercepted"} {
			if !strings.Contains(string(log), want) {
				t.Errorf("network.log lacks %q", want)
			}
		}
		if strings.Contains(string(log), realKey) || strings.Contains(string(log), "other-value") {
			t.Error("network.log holds a secret value")
		}
		r := mustRun(t, "inspect", id)
		for _, want := range []string{`"network"`, `"Substituted"`, `"Blocked"`, `"ConnsDenied"`} {
			if !strings.Contains(r.stdout, want) {
				t.Errorf("inspect lacks %s: %s", want, r.stdout)
			}
		}
		if strings.Contains(r.stdout, realKey) {
			t.Error("inspect shows a secret value")
		}
	})
}

// TestLogNetworkShowsMITM runs one short-lived sandbox with --log-network.
func TestLogNetworkShowsMITM(t *testing.T) {
	pki := newTestPKI(t)
	trustTestCA(t, pki)
	rec := &seen{}
	srv := httptest.NewUnstartedServer(echoHandler(rec))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{pki.server}}
	srv.StartTLS()
	defer srv.Close()
	port := srv.Listener.Addr().(*net.TCPAddr).Port
	f, err := os.Open(netprobe(t))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r := ml(t, f, "run", "-i", "--log-network", "--image", "busybox", "--add-host", "api.test:127.0.0.1",
		"--allow-private", "api.test", "--secret", "API_KEY="+realKey+"@api.test",
		"sh", "-c", fmt.Sprintf(`cat > /bin/netprobe && chmod +x /bin/netprobe && netprobe req -H "X-Key: $API_KEY" https://api.test:%d/ && netprobe req -H "X-Key: $API_KEY" http://api.test:%d/`, port, port))
	if !strings.Contains(r.stdout, "key=real") {
		t.Errorf("stdout %q stderr %q", r.stdout, r.stderr)
	}
	for _, want := range []string{"matchlock: net allow https api.test:", "TLS terminated", "secret API_KEY substituted"} {
		if !strings.Contains(r.stderr, want) {
			t.Errorf("--log-network output lacks %q:\n%s", want, r.stderr)
		}
	}
	if strings.Contains(r.stdout+r.stderr, realKey) {
		t.Error("the value was printed")
	}
}
