package mitm

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"matchlock.dev/matchlock/netstack"
)

// rig runs a Proxy against an upstream httptest server named example.com
// (its certificate's name). Each guest connection is a loopback TCP pair
// whose server half is handed to Intercept as the Flow's Guest.
type rig struct {
	t      *testing.T
	p      *Proxy
	up     *httptest.Server
	pool   *x509.CertPool // trusts the sandbox CA
	mu     sync.Mutex
	events []netstack.Event
	dials  int
}

func newRig(t *testing.T, h http.Handler, hosts []string) *rig {
	t.Helper()
	up := httptest.NewUnstartedServer(h)
	up.EnableHTTP2 = true
	up.StartTLS()
	t.Cleanup(up.Close)
	roots := x509.NewCertPool()
	roots.AddCert(up.Certificate())
	r := &rig{t: t, up: up}
	p, err := New(Config{
		Secrets: []Secret{{Name: "API_KEY", Placeholder: phA, Value: valA, Hosts: hosts}},
		RootCAs: roots,
		Log: func(e netstack.Event) {
			r.mu.Lock()
			r.events = append(r.events, e)
			r.mu.Unlock()
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	r.p = p
	r.pool = x509.NewCertPool()
	if !r.pool.AppendCertsFromPEM(p.CACert()) {
		t.Fatal("CA PEM")
	}
	return r
}

// conn starts a flow to name:port of the given kind and returns the guest's
// end, and a channel closed when Intercept returned (with its result).
func (r *rig) conn(name string, port uint16, kind string) (net.Conn, chan bool) {
	r.t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		r.t.Fatal(err)
	}
	defer l.Close()
	guest, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		r.t.Fatal(err)
	}
	side, err := l.Accept()
	if err != nil {
		r.t.Fatal(err)
	}
	r.t.Cleanup(func() { guest.Close(); side.Close() })
	upAddr := r.up.Listener.Addr().String()
	f := &netstack.Flow{Name: name, Port: port, Kind: kind, Guest: side,
		Dial: func(ctx context.Context) (net.Conn, error) {
			r.mu.Lock()
			r.dials++
			r.mu.Unlock()
			var d net.Dialer
			return d.DialContext(ctx, "tcp", upAddr)
		}}
	res := make(chan bool, 1)
	go func() {
		ok := r.p.Intercept(context.Background(), f)
		if !ok {
			side.Close()
		}
		res <- ok
	}()
	return guest, res
}

func (r *rig) client(name string, port uint16, h2 bool) *http.Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			c, _ := r.conn(name, port, "tls")
			return c, nil
		},
		TLSClientConfig:   &tls.Config{RootCAs: r.pool, ServerName: name},
		ForceAttemptHTTP2: h2,
	}
	if !h2 {
		tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
	}
	r.t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}
}

func (r *rig) hasEvent(sub string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, e := range r.events {
		if strings.Contains(e.Reason, sub) {
			return true
		}
	}
	return false
}

func (r *rig) noValueLogged() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, e := range r.events {
		if strings.Contains(e.Reason, valA) || strings.Contains(e.Reason, "sk-real") {
			r.t.Errorf("event quotes the secret: %+v", e)
		}
	}
}

// echoHandler reports what the upstream received.
func echoHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		fmt.Fprintf(w, "proto=%s host=%s auth=%s key=%s query=%s body=%s", r.Proto, r.Host,
			r.Header.Get("Authorization"), r.Header.Get("X-Key"), r.URL.Query().Get("k"), b)
	})
}

