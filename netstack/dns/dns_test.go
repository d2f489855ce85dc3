package dns

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
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"matchlock.dev/matchlock/netstack/policy"
)

// fakeResolver answers from a table and records every lookup.
type fakeResolver struct {
	mu    sync.Mutex
	table map[string][]netip.Addr
	fail  map[string]error
	calls []string
	delay time.Duration
}

func (f *fakeResolver) LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error) {
	f.mu.Lock()
	f.calls = append(f.calls, host)
	addrs, ok := f.table[host]
	err := f.fail[host]
	d := f.delay
	f.mu.Unlock()
	if d > 0 {
		select {
		case <-time.After(d):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	return addrs, nil
}

func (f *fakeResolver) Calls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.calls...)
}

func addrs(ss ...string) []netip.Addr {
	var out []netip.Addr
	for _, s := range ss {
		out = append(out, netip.MustParseAddr(s))
	}
	return out
}

func buildQuery(t testing.TB, name string, typ dnsmessage.Type, edns bool) []byte {
	t.Helper()
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: 0x1234, RecursionDesired: true})
	b.StartQuestions()
	n, err := dnsmessage.NewName(name)
	if err != nil {
		t.Fatalf("NewName(%q): %v", name, err)
	}
	if err := b.Question(dnsmessage.Question{Name: n, Type: typ, Class: dnsmessage.ClassINET}); err != nil {
		t.Fatal(err)
	}
	if edns {
		b.StartAdditionals()
		var rh dnsmessage.ResourceHeader
		rh.SetEDNS0(1232, dnsmessage.RCodeSuccess, false)
		b.OPTResource(rh, dnsmessage.OPTResource{})
	}
	msg, err := b.Finish()
	if err != nil {
		t.Fatal(err)
	}
	return msg
}

type reply struct {
	hdr     dnsmessage.Header
	qs      []dnsmessage.Question
	answers []dnsmessage.Resource
	adds    []dnsmessage.Resource
}

func parseReply(t testing.TB, msg []byte) reply {
	t.Helper()
	if msg == nil {
		t.Fatal("no reply")
	}
	var p dnsmessage.Parser
	h, err := p.Start(msg)
	if err != nil {
		t.Fatalf("reply: %v", err)
	}
	var r reply
	r.hdr = h
	if r.qs, err = p.AllQuestions(); err != nil {
		t.Fatalf("reply questions: %v", err)
	}
	if r.answers, err = p.AllAnswers(); err != nil {
		t.Fatalf("reply answers: %v", err)
	}
	p.SkipAllAuthorities()
	if r.adds, err = p.AllAdditionals(); err != nil {
		t.Fatalf("reply additionals: %v", err)
	}
	return r
}

func newTestResponder(t testing.TB, allow, private []string) (*Responder, *fakeResolver, *[]Outcome) {
	t.Helper()
	pol, err := policy.Parse(allow, private)
	if err != nil {
		t.Fatal(err)
	}
	res := &fakeResolver{table: map[string][]netip.Addr{
		"api.openai.com":   addrs("203.0.113.10", "2001:db8::10"),
		"www.example.com":  addrs("203.0.113.20"),
		"a.example.com":    addrs("203.0.113.21"),
		"b.example.com":    addrs("203.0.113.22"),
		"internal.test":    addrs("10.0.0.5"),
		"mixed.test":       addrs("127.0.0.1", "203.0.113.30"),
		"meta.test":        addrs("169.254.169.254"),
		"mapped.test":      addrs("::ffff:127.0.0.1"),
		"v6only.test":      addrs("2001:db8::99"),
		"synthetic.test":   addrs("198.18.0.7"),
		"empty.test":       nil,
		"localhost.test":   addrs("127.0.0.1"),
		"privonly.test":    addrs("127.0.0.1"),
		"port.test":        addrs("203.0.113.40"),
		"denied.test":      addrs("203.0.113.50"),
		"nonexistent.test": nil,
	}, fail: map[string]error{"broken.test": errors.New("network down")}}
	delete(res.table, "nonexistent.test")
	var mu sync.Mutex
	var log []Outcome
	r := NewResponder(Config{Policy: pol, Resolver: res, Log: func(o Outcome) {
		mu.Lock()
		log = append(log, o)
		mu.Unlock()
	}})
	return r, res, &log
}

