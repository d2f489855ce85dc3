package netstack

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"testing/iotest"
	"time"
)

// realClientHello captures the first flight of crypto/tls's client.
func realClientHello(t testing.TB, sni string) []byte {
	t.Helper()
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	go func() {
		c := tls.Client(a, &tls.Config{ServerName: sni, InsecureSkipVerify: true, NextProtos: []string{"h2", "http/1.1"}})
		c.Handshake()
	}()
	b.SetReadDeadline(time.Now().Add(5 * time.Second))
	hdr := make([]byte, 5)
	if _, err := io.ReadFull(b, hdr); err != nil {
		t.Fatal(err)
	}
	body := make([]byte, int(hdr[3])<<8|int(hdr[4]))
	if _, err := io.ReadFull(b, body); err != nil {
		t.Fatal(err)
	}
	return append(hdr, body...)
}

func TestParseRealClientHello(t *testing.T) {
	for _, sni := range []string{"svc.test", "api.openai.com", ""} {
		rec := realClientHello(t, sni)
		got, ok, err := parseClientHello(rec[9:])
		if err != nil {
			t.Fatalf("%q: %v", sni, err)
		}
		if ok != (sni != "") || got != sni {
			t.Fatalf("%q: got %q %v", sni, got, ok)
		}
		// Split over many small reads, and over two records.
		fwd, err := inspect(iotest.OneByteReader(bytes.NewReader(rec)), "svc.test")
		if (sni == "api.openai.com") != (err != nil) {
			t.Fatalf("%q: inspect err %v", sni, err)
		}
		if err == nil && !bytes.Equal(fwd, rec) {
			t.Fatalf("%q: forwarded bytes differ", sni)
		}
	}
	rec := realClientHello(t, "svc.test")
	hs := rec[5:]
	split := []byte{0x16, 3, 1, 0, 10}
	split = append(split, hs[:10]...)
	split = append(split, 0x16, 3, 1, byte((len(hs)-10)>>8), byte(len(hs)-10))
	split = append(split, hs[10:]...)
	fwd, err := inspect(bytes.NewReader(split), "svc.test")
	if err != nil || !bytes.Equal(fwd, split) {
		t.Fatalf("hello over two records: %v", err)
	}
	if _, err := inspect(bytes.NewReader(split), "other.test"); !errors.Is(err, errMismatch) {
		t.Fatalf("hello over two records, other name: %v", err)
	}
}

func TestInspectTLSCases(t *testing.T) {
	ch := clientHello("svc.test")
	tests := []struct {
		name string
		in   []byte
		ok   bool
	}{
		{"match", ch, true},
		{"no sni", clientHello(), true},
		{"upper", clientHello("SVC.TEST"), true},
		{"trailing dot", clientHello("svc.test."), true},
		{"other", clientHello("other.test"), false},
		{"suffix", clientHello("svc.test.evil"), false},
		{"prefix", clientHello("evilsvc.test"), false},
		{"nul", clientHello("svc.test\x00"), false},
		{"two names", clientHello("svc.test", "svc.test"), false},
		{"empty name", clientHello(""), false},
		{"not a TLS version: passed through", append([]byte{0x16, 2, 0}, ch[3:]...), true},
		{"zero record", []byte{0x16, 3, 1, 0, 0}, false},
		{"alert record first", append([]byte{0x15, 3, 1, 0, 2, 1, 0}, ch...), false},
		{"truncated", ch[:len(ch)-3], false},
		{"server hello", append([]byte{0x16, 3, 3, 0, 4}, 2, 0, 0, 0), false},
		{"huge handshake", []byte{0x16, 3, 1, 0, 4, 1, 0xff, 0xff, 0xff}, false},
	}
	for _, tt := range tests {
		_, err := inspect(bytes.NewReader(tt.in), "svc.test")
		if (err == nil) != tt.ok {
			t.Errorf("%s: err = %v, want ok=%v", tt.name, err, tt.ok)
		}
	}
}

