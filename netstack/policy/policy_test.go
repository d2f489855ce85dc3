package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"reflect"
	"strings"
	"sync"
	"testing"
)

func mustParse(t testing.TB, allow, private []string) *Policy {
	t.Helper()
	p, err := Parse(allow, private)
	if err != nil {
		t.Fatalf("Parse(%q, %q): %v", allow, private, err)
	}
	return p
}

func TestParseCanonical(t *testing.T) {
	tests := []struct {
		in   string
		want string
	}{
		{"api.openai.com", "api.openai.com"},
		{"API.OpenAI.Com", "api.openai.com"},
		{"api.openai.com.", "api.openai.com"},
		{"*.example.com", "*.example.com"},
		{"*.Example.COM.", "*.example.com"},
		{"example.com:8443", "example.com:8443"},
		{"*.example.com:443", "*.example.com:443"},
		{"*", "*"},
		{"*:443", "*:443"},
		{"localhost", "localhost"},
		{"_svc.example.com", "_svc.example.com"},
		{"xn--bcher-kva.example", "xn--bcher-kva.example"},
		{"a-b.c-d.e1", "a-b.c-d.e1"},
		{"1e100.net", "1e100.net"},
		{"203.0.113.7", "203.0.113.7"},
		{"203.0.113.7:443", "203.0.113.7:443"},
		{"198.51.100.0/24", "198.51.100.0/24"},
		{"198.51.100.0/24:5432", "198.51.100.0/24:5432"},
		{"203.0.113.7/32", "203.0.113.7"},
		{"[2001:db8::1]:443", "[2001:db8::1]:443"},
		{"[2001:DB8:0::1]", "2001:db8::1"},
		{"2001:db8::1", "2001:db8::1"},
		{"2001:db8::/32", "2001:db8::/32"},
		{"[2001:db8::/32]:22", "[2001:db8::/32]:22"},
		{"example.com:1", "example.com:1"},
		{"example.com:65535", "example.com:65535"},
		{strings.Repeat("a", 63) + ".com", strings.Repeat("a", 63) + ".com"},
	}
	for _, tt := range tests {
		p, err := Parse([]string{tt.in}, nil)
		if err != nil {
			t.Errorf("Parse(%q): %v", tt.in, err)
			continue
		}
		got, _ := p.Patterns()
		if len(got) != 1 || got[0] != tt.want {
			t.Errorf("Parse(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestParseRejects(t *testing.T) {
	long := strings.Repeat("a", 63)
	name254 := strings.Join([]string{long, long, long, strings.Repeat("b", 61)}, ".") // 63*3+61+3 = 253
	tests := []struct {
		in     string
		reason string // substring of the error
	}{
		{"", "empty pattern"},
		{"exa\x00mple.com", "NUL"},
		{"example.com\x00", "NUL"},
		{"example.com\x00.evil.com", "NUL"},
		{"example .com", "whitespace"},
		{" example.com", "whitespace"},
		{"example.com\t", "whitespace"},
		{"example.com\n", "whitespace"},
		{"exa\x01mple.com", "control"},
		{"exa\x7fmple.com", "control"},
		{"bücher.example", "non-ASCII"},
		{"example..com", "empty label"},
		{".example.com", "empty label"},
		{"example.com..", "empty label"},
		{".", "empty name"},
		{"*.", "needs a domain"},
		{"*..", "needs a domain"},
		{strings.Repeat("a", 64) + ".com", "label longer than 63"},
		{name254 + "x", "longer than 253"},
		{"*." + name254, "longer than 253"},
		{"**", "'*' is only allowed"},
		{"*.*.example.com", "'*' is only allowed"},
		{"*example.com", "'*' is only allowed"},
		{"foo.*.example.com", "'*' is only allowed"},
		{"example.*", "'*' is only allowed"},
		{"ex*ample.com", "'*' is only allowed"},
		{"example.com:0", "out of range"},
		{"example.com:65536", "out of range"},
		{"example.com:99999", "out of range"},
		{"example.com:123456", "out of range"},
		{"example.com:", "empty port"},
		{"example.com:-1", "not a decimal"},
		{"example.com:+443", "not a decimal"},
		{"example.com:0443", "leading zero"},
		{"example.com:0x1bb", "not a decimal"},
		{"example.com:443:80", "not an IPv6"},
		{":443", "missing host"},
		{"-example.com", "starts or ends with '-'"},
		{"example-.com", "starts or ends with '-'"},
		{"exa_mple.c%m", "invalid character"},
		{"user@example.com", "invalid character"},
		{"http://example.com", "not a decimal"},
		{"example.com/path", "invalid CIDR"},
		{"example.com#", "invalid character"},
		{"127.1", "invalid IP"},
		{"1.2.3", "invalid IP"},
		{"1.2.3.4.5", "invalid IP"},
		{"256.1.1.1", "invalid IP"},
		{"010.0.0.1", "invalid IP"},
		{"0x7f000001", "numeric"},
		{"0x7f.0x1", "numeric"},
		{"foo.123", "numeric"},
		{"2130706433", "numeric"},
		{"198.51.100.7/24", "host bits"},
		{"198.51.100.0/33", "invalid CIDR"},
		{"198.51.100.0/", "invalid CIDR"},
		{"198.51.100.0/-1", "invalid CIDR"},
		{"[2001:db8::1", "missing ']'"},
		{"2001:db8::1]", "stray bracket"},
		{"[2001:db8::1]443", "after ']'"},
		{"[[2001:db8::1]]", "nested"},
		{"[203.0.113.7]:443", "only for IPv6"},
		{"[]:443", "empty address"},
		{"[example.com]:443", "invalid IP"},
		{"[2001:db8::1]:0", "out of range"},
		{"fe80::1%eth0", "zones"},
		{"[fe80::1%eth0]:22", "zones"},
		{"::ffff:10.0.0.1", "IPv4-mapped"},
		{"[::ffff:203.0.113.7]:443", "IPv4-mapped"},
		{"2001:db8::1:", "not an IPv6"},
		{strings.Repeat("a.", 200), "longer than"},
	}
	for _, tt := range tests {
		_, err := Parse([]string{tt.in}, nil)
		if err == nil {
			t.Errorf("Parse(%q): accepted, want error containing %q", tt.in, tt.reason)
			continue
		}
		var pe *PatternError
		if !errors.As(err, &pe) {
			t.Errorf("Parse(%q): error %v is not a *PatternError", tt.in, err)
		}
		if !strings.Contains(err.Error(), tt.reason) {
			t.Errorf("Parse(%q): error %q, want it to contain %q", tt.in, err, tt.reason)
		}
	}
}

func TestParseCommaLists(t *testing.T) {
	p := mustParse(t, []string{"a.com,b.com:443", "c.com", "A.com"}, []string{"db.internal:5432,10.0.0.0/8"})
	allow, priv := p.Patterns()
	if want := []string{"a.com", "b.com:443", "c.com"}; !reflect.DeepEqual(allow, want) {
		t.Errorf("allow = %q, want %q", allow, want)
	}
	if want := []string{"db.internal:5432", "10.0.0.0/8"}; !reflect.DeepEqual(priv, want) {
		t.Errorf("private = %q, want %q", priv, want)
	}
	if got, want := p.String(), "allow-host=a.com,b.com:443,c.com allow-private=db.internal:5432,10.0.0.0/8"; got != want {
		t.Errorf("String = %q, want %q", got, want)
	}
	for _, bad := range []string{"a.com,", ",a.com", "a.com,,b.com", "a.com, b.com"} {
		if _, err := Parse([]string{bad}, nil); err == nil {
			t.Errorf("Parse(%q) accepted", bad)
		}
	}
	// The flag name in errors follows the list.
	_, err := Parse(nil, []string{"x..y"})
	if err == nil || !strings.Contains(err.Error(), "--allow-private") {
		t.Errorf("private error = %v, want it to name --allow-private", err)
	}
	_, err = Parse([]string{"x..y"}, nil)
	if err == nil || !strings.Contains(err.Error(), "--allow-host") {
		t.Errorf("allow error = %v, want it to name --allow-host", err)
	}
}

func TestParsePrivateRestrictions(t *testing.T) {
	for _, bad := range []string{"*", "*:443", "0.0.0.0/0", "::/0", "[::/0]:22"} {
		if _, err := Parse(nil, []string{bad}); err == nil {
			t.Errorf("allow-private %q accepted", bad)
		}
	}
	for _, ok := range []string{"*.corp.internal", "localhost:8080", "10.0.0.0/8", "[fd00::1]:22", "127.0.0.1"} {
		if _, err := Parse(nil, []string{ok}); err != nil {
			t.Errorf("allow-private %q: %v", ok, err)
		}
	}
	// "*" and /0 are fine as allow-host patterns.
	mustParse(t, []string{"*", "0.0.0.0/0"}, nil)
}

func TestEmptyPolicyIsSealed(t *testing.T) {
	for _, p := range []*Policy{nil, mustParse(t, nil, nil)} {
		if !p.Empty() || p.String() != "sealed" {
			t.Errorf("Empty=%v String=%q", p.Empty(), p.String())
		}
		if p.AllowName("example.com", 443) || p.AllowNameAnyPort("example.com") ||
			p.AllowIP(netip.MustParseAddr("203.0.113.7"), 443) ||
			p.PrivateAllowed("localhost", netip.MustParseAddr("127.0.0.1"), 80) {
			t.Error("empty policy allowed something")
		}
	}
	var nilP *Policy
	if err := nilP.Add("a.com"); err == nil {
		t.Error("Add on nil Policy succeeded")
	}
}

func TestAllowName(t *testing.T) {
	p := mustParse(t, []string{
		"api.openai.com",
		"*.example.com",
		"port.test:8443",
		"*.ports.test:443",
		"single",
	}, []string{"db.internal:5432", "*.corp.internal"})
	tests := []struct {
		name string
		port uint16
		want bool
	}{
		{"api.openai.com", 443, true},
		{"api.openai.com", 80, true},
		{"API.OPENAI.COM", 443, true},
		{"api.openai.com.", 443, true},
		{"api.openai.com..", 443, false},
		{"openai.com", 443, false},
		{"x.api.openai.com", 443, false},
		{"api.openai.com.evil.com", 443, false},
		{"api.openai.co", 443, false},
		{"api-openai.com", 443, false},
		{"api.openai.com\x00", 443, false},
		{"api.openai.com\x00.evil.com", 443, false},
		{"api.openai.com ", 443, false},
		{"api.openai.com", 0, false},

		{"www.example.com", 443, true},
		{"a.b.c.example.com", 1, true},
		{"WWW.Example.Com.", 443, true},
		{"example.com", 443, false}, // apex is not a subdomain
		{"example.com.", 443, false},
		{"evil-example.com", 443, false},
		{"evilexample.com", 443, false},
		{"www.evil-example.com", 443, false},
		{"example.com.evil.com", 443, false},
		{"www.example.com.evil.com", 443, false},
		{".example.com", 443, false},
		{"x..example.com", 443, false},
		{"*.example.com", 443, false}, // a query name is never a wildcard
		{"\x00.example.com", 443, false},
		{"a\x00b.example.com", 443, false},

		{"port.test", 8443, true},
		{"port.test", 443, false},
		{"port.test", 80, false},
		{"a.ports.test", 443, true},
		{"a.ports.test", 80, false},
		{"ports.test", 443, false},

		{"single", 1, true},
		{"single.", 1, true},
		{"single.x", 1, false},

		// allow-private patterns alone do not allow the name.
		{"db.internal", 5432, false},
		{"db.internal", 5433, false},
		{"x.corp.internal", 22, false},
		{"corp.internal", 22, false},

		// Numeric spellings are not names.
		{"127.0.0.1", 80, false},
		{"0x7f000001", 80, false},
	}
	for _, tt := range tests {
		if got := p.AllowName(tt.name, tt.port); got != tt.want {
			t.Errorf("AllowName(%q, %d) = %v, want %v", tt.name, tt.port, got, tt.want)
		}
	}

	anyPort := []struct {
		name string
		want bool
	}{
		{"port.test", true},
		{"a.ports.test", true},
		{"db.internal", false}, // allow-private only
		{"nope.test", false},
		{"example.com", false},
		{"", false},
	}
	for _, tt := range anyPort {
		if got := p.AllowNameAnyPort(tt.name); got != tt.want {
			t.Errorf("AllowNameAnyPort(%q) = %v, want %v", tt.name, got, tt.want)
		}
	}
}

func TestAllowStar(t *testing.T) {
	p := mustParse(t, []string{"*"}, nil)
	for _, n := range []string{"example.com", "a.b.c", "localhost"} {
		if !p.AllowName(n, 443) {
			t.Errorf("'*' does not allow %q", n)
		}
	}
	for _, n := range []string{"", "a..b", "a\x00b", "127.1"} {
		if p.AllowName(n, 443) {
			t.Errorf("'*' allows invalid name %q", n)
		}
	}
	if !p.AllowIP(netip.MustParseAddr("203.0.113.7"), 443) {
		t.Error("'*' does not match an IP")
	}
	p443 := mustParse(t, []string{"*:443"}, nil)
	if !p443.AllowName("x.com", 443) || p443.AllowName("x.com", 80) {
		t.Error("'*:443' port restriction wrong")
	}
}

func TestAllowIP(t *testing.T) {
	p := mustParse(t, []string{
		"203.0.113.7",
		"198.51.100.0/24:5432",
		"[2001:db8::1]:443",
		"2001:db8:1::/48",
		"example.com",
	}, []string{"10.1.2.3:22", "192.168.0.0/16"})
	tests := []struct {
		ip   string
		port uint16
		want bool
	}{
		{"203.0.113.7", 1, true},
		{"203.0.113.7", 65535, true},
		{"203.0.113.7", 0, false},
		{"203.0.113.8", 443, false},
		{"::ffff:203.0.113.7", 443, true}, // mapped form is the same host
		{"198.51.100.0", 5432, true},
		{"198.51.100.255", 5432, true},
		{"198.51.100.1", 5433, false},
		{"198.51.101.1", 5432, false},
		{"2001:db8::1", 443, true},
		{"2001:db8::1", 80, false},
		{"2001:db8::2", 443, false},
		{"2001:db8:1:ffff::1", 80, true},
		{"2001:db8:2::1", 80, false},
		{"10.1.2.3", 22, false}, // allow-private alone allows nothing
		{"10.1.2.3", 23, false},
		{"192.168.44.1", 80, false},
		{"8.8.8.8", 53, false},
	}
	for _, tt := range tests {
		if got := p.AllowIP(netip.MustParseAddr(tt.ip), tt.port); got != tt.want {
			t.Errorf("AllowIP(%s, %d) = %v, want %v", tt.ip, tt.port, got, tt.want)
		}
	}
	if p.AllowIP(netip.Addr{}, 443) {
		t.Error("AllowIP(invalid) = true")
	}
	if p.AllowIP(netip.MustParseAddr("2001:db8::1%eth0"), 443) {
		t.Error("AllowIP(zoned) = true")
	}
	// A name rule never matches an address and vice versa.
	if p.AllowName("203.0.113.7", 443) {
		t.Error("IP rule matched as a name")
	}
}

func TestPrivateAllowed(t *testing.T) {
	p := mustParse(t, []string{"svc.test", "open.test"}, []string{
		"svc.test:8080", "*.lan", "127.0.0.1:9000", "10.0.0.0/8",
	})
	ip := netip.MustParseAddr
	tests := []struct {
		host string
		ip   string
		port uint16
		want bool
	}{
		{"svc.test", "127.0.0.1", 8080, true},
		{"SVC.test.", "127.0.0.1", 8080, true},
		{"svc.test", "127.0.0.1", 8081, false},
		{"svc.test", "169.254.169.254", 8080, true}, // naming the host covers all its addresses
		{"open.test", "127.0.0.1", 8080, false},     // allowed, but not named in allow-private
		{"printer.lan", "192.168.1.9", 631, true},
		{"lan", "192.168.1.9", 631, false},
		{"evil-lan", "192.168.1.9", 631, false},
		{"", "127.0.0.1", 9000, true}, // by address
		{"", "127.0.0.1", 9001, false},
		{"", "127.0.0.2", 9000, false},
		{"other.test", "127.0.0.1", 9000, true}, // the address is named
		{"", "10.9.8.7", 1, true},
		{"", "::ffff:10.9.8.7", 1, true},
		{"", "172.16.0.1", 1, false},
		{"svc.test", "127.0.0.1", 0, false},
		{"svc.test\x00", "127.0.0.2", 8080, false},
	}
	for _, tt := range tests {
		if got := p.PrivateAllowed(tt.host, ip(tt.ip), tt.port); got != tt.want {
			t.Errorf("PrivateAllowed(%q, %s, %d) = %v, want %v", tt.host, tt.ip, tt.port, got, tt.want)
		}
	}
	if !p.PrivateAllowedAnyPort("svc.test", ip("127.0.0.1")) || p.PrivateAllowedAnyPort("open.test", ip("127.0.0.2")) ||
		!p.PrivateAllowedAnyPort("", ip("127.0.0.1")) || p.PrivateAllowedAnyPort("", ip("172.16.0.1")) {
		t.Error("PrivateAllowedAnyPort wrong")
	}
	// allow-host alone never lifts the private rule.
	q := mustParse(t, []string{"*", "127.0.0.1", "10.0.0.0/8"}, nil)
	if q.PrivateAllowed("localhost", ip("127.0.0.1"), 80) || q.PrivateAllowed("", ip("10.0.0.1"), 80) {
		t.Error("allow-host lifted the private rule")
	}
}

func TestIsPrivate(t *testing.T) {
	private := []string{
		"0.0.0.0", "0.1.2.3",
		"10.0.0.1", "10.255.255.255",
		"100.64.0.1", "100.127.255.255", "100.100.100.200",
		"127.0.0.1", "127.255.255.254",
		"169.254.169.254", "169.254.0.1",
		"172.16.0.1", "172.31.255.255",
		"192.0.0.170", "192.88.99.1",
		"192.168.1.1",
		"198.18.0.1", "198.19.255.255",
		"224.0.0.1", "239.255.255.250",
		"240.0.0.1", "255.255.255.255",
		"::", "::1", "::10.0.0.1", "::8.8.8.8",
		"::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::ffff:198.18.0.1",
		"::ffff:0:7f00:1",
		"100::1",
		"2001::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2",
		"fc00::1", "fd00:ec2::254", "fdff::1",
		"fe80::1", "febf::1", "fec0::1",
		"ff02::1", "ff05::2",
		"64:ff9b::7f00:1", "64:ff9b::a00:1", "64:ff9b::169.254.169.254",
		"64:ff9b:1::1",
		"2002:7f00:1::", "2002:a00:1::1", "2002:c0a8:101::",
	}
	public := []string{
		"1.1.1.1", "8.8.8.8", "9.9.9.9",
		"11.0.0.1", "100.63.255.255", "100.128.0.0",
		"126.255.255.255", "128.0.0.1",
		"169.253.255.255", "169.255.0.0",
		"172.15.255.255", "172.32.0.0",
		"192.0.1.1", "192.0.2.1", "192.167.255.255", "192.169.0.0",
		"198.17.255.255", "198.20.0.0",
		"198.51.100.1", "203.0.113.7",
		"223.255.255.255",
		"::ffff:8.8.8.8", "::ffff:203.0.113.7",
		"2001:4860:4860::8888", "2606:4700::1111", "2001:db8::1",
		"64:ff9b::808:808", "2002:808:808::",
		"fbff::1", "fe7f::1",
	}
	for _, s := range private {
		if !IsPrivate(netip.MustParseAddr(s)) {
			t.Errorf("IsPrivate(%s) = false, want true", s)
		}
	}
	for _, s := range public {
		if IsPrivate(netip.MustParseAddr(s)) {
			t.Errorf("IsPrivate(%s) = true, want false", s)
		}
	}
	if !IsPrivate(netip.Addr{}) {
		t.Error("IsPrivate(invalid) = false")
	}
	if !IsPrivate(netip.MustParseAddr("2001:4860::1%eth0")) {
		t.Error("IsPrivate(zoned) = false")
	}
	if !SyntheticPrefix.Contains(netip.MustParseAddr("198.18.0.2")) {
		t.Error("SyntheticPrefix wrong")
	}
}

func TestAddRemove(t *testing.T) {
	p := mustParse(t, []string{"a.com"}, nil)
	if err := p.Add("b.com,c.com:443", "a.com"); err != nil {
		t.Fatal(err)
	}
	if !p.AllowName("b.com", 1) || !p.AllowName("c.com", 443) {
		t.Fatal("added patterns not active")
	}
	if err := p.Add("ok.com", "bad..com"); err == nil {
		t.Fatal("Add accepted a bad pattern")
	}
	if p.AllowName("ok.com", 1) {
		t.Fatal("failed Add left a partial change")
	}
	if err := p.Remove("B.COM."); err != nil {
		t.Fatal(err)
	}
	if p.AllowName("b.com", 1) {
		t.Fatal("removed pattern still active")
	}
	err := p.Remove("c.com:443", "zzz.com")
	if !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), "zzz.com") {
		t.Fatalf("Remove missing: %v", err)
	}
	if p.AllowName("c.com", 443) {
		t.Fatal("Remove with a missing pattern did not remove the present one")
	}
	if err := p.AddPrivate("127.0.0.1:80"); err != nil {
		t.Fatal(err)
	}
	if !p.PrivateAllowed("", netip.MustParseAddr("127.0.0.1"), 80) {
		t.Fatal("AddPrivate not active")
	}
	if err := p.RemovePrivate("127.0.0.1:80"); err != nil {
		t.Fatal(err)
	}
	if p.PrivateAllowed("", netip.MustParseAddr("127.0.0.1"), 80) {
		t.Fatal("RemovePrivate not active")
	}
	if err := p.AddPrivate("*"); err == nil {
		t.Fatal("AddPrivate(*) accepted")
	}
	allow, priv := p.Patterns()
	if !reflect.DeepEqual(allow, []string{"a.com"}) || priv != nil {
		t.Fatalf("Patterns = %q %q", allow, priv)
	}
}

func TestMaxRules(t *testing.T) {
	var many []string
	for i := 0; i < MaxRules; i++ {
		many = append(many, fmt.Sprintf("h%d.test", i))
	}
	p := mustParse(t, many, nil)
	if err := p.Add("one-more.test"); err == nil {
		t.Fatal("exceeded MaxRules")
	}
	if err := p.Add("h5.test"); err != nil {
		t.Fatalf("duplicate counted against the limit: %v", err)
	}
}

func TestConcurrentChanges(t *testing.T) {
	p := mustParse(t, []string{"stable.test"}, nil)
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if !p.AllowName("stable.test", 443) {
					t.Error("stable pattern disappeared")
					return
				}
				p.AllowName("flap.test", 443)
				p.Patterns()
			}
		}()
	}
	for i := 0; i < 2000; i++ {
		if err := p.Add("flap.test"); err != nil {
			t.Fatal(err)
		}
		if err := p.Remove("flap.test"); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
}

