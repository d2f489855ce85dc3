package mitm

import (
	"bufio"
	"encoding/base64"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
)

const (
	phA  = "SANDBOX_SECRET_0123456789abcdef0123456789abcdef"
	phB  = "SANDBOX_SECRET_fedcba9876543210fedcba9876543210"
	phX  = "SANDBOX_SECRET_00000000000000000000000000000000" // not a secret of ours
	valA = "sk-real-A+/=&?"
	valB = "real-B"
)

func testSubs(t testing.TB) *substituter {
	t.Helper()
	s, err := newSubstituter([]Secret{
		{Name: "A", Placeholder: phA, Value: valA, Hosts: []string{"api.test", "*.a.test:8443"}},
		{Name: "B", Placeholder: phB, Value: valB, Hosts: []string{"b.test:443"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

var tlsTo = func(name string, port uint16) target { return target{name: name, port: port, tls: true, sniOK: true} }

func TestNewSubstituterRefuses(t *testing.T) {
	for _, sec := range []Secret{
		{Name: "x", Placeholder: "SANDBOX_SECRET_short", Value: "v", Hosts: []string{"a.test"}},
		{Name: "x", Placeholder: phA, Value: "", Hosts: []string{"a.test"}},
		{Name: "x", Placeholder: phA, Value: "a\r\nX-Injected: 1", Hosts: []string{"a.test"}},
		{Name: "x", Placeholder: phA, Value: "a\x00", Hosts: []string{"a.test"}},
		{Name: "x", Placeholder: phA, Value: "v", Hosts: []string{"a..test"}},
	} {
		if _, err := newSubstituter([]Secret{sec}); err == nil {
			t.Errorf("accepted %+v", sec)
		} else if strings.Contains(err.Error(), sec.Value) && sec.Value != "" && sec.Value != "v" {
			t.Errorf("error quotes the value: %v", err)
		}
	}
}

func TestRewriteHeaders(t *testing.T) {
	s := testSubs(t)
	h := http.Header{
		"Authorization": {"Bearer " + phA},
		"X-Api-Key":     {phA, "two " + phA + " " + phA},
		"X-Other":       {"keep " + phX},
		"Content-Type":  {"application/json"},
	}
	u, _ := url.Parse("/v1/models?key=" + phA + "&q=1")
	v := s.rewrite(h, u, tlsTo("api.test", 443))
	if v.block != "" || len(v.used) != 1 || v.used[0] != "A" {
		t.Fatalf("verdict %+v", v)
	}
	if h.Get("Authorization") != "Bearer "+valA {
		t.Errorf("Authorization %q", h.Get("Authorization"))
	}
	if got := h["X-Api-Key"]; got[0] != valA || got[1] != "two "+valA+" "+valA {
		t.Errorf("X-Api-Key %q", got)
	}
	if h.Get("X-Other") != "keep "+phX {
		t.Errorf("unknown placeholder changed: %q", h.Get("X-Other"))
	}
	if u.RawQuery != "key="+url.QueryEscape(valA)+"&q=1" {
		t.Errorf("query %q", u.RawQuery)
	}
	if q, _ := url.ParseQuery(u.RawQuery); q.Get("key") != valA {
		t.Errorf("query decodes to %q", q.Get("key"))
	}
}

func TestRewriteBasicAuth(t *testing.T) {
	s := testSubs(t)
	for _, scheme := range []string{"Basic", "basic", "BASIC"} {
		h := http.Header{"Authorization": {scheme + " " + base64.StdEncoding.EncodeToString([]byte("user:"+phA))}}
		u, _ := url.Parse("/")
		if v := s.rewrite(h, u, tlsTo("x.a.test", 8443)); v.block != "" || len(v.used) != 1 {
			t.Fatalf("%s: verdict %+v", scheme, v)
		}
		dec, ok := basicAuth(h.Get("Authorization"))
		if !ok || dec != "user:"+valA {
			t.Errorf("%s: decoded %q %v", scheme, dec, ok)
		}
		r := &http.Request{Header: h}
		if user, pass, ok := r.BasicAuth(); !ok || user != "user" || pass != valA {
			t.Errorf("%s: BasicAuth %q %q %v", scheme, user, pass, ok)
		}
	}
	// Placeholder as the user name, and both secrets.
	h := http.Header{"Authorization": {"Basic " + base64.StdEncoding.EncodeToString([]byte(phB+":"+phB))}}
	u, _ := url.Parse("/")
	if v := s.rewrite(h, u, tlsTo("b.test", 443)); v.block != "" {
		t.Fatal(v.block)
	}
	if dec, _ := basicAuth(h.Get("Authorization")); dec != valB+":"+valB {
		t.Errorf("decoded %q", dec)
	}
}

func TestRewriteRefusals(t *testing.T) {
	s := testSubs(t)
	cases := []struct {
		name string
		h    http.Header
		url  string
		t    target
		want string
	}{
		{"unbound host", http.Header{"X-Key": {phA}}, "/", tlsTo("other.test", 443), "not bound"},
		{"unbound port", http.Header{"X-Key": {phB}}, "/", tlsTo("b.test", 8443), "not bound"},
		{"wildcard apex", http.Header{"X-Key": {phA}}, "/", tlsTo("a.test", 8443), "not bound"},
		{"wildcard wrong port", http.Header{"X-Key": {phA}}, "/", tlsTo("x.a.test", 443), "not bound"},
		{"suffix trick", http.Header{"X-Key": {phA}}, "/", tlsTo("api.test.evil.test", 443), "not bound"},
		{"one of two unbound", http.Header{"X-Key": {phA + phB}}, "/", tlsTo("api.test", 443), "B is not bound"},
		{"plain http", http.Header{"X-Key": {phA}}, "/", target{name: "api.test", port: 80}, "plain-HTTP"},
		{"plain http query", http.Header{}, "/?k=" + phA, target{name: "api.test", port: 80}, "plain-HTTP"},
		{"sni mismatch", http.Header{"X-Key": {phA}}, "/", target{name: "api.test", port: 443, tls: true}, "server name"},
		{"path", http.Header{}, "/keys/" + phA, tlsTo("api.test", 443), "URL path"},
		{"header name", http.Header{http.CanonicalHeaderKey("X-" + phA): {"v"}}, "/", tlsTo("api.test", 443), "header name"},
		{"basic unbound", http.Header{"Authorization": {"Basic " + base64.StdEncoding.EncodeToString([]byte("u:"+phA))}}, "/", tlsTo("b.test", 443), "not bound"},
	}
	for _, c := range cases {
		u, err := url.Parse(c.url)
		if err != nil {
			t.Fatal(err)
		}
		before := c.h.Clone()
		q := u.RawQuery
		v := s.rewrite(c.h, u, c.t)
		if !strings.Contains(v.block, c.want) {
			t.Errorf("%s: verdict %+v, want a block with %q", c.name, v, c.want)
		}
		if strings.Contains(v.block, valA) || strings.Contains(v.block, valB) {
			t.Errorf("%s: the reason quotes a value", c.name)
		}
		for k, vs := range c.h {
			if strings.Join(vs, "|") != strings.Join(before[k], "|") {
				t.Errorf("%s: header %s modified on a refusal", c.name, k)
			}
		}
		if u.RawQuery != q {
			t.Errorf("%s: query modified on a refusal", c.name)
		}
	}
	// Nothing to do: no verdict.
	u, _ := url.Parse("/?a=b")
	if v := s.rewrite(http.Header{"A": {"b"}}, u, target{name: "x.test", port: 80}); v.block != "" || v.used != nil {
		t.Errorf("clean request: %+v", v)
	}
}

// TestRewriteOnlyHead reads a whole request as the server does and checks
// that the body (placeholder included) is left alone.
func TestRewriteOnlyHead(t *testing.T) {
	s := testSubs(t)
	bodyText := "body " + phA + "\n"
	raw := "POST /upload?token=" + phA + " HTTP/1.1\r\nHost: api.test\r\nX-Key: " + phA +
		"\r\nContent-Length: " + strconv.Itoa(len(bodyText)) + "\r\n\r\n" + bodyText
	r, err := http.ReadRequest(bufio.NewReader(strings.NewReader(raw)))
	if err != nil {
		t.Fatal(err)
	}
	if v := s.rewrite(r.Header, r.URL, tlsTo("api.test", 443)); v.block != "" {
		t.Fatal(v.block)
	}
	body := make([]byte, 100)
	n, _ := r.Body.Read(body)
	if string(body[:n]) != bodyText {
		t.Errorf("body %q", body[:n])
	}
	if r.Header.Get("X-Key") != valA || !strings.Contains(r.URL.RawQuery, url.QueryEscape(valA)) {
		t.Errorf("head not rewritten: %v %q", r.Header, r.URL.RawQuery)
	}
}

func TestScrub(t *testing.T) {
	s := testSubs(t)
	msg := "Get \"https://api.test/?k=" + url.QueryEscape(valA) + "\": header " + valA + " " + valB
	got := s.scrub(msg)
	if strings.Contains(got, valA) || strings.Contains(got, url.QueryEscape(valA)) || strings.Contains(got, valB) {
		t.Errorf("scrub left a value: %q", got)
	}
}

func TestHostOnlyAndSameName(t *testing.T) {
	for in, want := range map[string]string{"a.test": "a.test", "a.test:443": "a.test", "[::1]:80": "[::1]:80", "a.test:x": "a.test:x"} {
		if got := hostOnly(in); got != want {
			t.Errorf("hostOnly(%q) = %q", in, got)
		}
	}
	for _, bad := range []string{"api.test.evil.test", "evil-api.test", "api.test\x00", "api.test\x00.evil.test", "", "API.TEST.."} {
		if sameName(bad, "api.test") {
			t.Errorf("sameName(%q)", bad)
		}
	}
	if !sameName("API.Test.", "api.test") {
		t.Error("case/trailing dot")
	}
}

// FuzzRewrite feeds arbitrary request heads through the parser the proxy
// uses and the rewrite, and checks its promises: no panic; a refusal
// modifies nothing; a value is only ever written for a destination its
// secret is bound to, over TLS with a matching SNI; no known placeholder
// survives in the header values or the query of an accepted request.
func FuzzRewrite(f *testing.F) {
	f.Add("GET /?k="+phA+" HTTP/1.1\r\nHost: api.test\r\nX-Key: "+phA+"\r\n\r\n", "api.test", uint16(443), true, true)
	f.Add("GET / HTTP/1.1\r\nHost: b.test\r\nAuthorization: Basic "+base64.StdEncoding.EncodeToString([]byte("u:"+phB))+"\r\n\r\n", "b.test", uint16(443), true, true)
	f.Add("GET /"+phA+" HTTP/1.1\r\nHost: x\r\n\r\n", "x.a.test", uint16(8443), true, false)
	f.Add("GET / HTTP/1.1\r\nHost: x\r\nX: "+phA+phB+phX+"\r\n\r\n", "api.test", uint16(80), false, false)
	f.Fuzz(func(t *testing.T, raw, name string, port uint16, isTLS, sniOK bool) {
		s := testSubs(t)
		r, err := http.ReadRequest(bufio.NewReaderSize(strings.NewReader(raw), 4096))
		if err != nil {
			return
		}
		hadA := strings.Contains(raw, valA)
		hadB := strings.Contains(raw, valB)
		before := r.Header.Clone()
		q := r.URL.RawQuery
		tg := target{name: name, port: port, tls: isTLS, sniOK: sniOK}
		v := s.rewrite(r.Header, r.URL, tg)
		after := strings.Builder{}
		r.Header.Write(&after)
		out := after.String() + r.URL.RawQuery
		if v.block != "" {
			if len(v.used) != 0 || r.URL.RawQuery != q {
				t.Fatal("refusal modified the request")
			}
			for k, vs := range r.Header {
				if strings.Join(vs, "\x00") != strings.Join(before[k], "\x00") {
					t.Fatal("refusal modified a header")
				}
			}
			return
		}
		for _, u := range v.used {
			if !isTLS || !sniOK {
				t.Fatalf("substituted %s without TLS/SNI", u)
			}
		}
		if !hadA && (strings.Contains(out, valA) || strings.Contains(out, url.QueryEscape(valA))) && !s.byPH[phA].hosts.AllowName(name, port) {
			t.Fatalf("value A sent to %s:%d", name, port)
		}
		if !hadB && strings.Contains(out, valB) && !s.byPH[phB].hosts.AllowName(name, port) {
			t.Fatalf("value B sent to %s:%d", name, port)
		}
		if len(v.used) > 0 {
			for _, vs := range r.Header {
				for _, x := range vs {
					if strings.Contains(x, phA) || strings.Contains(x, phB) {
						t.Fatalf("placeholder left in %q", x)
					}
				}
			}
			if strings.Contains(r.URL.RawQuery, phA) || strings.Contains(r.URL.RawQuery, phB) {
				t.Fatal("placeholder left in the query")
			}
		}
	})
}

// TestHeaderSizeBounded checks that the proxy's HTTP/1 server refuses a
// request head over MaxHeaderBytes (see mitm_test.go for the live check).
func TestMaxHeaderBytesSane(t *testing.T) {
	if MaxHeaderBytes < 8<<10 || MaxHeaderBytes > 1<<20 {
		t.Fatalf("MaxHeaderBytes %d", MaxHeaderBytes)
	}
}
