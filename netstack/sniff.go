package netstack

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"

	"matchlock.dev/matchlock/netstack/policy"
)

// Bounds on what the forwarder reads from the guest before it forwards a
// byte of a connection to a name.
const (
	// MaxClientHello bounds the TLS handshake bytes read to find the SNI
	// (records included). A ClientHello is normally under 2 KiB.
	MaxClientHello = 32 << 10
	// MaxHTTPHead bounds the HTTP/1 request head read to find Host.
	MaxHTTPHead = 16 << 10
)

var errMismatch = errors.New("destination mismatch")

// inspect reads the start of a guest connection to name and checks that a
// TLS ClientHello names the same server (SNI equal to name, or absent) and
// that an HTTP/1 request head's Host (and absolute-form target) is name. It
// returns the bytes read, to be forwarded first. Anything else passes
// unchecked. A non-nil error means: reset the connection.
func inspect(r io.Reader, name string) ([]byte, error) {
	buf := make([]byte, 0, 2048)
	// Read until there is a byte that is not CR or LF (HTTP servers skip
	// leading empty lines, so they must not hide a request from us).
	for {
		i := 0
		for i < len(buf) && (buf[i] == '\r' || buf[i] == '\n') {
			i++
		}
		if i < len(buf) {
			break
		}
		if len(buf) >= MaxHTTPHead {
			return buf, errors.New("only empty lines")
		}
		var err error
		if buf, err = readMore(r, buf, MaxHTTPHead); err != nil {
			if errors.Is(err, io.EOF) {
				return buf, nil // nothing but line ends, then EOF: harmless
			}
			return buf, err
		}
	}
	switch first := firstNonEOL(buf); {
	case first >= 0x14 && first <= 0x18 && buf[0] == first:
		// Maybe a TLS record (change_cipher_spec, alert, handshake,
		// application_data, heartbeat): type, then version 3.0-3.4.
		var err error
		if buf, err = readFull(r, buf, 3, MaxClientHello); err != nil {
			if errors.Is(err, io.ErrUnexpectedEOF) {
				return buf, nil
			}
			return buf, err
		}
		if buf[1] == 3 && buf[2] <= 4 {
			// Only a ClientHello may come first.
			return inspectTLS(r, buf, name)
		}
	case isTchar(first):
		// An HTTP method is a token (RFC 9110): letters, digits and
		// "!#$%&'*+-.^_`|~". Servers accept any of them, so must we.
		return inspectHTTP(r, buf, name)
	}
	return buf, nil
}

func firstNonEOL(b []byte) byte {
	for _, c := range b {
		if c != '\r' && c != '\n' {
			return c
		}
	}
	return 0
}

func isAlpha(c byte) bool { return c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' }

// isTchar reports whether c may appear in an HTTP token (RFC 9110 5.6.2).
func isTchar(c byte) bool {
	return isAlpha(c) || c >= '0' && c <= '9' || c != 0 && strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
}

// readMore appends at least one byte from r to buf, never growing past limit.
func readMore(r io.Reader, buf []byte, limit int) ([]byte, error) {
	if len(buf) >= limit {
		return buf, errors.New("limit reached")
	}
	if cap(buf)-len(buf) < 1024 && cap(buf) < limit {
		nb := make([]byte, len(buf), min(limit, 2*cap(buf)+1024))
		copy(nb, buf)
		buf = nb
	}
	end := min(cap(buf), limit)
	n, err := r.Read(buf[len(buf):end])
	buf = buf[:len(buf)+n]
	if n > 0 {
		return buf, nil
	}
	if err == nil {
		err = io.ErrNoProgress
	}
	return buf, err
}

// readFull makes buf at least n bytes long.
func readFull(r io.Reader, buf []byte, n, limit int) ([]byte, error) {
	for len(buf) < n {
		var err error
		if buf, err = readMore(r, buf, limit); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return buf, err
		}
	}
	return buf, nil
}