func TestAnswer(t *testing.T) {
	r, res, _ := newTestResponder(t,
		[]string{"api.openai.com", "*.example.com", "internal.test", "mixed.test", "meta.test", "mapped.test",
			"v6only.test", "synthetic.test", "empty.test", "broken.test", "nonexistent.test", "port.test:8443",
			"localhost.test:8080"},
		[]string{"localhost.test:8080", "privonly.test"})
	tests := []struct {
		name    string
		typ     dnsmessage.Type
		rcode   dnsmessage.RCode
		answer  bool // an A record in the answer
		lookup  bool // the resolver was asked
		inRange bool
	}{
		{"api.openai.com.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, true, true, true},
		{"API.OpenAI.com.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, true, true, true},
		{"api.openai.com.", dnsmessage.TypeAAAA, dnsmessage.RCodeSuccess, false, false, false},
		{"api.openai.com.", dnsmessage.TypeMX, dnsmessage.RCodeSuccess, false, false, false},
		{"api.openai.com.", dnsmessage.TypeTXT, dnsmessage.RCodeSuccess, false, false, false},
		{"www.example.com.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, true, true, true},
		{"example.com.", dnsmessage.TypeA, dnsmessage.RCodeNameError, false, false, false},
		{"evil-example.com.", dnsmessage.TypeA, dnsmessage.RCodeNameError, false, false, false},
		{"www.example.com.evil.com.", dnsmessage.TypeA, dnsmessage.RCodeNameError, false, false, false},
		{"denied.test.", dnsmessage.TypeA, dnsmessage.RCodeNameError, false, false, false},
		{"denied.test.", dnsmessage.TypeAAAA, dnsmessage.RCodeNameError, false, false, false},
		{"internal.test.", dnsmessage.TypeA, dnsmessage.RCodeNameError, false, true, false},
		{"meta.test.", dnsmessage.TypeA, dnsmessage.RCodeNameError, false, true, false},
		{"mapped.test.", dnsmessage.TypeA, dnsmessage.RCodeNameError, false, true, false},
		{"synthetic.test.", dnsmessage.TypeA, dnsmessage.RCodeNameError, false, true, false},
		{"mixed.test.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, true, true, true},
		{"v6only.test.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, true, true, true},
		{"empty.test.", dnsmessage.TypeA, dnsmessage.RCodeNameError, false, true, false},
		{"nonexistent.test.", dnsmessage.TypeA, dnsmessage.RCodeNameError, false, true, false},
		{"broken.test.", dnsmessage.TypeA, dnsmessage.RCodeServerFailure, false, true, false},
		{"localhost.test.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, true, true, true},
		// allow-private alone allows nothing: not even looked up.
		{"privonly.test.", dnsmessage.TypeA, dnsmessage.RCodeNameError, false, false, false},
		{"port.test.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, true, true, true},
		{".", dnsmessage.TypeNS, dnsmessage.RCodeRefused, false, false, false},
		{"1.0.213.10.in-addr.arpa.", dnsmessage.TypePTR, dnsmessage.RCodeNameError, false, false, false},
	}
	for _, tt := range tests {
		before := len(res.Calls())
		got := parseReply(t, r.Answer(context.Background(), buildQuery(t, tt.name, tt.typ, false)))
		if got.hdr.RCode != tt.rcode {
			t.Errorf("%s %v: rcode %v, want %v", tt.name, tt.typ, got.hdr.RCode, tt.rcode)
		}
		if !got.hdr.Response || got.hdr.ID != 0x1234 || !got.hdr.RecursionDesired {
			t.Errorf("%s: bad header %+v", tt.name, got.hdr)
		}
		if len(got.qs) != 1 || got.qs[0].Name.String() != tt.name {
			t.Errorf("%s: question not echoed: %v", tt.name, got.qs)
		}
		if (len(got.answers) == 1) != tt.answer || len(got.answers) > 1 {
			t.Errorf("%s %v: %d answers, want answer=%v", tt.name, tt.typ, len(got.answers), tt.answer)
		}
		if lookedUp := len(res.Calls()) > before; lookedUp != tt.lookup {
			t.Errorf("%s %v: looked up = %v, want %v", tt.name, tt.typ, lookedUp, tt.lookup)
		}
		if tt.answer && len(got.answers) == 1 {
			a, ok := got.answers[0].Body.(*dnsmessage.AResource)
			if !ok {
				t.Fatalf("%s: answer is %T", tt.name, got.answers[0].Body)
			}
			ip := netip.AddrFrom4(a.A)
			if tt.inRange && !policy.SyntheticPrefix.Contains(ip) {
				t.Errorf("%s: answer %s outside the synthetic range", tt.name, ip)
			}
			if got.answers[0].Header.TTL != DefaultTTL {
				t.Errorf("%s: TTL %d", tt.name, got.answers[0].Header.TTL)
			}
			canon, _ := policy.CanonicalName(tt.name)
			if n, ok := r.Allocator().Lookup(ip); !ok || n != canon {
				t.Errorf("%s: allocator maps %s to %q, %v", tt.name, ip, n, ok)
			}
		}
	}
}

func TestAnswerStablePerName(t *testing.T) {
	r, _, _ := newTestResponder(t, []string{"*.example.com"}, nil)
	get := func(name string) netip.Addr {
		got := parseReply(t, r.Answer(context.Background(), buildQuery(t, name, dnsmessage.TypeA, false)))
		if len(got.answers) != 1 {
			t.Fatalf("%s: no answer", name)
		}
		return netip.AddrFrom4(got.answers[0].Body.(*dnsmessage.AResource).A)
	}
	a1, b1 := get("a.example.com."), get("b.example.com.")
	a2, b2 := get("A.EXAMPLE.COM."), get("b.example.com.")
	if a1 != a2 || b1 != b2 || a1 == b1 {
		t.Fatalf("addresses not stable per name: %s %s %s %s", a1, a2, b1, b2)
	}
}

func TestDeniedNeverLooksUp(t *testing.T) {
	r, res, log := newTestResponder(t, nil, nil) // sealed
	for _, name := range []string{"api.openai.com.", "www.example.com.", "localhost.", "x."} {
		for _, typ := range []dnsmessage.Type{dnsmessage.TypeA, dnsmessage.TypeAAAA, dnsmessage.TypeTXT} {
			got := parseReply(t, r.Answer(context.Background(), buildQuery(t, name, typ, false)))
			if got.hdr.RCode != dnsmessage.RCodeNameError {
				t.Errorf("%s %v: rcode %v", name, typ, got.hdr.RCode)
			}
		}
	}
	if c := res.Calls(); len(c) != 0 {
		t.Fatalf("sealed responder looked up %q", c)
	}
	for _, o := range *log {
		if o.Allowed || o.LookedUp || o.Reason != "name not allowed" {
			t.Errorf("log %+v", o)
		}
	}
}

func TestEDNSEcho(t *testing.T) {
	r, _, _ := newTestResponder(t, []string{"api.openai.com"}, nil)
	got := parseReply(t, r.Answer(context.Background(), buildQuery(t, "api.openai.com.", dnsmessage.TypeA, true)))
	if len(got.adds) != 1 || got.adds[0].Header.Type != dnsmessage.TypeOPT {
		t.Fatalf("EDNS not echoed: %+v", got.adds)
	}
	got = parseReply(t, r.Answer(context.Background(), buildQuery(t, "api.openai.com.", dnsmessage.TypeA, false)))
	if len(got.adds) != 0 {
		t.Fatalf("OPT without EDNS query")
	}
}

// rawMsg builds a message with arbitrary section contents.
func rawMsg(t testing.TB, h dnsmessage.Header, qs []string, answers, extraAdds int, opt bool) []byte {
	t.Helper()
	b := dnsmessage.NewBuilder(nil, h)
	b.StartQuestions()
	for _, q := range qs {
		b.Question(dnsmessage.Question{Name: dnsmessage.MustNewName(q), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET})
	}
	b.StartAnswers()
	for i := 0; i < answers; i++ {
		b.AResource(dnsmessage.ResourceHeader{Name: dnsmessage.MustNewName("x."), Class: dnsmessage.ClassINET}, dnsmessage.AResource{})
	}
	b.StartAdditionals()
	if opt {
		var rh dnsmessage.ResourceHeader
		rh.SetEDNS0(1232, 0, false)
		b.OPTResource(rh, dnsmessage.OPTResource{})
	}
	for i := 0; i < extraAdds; i++ {
		b.AResource(dnsmessage.ResourceHeader{Name: dnsmessage.MustNewName("x."), Class: dnsmessage.ClassINET}, dnsmessage.AResource{})
	}
	msg, err := b.Finish()
	if err != nil {
		t.Fatal(err)
	}
	return msg
}

func TestMalformed(t *testing.T) {
	r, res, _ := newTestResponder(t, []string{"*"}, nil)
	q := func(h dnsmessage.Header) dnsmessage.Header { h.ID = 7; return h }
	good := buildQuery(t, "api.openai.com.", dnsmessage.TypeA, false)

	// Dropped: no reply at all.
	drops := map[string][]byte{
		"empty":                 {},
		"short":                 {0x12},
		"header only truncated": good[:11],
		"response":              rawMsg(t, q(dnsmessage.Header{Response: true}), []string{"api.openai.com."}, 0, 0, false),
		"oversized":             append(append([]byte(nil), good...), make([]byte, MaxMessageSize)...),
	}
	for name, msg := range drops {
		if reply := r.Answer(context.Background(), msg); reply != nil {
			t.Errorf("%s: got a reply", name)
		}
	}
	// FORMERR.
	formerr := map[string][]byte{
		"no question":        rawMsg(t, q(dnsmessage.Header{}), nil, 0, 0, false),
		"two questions":      rawMsg(t, q(dnsmessage.Header{}), []string{"api.openai.com.", "b.com."}, 0, 0, false),
		"answers in a query": rawMsg(t, q(dnsmessage.Header{}), []string{"api.openai.com."}, 1, 0, false),
		"non-OPT additional": rawMsg(t, q(dnsmessage.Header{}), []string{"api.openai.com."}, 0, 1, false),
		"two additionals":    rawMsg(t, q(dnsmessage.Header{}), []string{"api.openai.com."}, 0, 1, true),
		"truncated question": good[:len(good)-2],
		"trailing garbage count": func() []byte {
			m := append([]byte(nil), good...)
			binary.BigEndian.PutUint16(m[4:], 3) // claims 3 questions
			return m
		}(),
		"pointer loop": func() []byte {
			m := append([]byte(nil), good[:12]...)
			return append(m, 0xC0, 12, 0, 1, 0, 1) // name points at itself
		}(),
		"reserved label type": func() []byte {
			m := append([]byte(nil), good[:12]...)
			return append(m, 0x80, 0, 0, 1, 0, 1)
		}(),
		"dot in label": func() []byte {
			m := append([]byte(nil), good[:12]...)
			m = append(m, 7)
			m = append(m, "a.b.com"...)
			return append(m, 0, 0, 1, 0, 1)
		}(),
	}
	for name, msg := range formerr {
		got := parseReply(t, r.Answer(context.Background(), msg))
		if got.hdr.RCode != dnsmessage.RCodeFormatError {
			t.Errorf("%s: rcode %v, want FORMERR", name, got.hdr.RCode)
		}
	}
	// Other refusals.
	notimp := rawMsg(t, q(dnsmessage.Header{OpCode: 4}), []string{"api.openai.com."}, 0, 0, false)
	if got := parseReply(t, r.Answer(context.Background(), notimp)); got.hdr.RCode != dnsmessage.RCodeNotImplemented {
		t.Errorf("opcode 4: %v", got.hdr.RCode)
	}
	chaos := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: 9})
	chaos.StartQuestions()
	chaos.Question(dnsmessage.Question{Name: dnsmessage.MustNewName("version.bind."), Type: dnsmessage.TypeTXT, Class: 3})
	cm, _ := chaos.Finish()
	if got := parseReply(t, r.Answer(context.Background(), cm)); got.hdr.RCode != dnsmessage.RCodeRefused {
		t.Errorf("CHAOS: %v", got.hdr.RCode)
	}
	// Names the policy grammar refuses, even under "*".
	for _, label := range []string{"a\x00b", "a b", "*", "-a", "caf\xc3\xa9"} {
		m := append([]byte(nil), good[:12]...)
		m = append(m, byte(len(label)))
		m = append(m, label...)
		m = append(m, 3, 'c', 'o', 'm', 0, 0, 1, 0, 1)
		binary.BigEndian.PutUint16(m[4:], 1)
		got := parseReply(t, r.Answer(context.Background(), m))
		if got.hdr.RCode != dnsmessage.RCodeRefused {
			t.Errorf("label %q: rcode %v, want REFUSED", label, got.hdr.RCode)
		}
	}
	if c := res.Calls(); len(c) != 0 {
		t.Fatalf("malformed queries reached the resolver: %q", c)
	}
}

func TestInFlightCap(t *testing.T) {
	pol, _ := policy.Parse([]string{"*"}, nil)
	res := &fakeResolver{table: map[string][]netip.Addr{}, delay: 300 * time.Millisecond}
	for i := 0; i < MaxInFlight+10; i++ {
		res.table[fmt.Sprintf("h%d.test", i)] = addrs("203.0.113.1")
	}
	r := NewResponder(Config{Policy: pol, Resolver: res})
	var wg sync.WaitGroup
	var mu sync.Mutex
	rcodes := map[dnsmessage.RCode]int{}
	for i := 0; i < MaxInFlight+10; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			got := parseReply(t, r.Answer(context.Background(), buildQuery(t, fmt.Sprintf("h%d.test.", i), dnsmessage.TypeA, false)))
			mu.Lock()
			rcodes[got.hdr.RCode]++
			mu.Unlock()
		}(i)
	}
	wg.Wait()
	if rcodes[dnsmessage.RCodeSuccess] > MaxInFlight || rcodes[dnsmessage.RCodeServerFailure] == 0 {
		t.Fatalf("in-flight cap not enforced: %v", rcodes)
	}
	if n := len(res.Calls()); n > MaxInFlight {
		t.Fatalf("%d lookups, cap %d", n, MaxInFlight)
	}
}

func TestAllocator(t *testing.T) {
	a := NewSyntheticAllocator()
	x, y := a.Assign("x.test"), a.Assign("y.test")
	if x == y || !policy.SyntheticPrefix.Contains(x) || !policy.SyntheticPrefix.Contains(y) {
		t.Fatalf("x=%s y=%s", x, y)
	}
	if x == netip.MustParseAddr("198.18.0.0") {
		t.Fatal("handed out the network address")
	}
	if a.Assign("x.test") != x {
		t.Fatal("not stable")
	}
	if n, ok := a.Lookup(x); !ok || n != "x.test" {
		t.Fatalf("Lookup(%s) = %q %v", x, n, ok)
	}
	if n, ok := a.Lookup(netip.AddrFrom16(x.As16())); !ok || n != "x.test" {
		t.Fatalf("Lookup(mapped) = %q %v", n, ok)
	}
	for _, s := range []string{"198.18.200.200", "10.0.0.1", "198.20.0.1", "::1", "198.17.255.255"} {
		if _, ok := a.Lookup(netip.MustParseAddr(s)); ok {
			t.Errorf("Lookup(%s) found a name", s)
		}
	}

	// Small allocator: eviction of the least recently used, and never the
	// first or last address.
	s, err := NewAllocator(netip.MustParsePrefix("10.0.0.0/29"), 0) // 6 usable
	if err != nil {
		t.Fatal(err)
	}
	seen := map[netip.Addr]bool{}
	for i := 0; i < 6; i++ {
		ip := s.Assign(fmt.Sprintf("n%d", i))
		if ip == netip.MustParseAddr("10.0.0.0") || ip == netip.MustParseAddr("10.0.0.7") || seen[ip] {
			t.Fatalf("bad address %s", ip)
		}
		seen[ip] = true
	}
	n0 := s.Assign("n0") // touch n0: n1 is now the oldest
	_ = n0
	s.Assign("n6")
	if s.Len() != 6 {
		t.Fatalf("Len = %d", s.Len())
	}
	for ip := range seen {
		if n, ok := s.Lookup(ip); ok && n == "n1" {
			t.Fatal("n1 not evicted")
		}
	}
	if n, ok := s.Lookup(n0); !ok || n != "n0" {
		t.Fatal("recently used n0 evicted")
	}
	for _, bad := range []string{"::/64", "10.0.0.0/31", "10.0.0.1/24", "10.0.0.0/7"} {
		if _, err := NewAllocator(netip.MustParsePrefix(bad), 0); err == nil {
			t.Errorf("NewAllocator(%s) accepted", bad)
		}
	}
}

func TestServePacket(t *testing.T) {
	r, _, _ := newTestResponder(t, []string{"api.openai.com"}, nil)
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.ServePacket(ctx, pc) }()
	c, err := net.Dial("udp", pc.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write(make([]byte, MaxMessageSize+100)) // dropped, must not stop the loop
	c.Write(buildQuery(t, "api.openai.com.", dnsmessage.TypeA, false))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 1500)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	if got := parseReply(t, buf[:n]); got.hdr.RCode != dnsmessage.RCodeSuccess || len(got.answers) != 1 {
		t.Fatalf("reply %+v", got)
	}
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("ServePacket did not stop")
	}
}

func TestServeConn(t *testing.T) {
	r, _, _ := newTestResponder(t, []string{"api.openai.com"}, nil)
	a, b := net.Pipe()
	done := make(chan error, 1)
	go func() { done <- r.ServeConn(context.Background(), a) }()
	for _, name := range []string{"api.openai.com.", "nope.test."} {
		q := buildQuery(t, name, dnsmessage.TypeA, false)
		out := binary.BigEndian.AppendUint16(nil, uint16(len(q)))
		if _, err := b.Write(append(out, q...)); err != nil {
			t.Fatal(err)
		}
		var l [2]byte
		if _, err := io.ReadFull(b, l[:]); err != nil {
			t.Fatal(err)
		}
		msg := make([]byte, binary.BigEndian.Uint16(l[:]))
		if _, err := io.ReadFull(b, msg); err != nil {
			t.Fatal(err)
		}
		got := parseReply(t, msg)
		if want := map[bool]dnsmessage.RCode{true: dnsmessage.RCodeSuccess, false: dnsmessage.RCodeNameError}[strings.HasPrefix(name, "api")]; got.hdr.RCode != want {
			t.Fatalf("%s: %v", name, got.hdr.RCode)
		}
	}
	// A hostile length closes the connection without reading it.
	b.Write([]byte{0xff, 0xff})
	if err := <-done; err == nil {
		t.Fatal("ServeConn accepted a 65535-byte message")
	}
}

func TestSystemResolverLiteral(t *testing.T) {
	// An IP literal resolves without any query leaving the host.
	got, err := SystemResolver(time.Second).LookupNetIP(context.Background(), "ip", "127.0.0.1")
	if err != nil || len(got) != 1 || got[0].Unmap() != netip.MustParseAddr("127.0.0.1") {
		t.Fatalf("got %v %v", got, err)
	}
}

// FuzzAnswer feeds arbitrary messages to a Responder whose policy allows
// everything: it must not panic, must answer only with well-formed
// messages, must only look up valid names, and must answer in range.
func FuzzAnswer(f *testing.F) {
	f.Add(buildQuery(f, "api.openai.com.", dnsmessage.TypeA, false))
	f.Add(buildQuery(f, "a.example.com.", dnsmessage.TypeAAAA, true))
	f.Add(rawMsg(f, dnsmessage.Header{}, []string{"a.", "b."}, 1, 1, true))
	f.Add([]byte{0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xC0, 12, 0, 1, 0, 1})
	pol, _ := policy.Parse([]string{"*"}, nil)
	f.Fuzz(func(t *testing.T, msg []byte) {
		res := &fakeResolver{table: map[string][]netip.Addr{}}
		r := NewResponder(Config{Policy: pol, Resolver: &anyResolver{res}})
		reply := r.Answer(context.Background(), msg)
		for _, name := range res.Calls() {
			if c, err := policy.CanonicalName(name); err != nil || c != name {
				t.Fatalf("looked up non-canonical %q", name)
			}
		}
		if reply == nil {
			return
		}
		var p dnsmessage.Parser
		h, err := p.Start(reply)
		if err != nil || !h.Response {
			t.Fatalf("bad reply header: %v", err)
		}
		p.SkipAllQuestions()
		ans, err := p.AllAnswers()
		if err != nil {
			t.Fatalf("bad reply: %v", err)
		}
		for _, a := range ans {
			ar, ok := a.Body.(*dnsmessage.AResource)
			if !ok || !policy.SyntheticPrefix.Contains(netip.AddrFrom4(ar.A)) {
				t.Fatalf("answer %v", a)
			}
		}
	})
}

// anyResolver resolves every name to a public address, recording it.
type anyResolver struct{ f *fakeResolver }

func (a *anyResolver) LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error) {
	a.f.mu.Lock()
	a.f.calls = append(a.f.calls, host)
	a.f.mu.Unlock()
	return addrs("203.0.113.1"), nil
}