func TestCanonicalName(t *testing.T) {
	good := map[string]string{
		"Example.COM":  "example.com",
		"example.com.": "example.com",
		"a":            "a",
		"a-1.b_2":      "a-1.b_2",
	}
	for in, want := range good {
		got, err := CanonicalName(in)
		if err != nil || got != want {
			t.Errorf("CanonicalName(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"", ".", "..", "a..b", "a.b..", "*.a", "a b", "a\x00", "é.com", "a/b", "a:b", "1.2.3.4", "x.0xff", "-a", "a-"} {
		if got, err := CanonicalName(bad); err == nil {
			t.Errorf("CanonicalName(%q) = %q, want error", bad, got)
		}
	}
}

// FuzzParse checks that Parse never panics, that what it accepts has a
// canonical form that parses to itself, and that accepted patterns contain
// none of the bytes the grammar forbids.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"api.openai.com", "*.example.com", "example.com:8443", "*", "203.0.113.7",
		"198.51.100.0/24:5432", "[2001:db8::1]:443", "a,b", "a\x00b", "*.*", "[::ffff:1.2.3.4]",
		"2001:db8::/32", "x.com.", "fe80::1%eth0", "127.1", "0x7f.1",
	} {
		f.Add(s, false)
		f.Add(s, true)
	}
	f.Fuzz(func(t *testing.T, s string, private bool) {
		var p *Policy
		var err error
		if private {
			p, err = Parse(nil, []string{s})
		} else {
			p, err = Parse([]string{s}, nil)
		}
		if err != nil {
			return
		}
		if strings.ContainsAny(s, "\x00 \t\r\n") {
			t.Fatalf("accepted %q with a forbidden byte", s)
		}
		allow, priv := p.Patterns()
		list := allow
		if private {
			list = priv
		}
		for _, c := range list {
			var q *Policy
			if private {
				q, err = Parse(nil, []string{c})
			} else {
				q, err = Parse([]string{c}, nil)
			}
			if err != nil {
				t.Fatalf("canonical %q of %q does not parse: %v", c, s, err)
			}
			a2, p2 := q.Patterns()
			l2 := a2
			if private {
				l2 = p2
			}
			if len(l2) != 1 || l2[0] != c {
				t.Fatalf("canonical %q of %q re-parses as %q", c, s, l2)
			}
		}
	})
}

