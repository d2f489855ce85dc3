// Package mitm is the sandbox's secrets proxy: a netstack.Interceptor that
// terminates the guest's TLS to hosts a secret is bound to, with a
// per-sandbox CA, swaps secret placeholders for the real values in request
// heads, and forwards the requests to the real server over TLS verified
// against the host's trust store.
//
// What it handles (see docs/network.md, "Secrets"):
//
//   - TLS to a name some secret is bound to (on that port): terminated.
//     ALPN offers h2 and http/1.1 to the guest; upstream speaks h2 or
//     HTTP/1.1, connections are pooled per sandbox and dialled through
//     Flow.Dial (policy re-checked). Keep-alive, chunked and streaming
//     bodies (never buffered), SSE and WebSocket upgrades (HTTP/1.1) pass.
//   - Plain HTTP/1 to any allowed name: proxied request by request, without
//     substitution; each request's Host must be the connection's name and a
//     request carrying a placeholder is refused with 403.
//   - Everything else (TLS to names without secrets, other protocols) is
//     handed back to the forwarder untouched.
//
// A placeholder is replaced in header values, in "Basic" credentials
// (decoded, replaced, re-encoded) and in the query string, only when the
// TLS SNI, the request's Host (or :authority) and one of the secret's host
// patterns all name the destination. A request carrying a placeholder that
// may not be sent there is refused with 403 and logged. Bodies and trailers
// are never rewritten. Real values are never logged: messages that could
// quote them are scrubbed.
package mitm

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"

	"matchlock.dev/matchlock/netstack"
	"matchlock.dev/matchlock/netstack/policy"
)

// Limits.
const (
	// MaxHeaderBytes bounds a request head from the guest (HTTP/1 and h2).
	MaxHeaderBytes = 64 << 10
	// HandshakeTimeout bounds the guest's TLS handshake.
	HandshakeTimeout = 10 * time.Second
	// IdleTimeout closes a guest connection without requests for so long.
	IdleTimeout = 5 * time.Minute
	// MaxBlockEventsPerSecond bounds the refusal Events logged (the guest
	// decides how many it causes); the rest are only counted.
	MaxBlockEventsPerSecond = 50
)

// Secret is one value the proxy may substitute.
type Secret struct {
	Name        string   // for messages (the guest's variable name)
	Placeholder string   // what the guest sees (SANDBOX_SECRET_ + 32 hex)
	Value       string   // the real value; host memory only
	Hosts       []string // netstack/policy patterns it may be sent to
}

// Config configures a Proxy.
type Config struct {
	Secrets []Secret
	// Policy, if set, is re-checked for every request (the allow list can
	// shrink while a connection lives).
	Policy *policy.Policy
	// Log receives the proxy's decisions (Proto "https" or "http").
	Log func(netstack.Event)
	// RootCAs verifies upstream servers; nil means the host's trust store
	// (x509.SystemCertPool, which honours SSL_CERT_FILE).
	RootCAs *x509.CertPool
}

// Stats counts the proxy's decisions.
type Stats struct {
	TLSIntercepted uint64 // guest TLS connections terminated
	TLSFailed      uint64 // guest TLS handshakes that failed
	PlainHTTP      uint64 // plain-HTTP connections proxied
	Passed         uint64 // connections handed back to the forwarder
	Requests       uint64 // requests proxied or refused
	Substituted    uint64 // requests with at least one secret swapped in
	Blocked        uint64 // requests refused (403)
	UpstreamErrors uint64 // requests answered 502
}

// Proxy is one sandbox's secrets proxy.
type Proxy struct {
	cfg       Config
	subs      *substituter
	ca        *authority
	transport *http.Transport
	h2        *http2.Server
	errLog    *log.Logger
	limit     limiter

	tlsIntercepted, tlsFailed, plain, passed  atomic.Uint64
	requests, substituted, blocked, upstreamE atomic.Uint64
}