func get(t *testing.T, c *http.Client, url string, hdr map[string]string, body string) (int, string) {
	t.Helper()
	var rd io.Reader
	method := "GET"
	if body != "" {
		rd, method = strings.NewReader(body), "POST"
	}
	req, _ := http.NewRequest(method, url, rd)
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestSubstituteH1AndH2(t *testing.T) {
	r := newRig(t, echoHandler(), []string{"example.com"})
	port := uint16(r.up.Listener.Addr().(*net.TCPAddr).Port)
	for _, h2 := range []bool{false, true} {
		c := r.client("example.com", port, h2)
		url := fmt.Sprintf("https://example.com:%d/v1?k=%s", port, phA)
		code, body := get(t, c, url, map[string]string{"Authorization": "Bearer " + phA, "X-Key": phA}, "raw "+phA)
		if code != 200 {
			t.Fatalf("h2=%v: %d %s", h2, code, body)
		}
		want := fmt.Sprintf("auth=Bearer %s key=%s query=%s body=raw %s", valA, valA, valA, phA)
		if !strings.Contains(body, want) {
			t.Fatalf("h2=%v: upstream saw %q, want %q", h2, body, want)
		}
		// Keep-alive: a second request on the same guest connection.
		if code, body = get(t, c, fmt.Sprintf("https://example.com:%d/again", port), nil, ""); code != 200 {
			t.Fatalf("second request: %d %s", code, body)
		}
		// Upstream speaks h2 whatever the guest spoke.
		if !strings.HasPrefix(body, "proto=HTTP/2.0") {
			t.Errorf("upstream proto: %.20s", body)
		}
	}
	if !r.hasEvent("secret API_KEY substituted") || !r.hasEvent("TLS terminated (h2)") || !r.hasEvent("TLS terminated (http/1.1)") {
		t.Errorf("events %+v", r.events)
	}
	if s := r.p.Stats(); s.TLSIntercepted != 2 || s.Substituted != 2 || s.Requests != 4 {
		t.Errorf("stats %+v", s)
	}
	// Upstream connections are pooled across guest connections.
	if r.dials > 1 {
		t.Errorf("%d upstream dials for 2 guest connections", r.dials)
	}
	r.noValueLogged()
}

func TestBlocked(t *testing.T) {
	r := newRig(t, echoHandler(), []string{"example.com:1"}) // bound to another port
	port := uint16(r.up.Listener.Addr().(*net.TCPAddr).Port)
	// Not bound on this port: TLS passes through untouched.
	g, res := r.conn("example.com", port, "tls")
	if <-res {
		t.Fatal("intercepted TLS to a host without secrets")
	}
	g.Close()

	r2 := newRig(t, echoHandler(), []string{"example.com", "*.example.com"})
	port = uint16(r2.up.Listener.Addr().(*net.TCPAddr).Port)
	c := r2.client("example.com", port, false)
	// Host differs from SNI/the connection's name.
	req, _ := http.NewRequest("GET", fmt.Sprintf("https://example.com:%d/", port), nil)
	req.Host = "www.example.com"
	req.Header.Set("X-Key", phA)
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 403 || strings.Contains(string(b), valA) {
		t.Fatalf("Host mismatch: %d %q", resp.StatusCode, b)
	}
	// Placeholder in the path.
	if code, _ := get(t, c, fmt.Sprintf("https://example.com:%d/%s", port, phA), nil, ""); code != 403 {
		t.Fatalf("path placeholder: %d", code)
	}
	// Plain HTTP with a placeholder: refused, never substituted.
	g, res = r2.conn("example.com", port, "http")
	fmt.Fprintf(g, "GET /?k=%s HTTP/1.1\r\nHost: example.com\r\n\r\n", phA)
	resp, err = http.ReadResponse(bufio.NewReader(g), nil)
	if err != nil || resp.StatusCode != 403 {
		t.Fatalf("plain HTTP placeholder: %v %v", resp, err)
	}
	g.Close()
	<-res
	if !r2.hasEvent("plain-HTTP") || !r2.hasEvent("does not name") || !r2.hasEvent("URL path") {
		t.Errorf("events %+v", r2.events)
	}
	if s := r2.p.Stats(); s.Blocked != 3 {
		t.Errorf("stats %+v", s)
	}
	r2.noValueLogged()
}

func TestHeaderTooLarge(t *testing.T) {
	r := newRig(t, echoHandler(), []string{"example.com"})
	port := uint16(r.up.Listener.Addr().(*net.TCPAddr).Port)
	g, res := r.conn("example.com", port, "http")
	defer g.Close()
	fmt.Fprintf(g, "GET / HTTP/1.1\r\nHost: example.com\r\nX-Big: %s\r\n\r\n", strings.Repeat("a", MaxHeaderBytes+8192))
	resp, err := http.ReadResponse(bufio.NewReader(g), nil)
	if err != nil || resp.StatusCode != 431 {
		t.Fatalf("big head: %v %v", resp, err)
	}
	g.Close()
	<-res
}

func TestStreamingAndWebSocket(t *testing.T) {
	release := make(chan struct{})
	mux := http.NewServeMux()
	mux.HandleFunc("/sse", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: first\n\n")
		w.(http.Flusher).Flush()
		<-release
		io.WriteString(w, "data: last\n\n")
	})
	mux.HandleFunc("/ws", func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") != "websocket" || r.Header.Get("X-Key") != valA {
			http.Error(w, "bad upgrade", 400)
			return
		}
		c, brw, err := w.(http.Hijacker).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
		line, _ := brw.ReadString('\n')
		io.WriteString(c, "echo "+line)
	})
	mux.HandleFunc("/big", func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.Copy(io.Discard, r.Body)
		fmt.Fprintf(w, "%d", n)
	})
	r := newRig(t, mux, []string{"example.com"})
	port := uint16(r.up.Listener.Addr().(*net.TCPAddr).Port)

	// SSE: the first event arrives before the server finishes.
	c := r.client("example.com", port, true)
	resp, err := c.Get(fmt.Sprintf("https://example.com:%d/sse", port))
	if err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(resp.Body)
	if line, err := br.ReadString('\n'); err != nil || line != "data: first\n" {
		t.Fatalf("first event %q %v", line, err)
	}
	close(release)
	rest, _ := io.ReadAll(br)
	resp.Body.Close()
	if !strings.Contains(string(rest), "data: last") {
		t.Fatalf("rest %q", rest)
	}

	// A 64 MiB streamed upload (chunked) is not buffered.
	pr, pw := io.Pipe()
	go func() {
		buf := make([]byte, 1<<20)
		for i := 0; i < 64; i++ {
			pw.Write(buf)
		}
		pw.Close()
	}()
	resp, err = c.Post(fmt.Sprintf("https://example.com:%d/big", port), "application/octet-stream", pr)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(b) != fmt.Sprint(64<<20) {
		t.Fatalf("upload: %q", b)
	}

	// WebSocket upgrade over HTTP/1.1 TLS, with the secret in a header.
	g, res := r.conn("example.com", port, "tls")
	tc := tls.Client(g, &tls.Config{RootCAs: r.pool, ServerName: "example.com", NextProtos: []string{"http/1.1"}})
	fmt.Fprintf(tc, "GET /ws HTTP/1.1\r\nHost: example.com:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nX-Key: %s\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", port, phA)
	tbr := bufio.NewReader(tc)
	resp, err = http.ReadResponse(tbr, nil)
	if err != nil || resp.StatusCode != 101 {
		t.Fatalf("upgrade: %v %v", resp, err)
	}
	io.WriteString(tc, "ping\n")
	tc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if line, err := tbr.ReadString('\n'); err != nil || line != "echo ping\n" {
		t.Fatalf("ws echo %q %v", line, err)
	}
	tc.Close()
	select {
	case <-res:
	case <-time.After(5 * time.Second):
		t.Fatal("Intercept did not return after the WebSocket closed")
	}
}