func inspectTLS(r io.Reader, buf []byte, name string) ([]byte, error) {
	// TLSPlaintext: type(1) version(2) length(2) fragment(length).
	// Collect handshake fragments until the ClientHello is complete.
	var hs []byte
	off := 0
	for {
		var err error
		if buf, err = readFull(r, buf, off+5, MaxClientHello); err != nil {
			return buf, fmt.Errorf("tls record header: %w", err)
		}
		rec := buf[off:]
		if rec[0] != 0x16 {
			return buf, errors.New("tls: non-handshake record before the ClientHello")
		}
		if rec[1] != 3 {
			return buf, errors.New("tls: bad record version")
		}
		l := int(binary.BigEndian.Uint16(rec[3:5]))
		if l == 0 || l > 1<<14 {
			return buf, errors.New("tls: bad record length")
		}
		if buf, err = readFull(r, buf, off+5+l, MaxClientHello); err != nil {
			return buf, fmt.Errorf("tls record: %w", err)
		}
		hs = append(hs, buf[off+5:off+5+l]...)
		off += 5 + l
		if len(hs) >= 4 {
			if hs[0] != 1 {
				return buf, errors.New("tls: first handshake message is not a ClientHello")
			}
			bodyLen := int(hs[1])<<16 | int(hs[2])<<8 | int(hs[3])
			if bodyLen > MaxClientHello {
				return buf, errors.New("tls: ClientHello too large")
			}
			if len(hs) >= 4+bodyLen {
				sni, ok, err := parseClientHello(hs[4 : 4+bodyLen])
				if err != nil {
					return buf, err
				}
				if ok && !sameName(sni, name) {
					return buf, fmt.Errorf("%w: TLS SNI %q is not %q", errMismatch, sni, name)
				}
				return buf, nil
			}
		}
	}
}

// parseClientHello returns the host_name from the server_name extension of a
// ClientHello body (RFC 8446 4.1.2, RFC 6066 3). ok is false if there is no
// server_name extension.
func parseClientHello(b []byte) (sni string, ok bool, err error) {
	bad := func(what string) (string, bool, error) {
		return "", false, errors.New("tls: malformed ClientHello: " + what)
	}
	// legacy_version(2) random(32)
	if len(b) < 34 {
		return bad("short")
	}
	b = b[34:]
	// legacy_session_id<0..32>
	if len(b) < 1 || int(b[0]) > 32 || len(b) < 1+int(b[0]) {
		return bad("session id")
	}
	b = b[1+int(b[0]):]
	// cipher_suites<2..2^16-2>
	if len(b) < 2 {
		return bad("cipher suites")
	}
	n := int(binary.BigEndian.Uint16(b))
	if n < 2 || n%2 != 0 || len(b) < 2+n {
		return bad("cipher suites")
	}
	b = b[2+n:]
	// legacy_compression_methods<1..2^8-1>
	if len(b) < 1 || b[0] < 1 || len(b) < 1+int(b[0]) {
		return bad("compression methods")
	}
	b = b[1+int(b[0]):]
	if len(b) == 0 {
		return "", false, nil // no extensions
	}
	// extensions<8..2^16-1>
	if len(b) < 2 {
		return bad("extensions")
	}
	n = int(binary.BigEndian.Uint16(b))
	if len(b) != 2+n {
		return bad("extensions length")
	}
	b = b[2:]
	found := false
	for len(b) > 0 {
		if len(b) < 4 {
			return bad("extension header")
		}
		typ := binary.BigEndian.Uint16(b)
		l := int(binary.BigEndian.Uint16(b[2:]))
		if len(b) < 4+l {
			return bad("extension length")
		}
		data := b[4 : 4+l]
		b = b[4+l:]
		if typ != 0 { // server_name
			continue
		}
		if found {
			return bad("two server_name extensions")
		}
		found = true
		// ServerNameList: list<1..2^16-1> of {name_type(1), HostName<1..2^16-1>}
		if len(data) < 2 || int(binary.BigEndian.Uint16(data)) != len(data)-2 || len(data) == 2 {
			return bad("server_name list")
		}
		data = data[2:]
		for len(data) > 0 {
			if len(data) < 3 {
				return bad("server_name entry")
			}
			nt := data[0]
			hl := int(binary.BigEndian.Uint16(data[1:]))
			if hl == 0 || len(data) < 3+hl {
				return bad("server_name entry")
			}
			host := data[3 : 3+hl]
			data = data[3+hl:]
			if nt != 0 { // only host_name is defined
				continue
			}
			if sni != "" {
				return bad("two host names")
			}
			sni = string(host)
		}
		if sni == "" {
			return bad("server_name without a host name")
		}
	}
	return sni, found, nil
}