// New makes a Proxy with a fresh CA.
func New(cfg Config) (*Proxy, error) {
	subs, err := newSubstituter(cfg.Secrets)
	if err != nil {
		return nil, err
	}
	ca, err := newAuthority(permittedNames(cfg.Secrets))
	if err != nil {
		return nil, fmt.Errorf("mitm: CA: %w", err)
	}
	p := &Proxy{cfg: cfg, subs: subs, ca: ca, errLog: log.New(io.Discard, "", 0)}
	p.limit.perSecond = MaxBlockEventsPerSecond
	p.transport = &http.Transport{
		Proxy:                  nil,
		DialContext:            p.dialUpstream,
		TLSClientConfig:        &tls.Config{RootCAs: cfg.RootCAs, MinVersion: tls.VersionTLS12},
		ForceAttemptHTTP2:      true,
		MaxIdleConns:           64,
		MaxIdleConnsPerHost:    8,
		IdleConnTimeout:        90 * time.Second,
		TLSHandshakeTimeout:    10 * time.Second,
		ExpectContinueTimeout:  time.Second,
		MaxResponseHeaderBytes: 1 << 20,
		DisableCompression:     true, // pass Accept-Encoding and bodies through as they are
	}
	p.h2 = &http2.Server{MaxConcurrentStreams: 100, IdleTimeout: IdleTimeout}
	return p, nil
}

// permittedNames are the CA's name constraints: the names and domains of
// the secrets' host patterns, or nil (no constraint) when a pattern is "*".
func permittedNames(secrets []Secret) []string {
	var out []string
	seen := map[string]bool{}
	for _, s := range secrets {
		for _, h := range s.Hosts {
			pol, err := policy.Parse([]string{h}, nil)
			if err != nil {
				continue
			}
			allow, _ := pol.Patterns()
			for _, pat := range allow {
				host := pat
				if i := indexPort(host); i >= 0 {
					host = host[:i]
				}
				switch {
				case host == "*":
					return nil
				case len(host) > 2 && host[:2] == "*.":
					host = host[2:]
				}
				if _, err := policy.CanonicalName(host); err != nil {
					continue // an IP pattern: never intercepted
				}
				if !seen[host] {
					seen[host] = true
					out = append(out, host)
				}
			}
		}
	}
	if len(out) == 0 {
		return nil
	}
	return out
}

// indexPort finds the ":port" of a canonical name pattern (-1 if none or an
// IPv6 form).
func indexPort(pat string) int {
	for i := len(pat) - 1; i >= 0; i-- {
		switch c := pat[i]; {
		case c == ':':
			if i > 0 && pat[i-1] == ']' || countByte(pat, ':') > 1 {
				return -1
			}
			return i
		case c < '0' || c > '9':
			return -1
		}
	}
	return -1
}

func countByte(s string, b byte) int {
	n := 0
	for i := 0; i < len(s); i++ {
		if s[i] == b {
			n++
		}
	}
	return n
}

// CACert returns the sandbox CA's certificate (PEM) for the guest's trust
// store.
func (p *Proxy) CACert() []byte { return p.ca.pem() }

// Stats returns a snapshot of the counters.
func (p *Proxy) Stats() Stats {
	return Stats{
		TLSIntercepted: p.tlsIntercepted.Load(),
		TLSFailed:      p.tlsFailed.Load(),
		PlainHTTP:      p.plain.Load(),
		Passed:         p.passed.Load(),
		Requests:       p.requests.Load(),
		Substituted:    p.substituted.Load(),
		Blocked:        p.blocked.Load(),
		UpstreamErrors: p.upstreamE.Load(),
	}
}

// Close drops the pooled upstream connections.
func (p *Proxy) Close() { p.transport.CloseIdleConnections() }

// Intercept is the netstack.Interceptor.
func (p *Proxy) Intercept(ctx context.Context, f *netstack.Flow) bool {
	switch {
	case f.Kind == "tls" && p.subs.bound(f.Name, f.Port):
		p.serveTLS(ctx, f)
		return true
	case f.Kind == "http":
		p.plain.Add(1)
		fc := &flowCtx{target: target{name: f.Name, port: f.Port}, dial: f.Dial}
		p.serveHTTP1(ctx, f.Guest, p.handler(fc))
		return true
	}
	p.passed.Add(1)
	return false
}

// flowCtx is one guest connection the proxy serves.
type flowCtx struct {
	target
	proto string // for Events: "https" or "http"
	dial  func(context.Context) (net.Conn, error)
}

type flowKey struct{}