func TestInspectHTTPCases(t *testing.T) {
	tests := []struct {
		in string
		ok bool
	}{
		{"GET / HTTP/1.1\r\nHost: svc.test\r\n\r\n", true},
		{"GET / HTTP/1.1\r\nHost: svc.test:8080\r\n\r\n", true},
		{"GET / HTTP/1.1\r\nHOST:\tsvc.test \r\n\r\n", true},
		{"GET / HTTP/1.1\nHost: svc.test\n\n", true},
		{"\r\n\r\nGET / HTTP/1.1\r\nHost: svc.test\r\n\r\n", true},
		{"GET https://svc.test:443/x?y HTTP/1.1\r\nHost: svc.test\r\n\r\n", true},
		{"CONNECT svc.test:443 HTTP/1.1\r\nHost: svc.test:443\r\n\r\n", true},
		{"OPTIONS * HTTP/1.1\r\nHost: svc.test\r\n\r\n", true},
		{"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n", false},
		{"GET / HTTP/1.1\r\nHost: svc.test:\r\n\r\n", true},
		{"GET / HTTP/1.1\r\nHost: svc.test:80x\r\n\r\n", false},
		{"GET / HTTP/1.1\r\nHost: \r\n\r\n", false},
		{"GET / HTTP/1.1\r\n\r\n", false},
		{"GET / HTTP/1.1\r\nHost: svc.test\r\nhost: svc.test\r\n\r\n", false},
		{"GET / HTTP/1.1\r\nHost\t: svc.test\r\n\r\n", false},
		{"GET / HTTP/1.1\r\nX-A: 1\r\n\tHost: evil\r\n\r\n", false},
		{"GET / HTTP/1.1\r\nbroken\r\nHost: svc.test\r\n\r\n", false},
		{"GET / HTTP/1.1\r\nHost: svc.test\x00\r\n\r\n", false},
		{"GET / HTTP/1.1\r\nX: \x01\r\nHost: svc.test\r\n\r\n", false},
		{"GET http://evil.test/ HTTP/1.1\r\nHost: svc.test\r\n\r\n", false},
		{"GET http://svc.test@evil.test/ HTTP/1.1\r\nHost: svc.test\r\n\r\n", false},
		{"GET //evil.test/ HTTP/1.1\r\nHost: svc.test\r\n\r\n", true}, // origin-form path, not an authority
		{"CONNECT evil.test:443 HTTP/1.1\r\nHost: svc.test\r\n\r\n", false},
		{"GET / HTTP/1.1\r\nHost: svc.test\r\n", false},                                    // head never ends (EOF)
		{"GET / HTTP/1.1\r\nHost: svc.test\r\n" + strings.Repeat("a", MaxHTTPHead), false}, // too large
		// Not HTTP/1: passed through unchecked.
		{"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", true},
		{"SSH-2.0-OpenSSH_9\r\n", true},
		{"HELLO world\r\n", true},
		{"GET /", true}, // partial line then EOF
		{"\x00\x01\x02", true},
		{"\r\n\r\n", true},
		{"", true},
		{"\x16\x00\x00\x00binary length prefix", true}, // not a TLS version
		{"\x17", true},
		// A binary protocol whose first byte is a letter is decided at once
		// (the reader below would fail the test if asked for more).
		{"A\x00\x00\x01rest", true},
		{"GET\x00", true},
		{strings.Repeat("A", 21), true},
		// Methods are tokens, not only letters (found by FuzzInspect).
		{"A0 * HTTP/1.0\n\n", false},
		{"1X / HTTP/1.1\r\nHost: evil.test\r\n\r\n", false},
		{"M-SEARCH / HTTP/1.1\r\nHost: evil.test\r\n\r\n", false},
		{"M-SEARCH / HTTP/1.1\r\nHost: svc.test\r\n\r\n", true},
		{strings.Repeat("A", 21) + " / HTTP/1.1\r\nHost: svc.test\r\n\r\n", false},
	}
	for _, tt := range tests {
		fwd, err := inspect(iotest.HalfReader(strings.NewReader(tt.in)), "svc.test")
		if (err == nil) != tt.ok {
			t.Errorf("%q: err = %v, want ok=%v", tt.in, err, tt.ok)
		}
		if err == nil && !strings.HasPrefix(tt.in, string(fwd)) {
			t.Errorf("%q: forwarded %q, not a prefix of the input", tt.in, fwd)
		}
		if len(fwd) > MaxClientHello {
			t.Errorf("%q: read %d bytes", tt.in, len(fwd))
		}
	}
}

func TestInspectDecidesEarly(t *testing.T) {
	// Bytes that cannot start a request line pass without waiting for more.
	for _, in := range []string{"A\x00", "x\x01", "Q\x00\x00\x00", "ab1\x01", "GET\t", "GET /\x00", strings.Repeat("7", maxTokenScan+1)} {
		r := &stepReader{chunks: []string{in}, blockAfter: true}
		fwd, err := inspect(r, "svc.test")
		if err != nil || string(fwd) != in {
			t.Errorf("%q: %q %v", in, fwd, err)
		}
	}
}