// sameName compares a name the guest sent (SNI, Host) with the connection's
// canonical name. Invalid names never match.
func sameName(got, name string) bool {
	c, err := policy.CanonicalName(got)
	return err == nil && c == name
}

func inspectHTTP(r io.Reader, buf []byte, name string) ([]byte, error) {
	start := 0
	for start < len(buf) && (buf[start] == '\r' || buf[start] == '\n') {
		start++
	}
	// Decide from the request line whether this is HTTP/1 at all, as soon
	// as the bytes so far cannot start one (so a binary protocol whose
	// first byte happens to be a letter is not held up).
	var nl int
	for {
		state, end := requestLinePrefix(buf[start:])
		if state == lineNotHTTP {
			return buf, nil // not HTTP/1 (another protocol, HTTP/2 prior knowledge)
		}
		if state == lineComplete {
			nl = start + end
			break
		}
		var err error
		if buf, err = readMore(r, buf, MaxHTTPHead); err != nil {
			if errors.Is(err, io.EOF) {
				return buf, nil // a partial line then EOF: nothing a server would act on
			}
			if len(buf) >= MaxHTTPHead {
				return buf, errors.New("http: request line too long")
			}
			return buf, err
		}
	}
	line := strings.TrimSuffix(string(buf[start:nl]), "\r")
	method, target, ok := parseRequestLine(line)
	if !ok {
		return buf, nil
	}
	if len(method) > maxMethodLen {
		// A lenient server may still take it: refuse rather than pass a
		// request whose Host nobody checked.
		return buf, errors.New("http: method too long")
	}
	// Read the rest of the head.
	for headEnd(buf[nl:]) < 0 {
		var err error
		if buf, err = readMore(r, buf, MaxHTTPHead); err != nil {
			if len(buf) >= MaxHTTPHead {
				return buf, errors.New("http: request head too large")
			}
			return buf, fmt.Errorf("http: request head: %w", err)
		}
	}
	end := nl + headEnd(buf[nl:])
	if err := checkHTTPHead(method, target, buf[nl+1:end], name); err != nil {
		return buf, err
	}
	return buf, nil
}

const (
	lineNeedMore = iota
	lineNotHTTP
	lineComplete
)

// maxMethodLen bounds the method token of a request we let through; a
// longer one is refused. maxTokenScan is how long a token may run without
// a space before the bytes are taken for another protocol (a server that
// accepts a method longer than that is not protected from a mismatched
// Host; docs/network.md).
const (
	maxMethodLen = 20
	maxTokenScan = 256
)

// requestLinePrefix reports whether b can be the start of an HTTP/1
// request line ("METHOD SP target SP HTTP/d.d [CR] LF"), is one (end is the
// index of its LF), or cannot be.
func requestLinePrefix(b []byte) (state, end int) {
	i := 0
	for i < len(b) && isTchar(b[i]) {
		i++
	}
	if i == 0 && len(b) > 0 || i > maxTokenScan {
		return lineNotHTTP, 0
	}
	if i == len(b) {
		return lineNeedMore, 0
	}
	if b[i] != ' ' {
		return lineNotHTTP, 0
	}
	// Target and version: printable bytes and spaces up to the line end.
	for j := i + 1; j < len(b); j++ {
		c := b[j]
		switch {
		case c == '\n':
			return lineComplete, j
		case c == '\r':
			if j+1 < len(b) && b[j+1] != '\n' {
				return lineNotHTTP, 0
			}
		case c < 0x20 || c == 0x7f:
			return lineNotHTTP, 0
		}
	}
	return lineNeedMore, 0
}