func (p *Proxy) serveTLS(ctx context.Context, f *netstack.Flow) {
	var sni string
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS12,
		NextProtos: []string{"h2", "http/1.1"},
		GetCertificate: func(hi *tls.ClientHelloInfo) (*tls.Certificate, error) {
			sni = hi.ServerName
			// The forwarder checked that the SNI, if any, is the name.
			return p.ca.leaf(f.Name)
		},
	}
	tc := tls.Server(f.Guest, cfg)
	tc.SetDeadline(time.Now().Add(HandshakeTimeout))
	err := tc.HandshakeContext(ctx)
	tc.SetDeadline(time.Time{})
	if err != nil {
		p.tlsFailed.Add(1)
		p.log(netstack.Event{Proto: "https", Name: f.Name, Port: f.Port, Verdict: netstack.Deny,
			Reason: "mitm: TLS handshake with the guest failed (does it trust the sandbox CA?): " + err.Error()})
		tc.Close()
		return
	}
	p.tlsIntercepted.Add(1)
	fc := &flowCtx{
		target: target{name: f.Name, port: f.Port, tls: true, sniOK: sameName(sni, f.Name)},
		proto:  "https",
		dial:   f.Dial,
	}
	st := tc.ConnectionState()
	p.log(netstack.Event{Proto: "https", Name: f.Name, Port: f.Port, Verdict: netstack.Allow,
		Reason: "mitm: TLS terminated (" + alpnName(st.NegotiatedProtocol) + ")"})
	h := p.handler(fc)
	if st.NegotiatedProtocol == "h2" {
		stop := context.AfterFunc(ctx, func() { tc.Close() })
		defer stop()
		p.h2.ServeConn(tc, &http2.ServeConnOpts{
			Context:    ctx,
			Handler:    h,
			BaseConfig: &http.Server{MaxHeaderBytes: MaxHeaderBytes, ErrorLog: p.errLog},
		})
		tc.Close()
		return
	}
	p.serveHTTP1(ctx, tc, h)
}

func alpnName(p string) string {
	if p == "" {
		return "http/1.1"
	}
	return p
}

// serveHTTP1 runs an HTTP/1 server on one connection until it is closed
// (including after a hijack for an upgrade, once the splice ended).
func (p *Proxy) serveHTTP1(ctx context.Context, c net.Conn, h http.Handler) {
	nc := &notifyConn{Conn: c, closed: make(chan struct{})}
	l := &oneListener{c: nc, done: make(chan struct{})}
	srv := &http.Server{
		Handler:           h,
		MaxHeaderBytes:    MaxHeaderBytes,
		ReadHeaderTimeout: time.Minute,
		IdleTimeout:       IdleTimeout,
		ErrorLog:          p.errLog,
		BaseContext:       func(net.Listener) context.Context { return ctx },
	}
	go srv.Serve(l)
	select {
	case <-nc.closed:
	case <-ctx.Done():
	}
	srv.Close()
	nc.Close()
}

// handler serves the requests of one guest connection.
func (p *Proxy) handler(fc *flowCtx) http.Handler {
	if fc.proto == "" {
		fc.proto = "http"
	}
	scheme := "http"
	if fc.tls {
		scheme = "https"
	}
	authority := net.JoinHostPort(fc.name, strconv.Itoa(int(fc.port)))
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL.Scheme = scheme
			pr.Out.URL.Host = authority
			pr.Out.Host = pr.In.Host
		},
		Transport:     p.transport,
		FlushInterval: -1, // stream: flush every write (SSE, long polls)
		ErrorLog:      p.errLog,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			p.upstreamE.Add(1)
			var ue *url.Error
			if errors.As(err, &ue) {
				err = ue.Err // its text quotes the URL, query included
			}
			msg := p.subs.scrub(err.Error())
			p.log(netstack.Event{Proto: fc.proto, Name: fc.name, Port: fc.port, Verdict: netstack.Deny,
				Reason: fmt.Sprintf("mitm: %s %s: upstream: %s", r.Method, r.URL.Path, msg)})
			if errors.Is(err, context.Canceled) {
				return
			}
			http.Error(w, "matchlock: upstream error: "+msg, http.StatusBadGateway)
		},
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.requests.Add(1)
		if reason := p.check(r, fc); reason != "" {
			p.refuse(w, r, fc, reason)
			return
		}
		v := p.subs.rewrite(r.Header, r.URL, fc.target)
		if v.block != "" {
			p.refuse(w, r, fc, v.block)
			return
		}
		if len(v.used) > 0 {
			p.substituted.Add(1)
			p.log(netstack.Event{Proto: fc.proto, Name: fc.name, Port: fc.port, Verdict: netstack.Allow,
				Reason: fmt.Sprintf("mitm: %s %s: secret %s substituted", r.Method, r.URL.Path, joinNames(v.used))})
		}
		rp.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), flowKey{}, fc)))
	})
}