// FuzzAllowName checks that the matchers never panic and that a name they
// allow under a wildcard really sits on a label boundary below the domain.
func FuzzAllowName(f *testing.F) {
	p, err := Parse([]string{"*.example.com", "exact.test:443"}, []string{"*.lan"})
	if err != nil {
		f.Fatal(err)
	}
	for _, s := range []string{"a.example.com", "evil-example.com", "example.com", "exact.test", "x.lan", "a\x00.example.com"} {
		f.Add(s, uint16(443))
	}
	f.Fuzz(func(t *testing.T, name string, port uint16) {
		ok := p.AllowName(name, port)
		p.AllowNameAnyPort(name)
		p.PrivateAllowed(name, netip.MustParseAddr("10.0.0.1"), port)
		if !ok {
			return
		}
		n, err := CanonicalName(name)
		if err != nil {
			t.Fatalf("allowed invalid name %q", name)
		}
		if !(strings.HasSuffix(n, ".example.com") || n == "exact.test" || strings.HasSuffix(n, ".lan")) {
			t.Fatalf("allowed %q (%q)", name, n)
		}
		if strings.HasPrefix(n, ".") || strings.Contains(n, "..") {
			t.Fatalf("allowed %q with an empty label", name)
		}
	})
}

func FuzzIsPrivate(f *testing.F) {
	f.Add([]byte{127, 0, 0, 1})
	f.Add(netip.MustParseAddr("::ffff:10.0.0.1").AsSlice())
	f.Fuzz(func(t *testing.T, b []byte) {
		ip, ok := netip.AddrFromSlice(b)
		if !ok {
			return
		}
		priv := IsPrivate(ip)
		// The mapped and unmapped forms agree.
		if ip.Is4() {
			if IsPrivate(netip.AddrFrom16(ip.As16())) != priv {
				t.Fatalf("IsPrivate disagrees on mapped %s", ip)
			}
		}
	})
}