// headEnd returns the index just past the empty line ending a request head
// in b (which starts at the request line's '\n'), or -1.
func headEnd(b []byte) int {
	for i := 0; i < len(b); i++ {
		if b[i] != '\n' {
			continue
		}
		j := i + 1
		if j < len(b) && b[j] == '\r' {
			j++
		}
		if j < len(b) && b[j] == '\n' {
			return j + 1
		}
	}
	return -1
}

// parseRequestLine splits "METHOD SP target SP HTTP/d.d". ok is false if the
// line is not an HTTP/1 request line.
func parseRequestLine(line string) (method, target string, ok bool) {
	sp := strings.IndexByte(line, ' ')
	if sp <= 0 {
		return "", "", false
	}
	method = line[:sp]
	for i := 0; i < len(method); i++ {
		if !isTchar(method[i]) {
			return "", "", false
		}
	}
	rest := line[sp+1:]
	sp = strings.LastIndexByte(rest, ' ')
	if sp < 0 {
		return "", "", false
	}
	target, version := strings.TrimRight(rest[:sp], " "), rest[sp+1:]
	if len(version) != 8 || !strings.EqualFold(version[:5], "HTTP/") ||
		version[5] != '1' || version[6] != '.' || version[7] < '0' || version[7] > '9' {
		return "", "", false
	}
	return method, target, true
}

// checkHTTPHead checks the header block (lines after the request line, up
// to and including the empty line).
func checkHTTPHead(method, target string, head []byte, name string) error {
	mismatch := func(format string, a ...any) error {
		return fmt.Errorf("%w: "+format, append([]any{errMismatch}, a...)...)
	}
	for _, c := range head {
		if c == 0 || (c < 0x20 && c != '\r' && c != '\n' && c != '\t') || c == 0x7f {
			return errors.New("http: control character in request head")
		}
	}
	if strings.ContainsAny(target, "\x00\t") {
		return errors.New("http: control character in request target")
	}
	// The target itself may name a host: absolute-form, or CONNECT's
	// authority-form. Servers prefer it over Host.
	if strings.EqualFold(method, "CONNECT") {
		if h := hostOnly(target); !sameName(h, name) {
			return mismatch("CONNECT target %q is not %q", target, name)
		}
	} else if i := strings.Index(target, "://"); i >= 0 {
		auth := target[i+3:]
		if j := strings.IndexAny(auth, "/?#"); j >= 0 {
			auth = auth[:j]
		}
		if j := strings.LastIndexByte(auth, '@'); j >= 0 {
			auth = auth[j+1:]
		}
		if h := hostOnly(auth); !sameName(h, name) {
			return mismatch("request target host %q is not %q", auth, name)
		}
	}
	host, hosts := "", 0
	for _, l := range strings.Split(string(head), "\n") {
		l = strings.TrimSuffix(l, "\r")
		if l == "" {
			break
		}
		if l[0] == ' ' || l[0] == '\t' {
			return errors.New("http: obsolete line folding")
		}
		colon := strings.IndexByte(l, ':')
		if colon < 0 {
			return errors.New("http: header line without ':'")
		}
		field := l[:colon]
		if strings.TrimRight(field, " \t") != field {
			return errors.New("http: whitespace before ':' in a header field")
		}
		if !strings.EqualFold(field, "host") {
			continue
		}
		hosts++
		host = strings.Trim(l[colon+1:], " \t")
	}
	switch {
	case hosts == 0:
		return mismatch("no Host header")
	case hosts > 1:
		return mismatch("several Host headers")
	}
	if h := hostOnly(host); !sameName(h, name) {
		return mismatch("Host %q is not %q", host, name)
	}
	return nil
}

// hostOnly strips a ":port" suffix from an authority. An IPv6 literal is
// returned with its brackets (it never equals a name).
func hostOnly(auth string) string {
	if strings.HasPrefix(auth, "[") {
		return auth
	}
	if i := strings.LastIndexByte(auth, ':'); i >= 0 {
		port := auth[i+1:]
		for j := 0; j < len(port); j++ {
			if port[j] < '0' || port[j] > '9' {
				return auth
			}
		}
		return auth[:i]
	}
	return auth
}