// check refuses requests that do not go where the connection goes.
func (p *Proxy) check(r *http.Request, fc *flowCtx) string {
	if !sameName(hostOnly(r.Host), fc.name) {
		return fmt.Sprintf("Host %q does not name %s", clip(r.Host), fc.name)
	}
	if r.Method == http.MethodConnect {
		return "CONNECT is not proxied"
	}
	if p.cfg.Policy != nil && !p.cfg.Policy.AllowName(fc.name, fc.port) {
		return fmt.Sprintf("%s:%d is no longer allowed", fc.name, fc.port)
	}
	return ""
}

func (p *Proxy) refuse(w http.ResponseWriter, r *http.Request, fc *flowCtx, reason string) {
	p.blocked.Add(1)
	p.log(netstack.Event{Proto: fc.proto, Name: fc.name, Port: fc.port, Verdict: netstack.Deny,
		Reason: fmt.Sprintf("mitm: %s %s: blocked: %s", r.Method, clip(r.URL.Path), reason)})
	w.Header().Set("Connection", "close")
	http.Error(w, "matchlock: request blocked: "+reason, http.StatusForbidden)
}

func clip(s string) string {
	if len(s) > 200 {
		return s[:200] + "..."
	}
	return s
}

func joinNames(n []string) string {
	out := ""
	for i, s := range n {
		if i > 0 {
			out += ","
		}
		out += s
	}
	return out
}

// dialUpstream is the Transport's dialer: the flow of the request that
// needs a connection dials it, through the forwarder (policy re-checked).
func (p *Proxy) dialUpstream(ctx context.Context, network, addr string) (net.Conn, error) {
	fc, ok := ctx.Value(flowKey{}).(*flowCtx)
	if !ok {
		return nil, errors.New("mitm: dial outside a flow")
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil || host != fc.name || port != strconv.Itoa(int(fc.port)) {
		return nil, fmt.Errorf("mitm: dial %s from a flow to %s:%d", addr, fc.name, fc.port)
	}
	return fc.dial(ctx)
}

func (p *Proxy) log(e netstack.Event) {
	if p.cfg.Log == nil {
		return
	}
	if e.Verdict == netstack.Deny && !p.limit.allow() {
		return
	}
	if e.Time.IsZero() {
		e.Time = time.Now()
	}
	e.Reason = p.subs.scrub(e.Reason)
	p.cfg.Log(e)
}

// notifyConn closes closed when the connection is closed.
type notifyConn struct {
	net.Conn
	once   sync.Once
	closed chan struct{}
}

func (c *notifyConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { close(c.closed) })
	return err
}

// oneListener accepts one connection, then blocks until closed.
type oneListener struct {
	mu   sync.Mutex
	c    net.Conn
	done chan struct{}
	once sync.Once
}

func (l *oneListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	c := l.c
	l.c = nil
	l.mu.Unlock()
	if c != nil {
		return c, nil
	}
	<-l.done
	return nil, net.ErrClosed
}

func (l *oneListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *oneListener) Addr() net.Addr { return &net.TCPAddr{IP: net.IPv4(10, 213, 0, 1)} }

// limiter allows perSecond events per wall-clock second.
type limiter struct {
	perSecond int64
	mu        sync.Mutex
	second    int64
	n         int64
}

func (d *limiter) allow() bool {
	now := time.Now().Unix()
	d.mu.Lock()
	defer d.mu.Unlock()
	if now != d.second {
		d.second, d.n = now, 0
	}
	d.n++
	return d.n <= d.perSecond
}