func TestRequestLinePrefix(t *testing.T) {
	tests := []struct {
		in    string
		state int
	}{
		{"", lineNeedMore},
		{"G", lineNeedMore},
		{"GET", lineNeedMore},
		{"GET ", lineNeedMore},
		{"GET / HTTP/1.1", lineNeedMore},
		{"GET / HTTP/1.1\r", lineNeedMore},
		{"GET / HTTP/1.1\r\n", lineComplete},
		{"GET / HTTP/1.1\n", lineComplete},
		{"GET / HTTP/1.1\rX", lineNotHTTP},
		{"GET\x00", lineNotHTTP},
		{"1GET", lineNeedMore}, // methods are tokens: digits and !#$%&'*+-.^_`|~ too
		{"M-SEARCH * HTTP/1.1\n", lineComplete},
		{" GET", lineNotHTTP},
		{strings.Repeat("A", maxMethodLen+1), lineNeedMore},
		{strings.Repeat("A", maxTokenScan+1), lineNotHTTP},
		{"GET /\x01", lineNotHTTP},
	}
	for _, tt := range tests {
		if got, _ := requestLinePrefix([]byte(tt.in)); got != tt.state {
			t.Errorf("%q: %d, want %d", tt.in, got, tt.state)
		}
	}
}

func TestInspectStopsAtHead(t *testing.T) {
	// The inspection reads the head and no more than it must: bytes after
	// it stay in the stream for the splice.
	in := "GET / HTTP/1.1\r\nHost: svc.test\r\n\r\n"
	r := &stepReader{chunks: []string{in, "BODY"}}
	fwd, err := inspect(r, "svc.test")
	if err != nil || string(fwd) != in {
		t.Fatalf("got %q %v", fwd, err)
	}
	if r.i != 1 {
		t.Fatalf("read %d chunks", r.i)
	}
}

type stepReader struct {
	chunks     []string
	i          int
	blockAfter bool // fail instead of EOF once the chunks are used up
}

func (s *stepReader) Read(p []byte) (int, error) {
	if s.i >= len(s.chunks) {
		if s.blockAfter {
			return 0, errors.New("stepReader: read past the data (would block)")
		}
		return 0, io.EOF
	}
	n := copy(p, s.chunks[s.i])
	s.i++
	return n, nil
}

// FuzzParseClientHello: never panics, and agrees with crypto/tls's hello on
// real input.
func FuzzParseClientHello(f *testing.F) {
	f.Add(clientHello("svc.test")[9:])
	f.Add(clientHello()[9:])
	f.Add(clientHello("a", "b")[9:])
	f.Add(realClientHello(f, "svc.test")[9:])
	f.Fuzz(func(t *testing.T, b []byte) {
		sni, ok, err := parseClientHello(b)
		if err != nil && (ok || sni != "") {
			t.Fatal("result with an error")
		}
		if ok && sni == "" {
			t.Fatal("ok without a name")
		}
	})
}

// FuzzInspect: never panics, never reads past its bounds, forwards exactly
// what it read, and never lets an HTTP head or ClientHello through that
// names another host.
func FuzzInspect(f *testing.F) {
	f.Add([]byte("GET / HTTP/1.1\r\nHost: svc.test\r\n\r\n"), uint8(3))
	f.Add([]byte("GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n"), uint8(1))
	f.Add([]byte("\r\nGET http://evil/ HTTP/1.1\r\nHost: svc.test\r\n\r\n"), uint8(7))
	f.Add(clientHello("svc.test"), uint8(5))
	f.Add(clientHello("evil.test"), uint8(0))
	f.Add([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), uint8(2))
	f.Fuzz(func(t *testing.T, in []byte, chunk uint8) {
		var r io.Reader = bytes.NewReader(in)
		if chunk%4 == 1 {
			r = iotest.OneByteReader(r)
		} else if chunk%4 == 2 {
			r = iotest.HalfReader(r)
		}
		fwd, err := inspect(r, "svc.test")
		if len(fwd) > MaxClientHello {
			t.Fatalf("read %d bytes", len(fwd))
		}
		if !bytes.HasPrefix(in, fwd) {
			t.Fatal("forwarded bytes are not the input's prefix")
		}
		if err != nil {
			return
		}
		// Oracle: if Go's own HTTP server would read a request from what
		// passed, it must be for svc.test.
		req, perr := http.ReadRequest(bufio.NewReader(bytes.NewReader(fwd)))
		if perr != nil || req.ProtoMajor != 1 || len(req.Method) > maxTokenScan {
			return // (a method that long is the documented gap: maxTokenScan)
		}
		host := req.Host
		if h, _, e := net.SplitHostPort(host); e == nil {
			host = h
		}
		if !strings.EqualFold(strings.TrimSuffix(host, "."), "svc.test") {
			t.Fatalf("passed a request for %q: %q", req.Host, fwd)
		}
	})
}
