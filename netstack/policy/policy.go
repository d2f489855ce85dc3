// Package policy decides which destinations a sandbox may reach.
//
// A Policy is built from two lists of patterns, the values of the repeatable
// --allow-host and --allow-private flags (each value may itself be a comma
// separated list). Without any pattern a Policy allows nothing: the sandbox
// network is sealed.
//
// Pattern grammar (see docs/network.md for the full description):
//
//	pattern   = host [ ":" port ]
//	host      = name | "*." name | "*" | ipv4 | ipv4 "/" bits
//	          | "[" ipv6 "]" | "[" ipv6 "/" bits "]"
//	          | ipv6 | ipv6 "/" bits          (bare IPv6 only without a port)
//	port      = 1..65535, decimal, no sign, no leading zero
//
// Names are ASCII (use the xn-- form for IDNs), matched case-insensitively on
// label boundaries, with one trailing dot ignored. "*.example.com" matches
// every name below example.com at any depth but not example.com itself. "*"
// matches any name and any IP address (private addresses stay refused, see
// below). An IP pattern matches addresses the guest connects to by number;
// it never matches a name.
//
// Private destinations (IsPrivate: loopback, RFC 1918, link-local and cloud
// metadata, CGNAT, multicast, reserved, the synthetic 198.18.0.0/15 range,
// their IPv6 counterparts and IPv6 forms that embed such an IPv4 address) are
// refused even when an allowed name resolves to them, unless the destination
// is named by an --allow-private pattern (by name, or by address or prefix).
// The two lists are checked separately: a connection needs an --allow-host
// pattern (AllowName, AllowIP) and, when its destination is private, an
// --allow-private pattern too (PrivateAllowed). An --allow-private pattern
// alone allows nothing. --allow-private refuses the bare "*" and /0
// prefixes.
//
// A Policy is safe for concurrent use. Its rules may be changed while a
// sandbox runs (Add, Remove, AddPrivate, RemovePrivate); readers never block:
// each change publishes a new immutable rule set. The nil *Policy allows
// nothing.
package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
)

// Limits on what a pattern list may hold.
const (
	// MaxRules bounds each of the two lists (allow, allow-private).
	MaxRules = 1024
	// MaxPatternLen bounds the length of one pattern, brackets and port
	// included. A name is at most 253 bytes.
	MaxPatternLen = 300
	// MaxNameLen is the longest DNS name accepted, without the trailing dot.
	MaxNameLen = 253
	// MaxLabelLen is the longest DNS label accepted.
	MaxLabelLen = 63
)

// ErrNotFound is wrapped by the error Remove and RemovePrivate return for a
// pattern that is not in the list.
var ErrNotFound = errors.New("pattern not in the list")

// PatternError describes a pattern that does not parse.
type PatternError struct {
	Flag    string // "allow-host" or "allow-private"
	Pattern string
	Reason  string
}

func (e *PatternError) Error() string {
	return fmt.Sprintf("--%s %q: %s", e.Flag, e.Pattern, e.Reason)
}

type ruleKind uint8

const (
	kindName     ruleKind = iota + 1 // exact name
	kindWildcard                     // strict subdomains of name
	kindAny                          // "*"
	kindPrefix                       // IP address or CIDR
)

// rule is one parsed pattern. It is immutable once built.
type rule struct {
	kind   ruleKind
	name   string       // kindName, kindWildcard: canonical name (no "*.")
	prefix netip.Prefix // kindPrefix; a single address is a full-length prefix
	port   uint16       // 0: any port
	text   string       // canonical pattern, for display and Remove
}

func (r *rule) portOK(port uint16) bool { return r.port == 0 || r.port == port }

// ruleSet is an immutable snapshot of a Policy's rules.
type ruleSet struct {
	allow   []rule
	private []rule
}

// Policy is a parsed, changeable allow-list. Use Parse to build one.
type Policy struct {
	// mu serialises writers (Add, Remove, ...). Readers load set without it.
	mu sync.Mutex
	// set is replaced, never modified, by writers holding mu.
	set atomic.Pointer[ruleSet]
}

// Parse builds a Policy from the values of --allow-host and --allow-private.
// Each value may be a comma separated list. Duplicates are dropped.
func Parse(allow []string, allowPrivate []string) (*Policy, error) {
	p := &Policy{}
	p.set.Store(&ruleSet{})
	if err := p.Add(allow...); err != nil {
		return nil, err
	}
	if err := p.AddPrivate(allowPrivate...); err != nil {
		return nil, err
	}
	return p, nil
}

// Add parses patterns (each may be a comma list) and adds them to the allow
// list. Nothing is added if any pattern fails to parse.
func (p *Policy) Add(patterns ...string) error { return p.add(false, patterns) }

// AddPrivate is Add for the allow-private list.
func (p *Policy) AddPrivate(patterns ...string) error { return p.add(true, patterns) }

// Remove takes patterns off the allow list. It removes what it can and returns
// an error wrapping ErrNotFound naming those that were not there.
func (p *Policy) Remove(patterns ...string) error { return p.remove(false, patterns) }

// RemovePrivate is Remove for the allow-private list.
func (p *Policy) RemovePrivate(patterns ...string) error { return p.remove(true, patterns) }

func flagName(private bool) string {
	if private {
		return "allow-private"
	}
	return "allow-host"
}

func parseList(private bool, patterns []string) ([]rule, error) {
	var out []rule
	for _, v := range patterns {
		for _, one := range strings.Split(v, ",") {
			r, err := parseRule(one, private)
			if err != nil {
				return nil, err
			}
			out = append(out, r)
		}
	}
	return out, nil
}

func (p *Policy) add(private bool, patterns []string) error {
	if p == nil {
		return errors.New("policy: nil Policy")
	}
	rules, err := parseList(private, patterns)
	if err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	old := p.load()
	list := old.allow
	if private {
		list = old.private
	}
	next := append([]rule(nil), list...)
	for _, r := range rules {
		if indexOf(next, r.text) >= 0 {
			continue
		}
		if len(next) >= MaxRules {
			return &PatternError{Flag: flagName(private), Pattern: r.text, Reason: fmt.Sprintf("too many patterns (at most %d)", MaxRules)}
		}
		next = append(next, r)
	}
	p.store(old, private, next)
	return nil
}

func (p *Policy) remove(private bool, patterns []string) error {
	if p == nil {
		return errors.New("policy: nil Policy")
	}
	rules, err := parseList(private, patterns)
	if err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	old := p.load()
	list := old.allow
	if private {
		list = old.private
	}
	next := append([]rule(nil), list...)
	var missing []string
	for _, r := range rules {
		i := indexOf(next, r.text)
		if i < 0 {
			missing = append(missing, r.text)
			continue
		}
		next = append(next[:i], next[i+1:]...)
	}
	p.store(old, private, next)
	if len(missing) > 0 {
		return fmt.Errorf("--%s %s: %w", flagName(private), strings.Join(missing, ","), ErrNotFound)
	}
	return nil
}

func (p *Policy) store(old *ruleSet, private bool, list []rule) {
	n := &ruleSet{allow: old.allow, private: old.private}
	if private {
		n.private = list
	} else {
		n.allow = list
	}
	p.set.Store(n)
}

func indexOf(list []rule, text string) int {
	for i := range list {
		if list[i].text == text {
			return i
		}
	}
	return -1
}

var emptySet = &ruleSet{}

func (p *Policy) load() *ruleSet {
	if p == nil {
		return emptySet
	}
	if s := p.set.Load(); s != nil {
		return s
	}
	return emptySet
}

// Patterns returns the canonical form of both lists, in the order added.
func (p *Policy) Patterns() (allow, allowPrivate []string) {
	s := p.load()
	for i := range s.allow {
		allow = append(allow, s.allow[i].text)
	}
	for i := range s.private {
		allowPrivate = append(allowPrivate, s.private[i].text)
	}
	return allow, allowPrivate
}

// String describes the policy for humans, e.g.
// "allow-host=api.openai.com,*.example.com:443 allow-private=db:5432", or
// "sealed" when both lists are empty.
func (p *Policy) String() string {
	a, pr := p.Patterns()
	if len(a) == 0 && len(pr) == 0 {
		return "sealed"
	}
	var parts []string
	if len(a) > 0 {
		parts = append(parts, "allow-host="+strings.Join(a, ","))
	}
	if len(pr) > 0 {
		parts = append(parts, "allow-private="+strings.Join(pr, ","))
	}
	return strings.Join(parts, " ")
}

// Empty reports whether the policy allows nothing at all.
func (p *Policy) Empty() bool {
	s := p.load()
	return len(s.allow) == 0 && len(s.private) == 0
}

func matchName(r *rule, name string) bool {
	switch r.kind {
	case kindAny:
		return true
	case kindName:
		return name == r.name
	case kindWildcard:
		return len(name) > len(r.name)+1 &&
			name[len(name)-len(r.name)-1] == '.' &&
			name[len(name)-len(r.name):] == r.name
	}
	return false
}

func matchIP(r *rule, ip netip.Addr) bool {
	switch r.kind {
	case kindAny:
		return true
	case kindPrefix:
		return r.prefix.Contains(ip)
	}
	return false
}

// AllowName reports whether an --allow-host pattern allows connections to
// name on port (the --allow-private list is not consulted). Port 0 never
// matches. An invalid name (see CanonicalName) never matches.
func (p *Policy) AllowName(name string, port uint16) bool {
	if port == 0 {
		return false
	}
	return p.allowName(name, func(r *rule) bool { return r.portOK(port) })
}

// AllowNameAnyPort reports whether the policy allows name on at least one
// port. The DNS responder uses it: a query carries no port.
func (p *Policy) AllowNameAnyPort(name string) bool {
	return p.allowName(name, func(*rule) bool { return true })
}

func (p *Policy) allowName(name string, portOK func(*rule) bool) bool {
	n, err := CanonicalName(name)
	if err != nil {
		return false
	}
	s := p.load()
	for i := range s.allow {
		if portOK(&s.allow[i]) && matchName(&s.allow[i], n) {
			return true
		}
	}
	return false
}

// AllowIP reports whether an --allow-host pattern allows connections to ip
// on port by address (the --allow-private list is not consulted). It says
// nothing about private ranges: callers must also refuse IsPrivate addresses
// unless PrivateAllowed. Port 0 never matches.
func (p *Policy) AllowIP(ip netip.Addr, port uint16) bool {
	ip, ok := matchableIP(ip)
	if !ok || port == 0 {
		return false
	}
	s := p.load()
	for i := range s.allow {
		if s.allow[i].portOK(port) && matchIP(&s.allow[i], ip) {
			return true
		}
	}
	return false
}

// PrivateAllowed reports whether an --allow-private pattern names the
// destination: host (a name, "" when connecting by address) or ip, on port.
// It does not allow the destination by itself (see AllowName, AllowIP).
func (p *Policy) PrivateAllowed(host string, ip netip.Addr, port uint16) bool {
	if port == 0 {
		return false
	}
	return p.privateAllowed(host, ip, func(r *rule) bool { return r.portOK(port) })
}

// PrivateAllowedAnyPort is PrivateAllowed for at least one port. The DNS
// responder uses it: a query carries no port.
func (p *Policy) PrivateAllowedAnyPort(host string, ip netip.Addr) bool {
	return p.privateAllowed(host, ip, func(*rule) bool { return true })
}

func (p *Policy) privateAllowed(host string, ip netip.Addr, portOK func(*rule) bool) bool {
	name, nameErr := CanonicalName(host)
	ip, ipOK := matchableIP(ip)
	s := p.load()
	for i := range s.private {
		r := &s.private[i]
		if !portOK(r) {
			continue
		}
		if nameErr == nil && r.kind != kindPrefix && matchName(r, name) {
			return true
		}
		if ipOK && r.kind == kindPrefix && r.prefix.Contains(ip) {
			return true
		}
	}
	return false
}

// matchableIP unmaps IPv4-mapped IPv6 addresses and refuses invalid and zoned
// addresses.
func matchableIP(ip netip.Addr) (netip.Addr, bool) {
	if !ip.IsValid() || ip.Zone() != "" {
		return netip.Addr{}, false
	}
	return ip.Unmap(), true
}

// CanonicalName validates a DNS name and returns it lower-cased without a
// trailing dot. It accepts the same names as patterns do, without wildcards:
// ASCII letters, digits, '-' and '_' in labels of 1..63 bytes, at most 253
// bytes, no label starting or ending with '-', and a last label that does not
// look like a number (so "127.1" or "0x7f000001" are not names).
func CanonicalName(name string) (string, error) {
	if strings.HasSuffix(name, ".") {
		name = name[:len(name)-1]
	}
	if name == "" {
		return "", errors.New("empty name")
	}
	if len(name) > MaxNameLen {
		return "", fmt.Errorf("name longer than %d bytes", MaxNameLen)
	}
	var b []byte // lower-cased copy, made only if needed
	start := 0
	for i := 0; i <= len(name); i++ {
		if i < len(name) && name[i] != '.' {
			c := name[i]
			switch {
			case c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '-', c == '_':
			case c >= 'A' && c <= 'Z':
				if b == nil {
					b = []byte(name)
				}
				b[i] = c + ('a' - 'A')
			case c == 0:
				return "", errors.New("NUL byte in name")
			case c == ' ' || c == '\t' || c == '\n' || c == '\r':
				return "", errors.New("whitespace in name")
			case c == '*':
				return "", errors.New("'*' is only allowed as a whole leading label (*.example.com)")
			case c >= 0x80:
				return "", errors.New("non-ASCII name (use the xn-- form)")
			default:
				return "", fmt.Errorf("invalid character %q in name", c)
			}
			continue
		}
		label := name[start:i]
		switch {
		case label == "":
			return "", errors.New("empty label in name")
		case len(label) > MaxLabelLen:
			return "", fmt.Errorf("label longer than %d bytes", MaxLabelLen)
		case label[0] == '-' || label[len(label)-1] == '-':
			return "", errors.New("label starts or ends with '-'")
		}
		if i == len(name) && looksNumeric(label) {
			return "", errors.New("last label is numeric: not a name (IP addresses are written in full, e.g. 203.0.113.7)")
		}
		start = i + 1
	}
	if b != nil {
		return string(b), nil
	}
	return name, nil
}

// looksNumeric reports whether a final label would make inet_aton-style
// parsers read the name as an address: all decimal digits, or 0x + hex.
func looksNumeric(label string) bool {
	l := strings.ToLower(label)
	if strings.HasPrefix(l, "0x") {
		l = l[2:]
		if l == "" {
			return true
		}
		for i := 0; i < len(l); i++ {
			if !isHex(l[i]) {
				return false
			}
		}
		return true
	}
	for i := 0; i < len(l); i++ {
		if l[i] < '0' || l[i] > '9' {
			return false
		}
	}
	return true
}

func isHex(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'f'
}

func parseRule(s string, private bool) (rule, error) {
	fail := func(format string, a ...any) (rule, error) {
		return rule{}, &PatternError{Flag: flagName(private), Pattern: s, Reason: fmt.Sprintf(format, a...)}
	}
	if s == "" {
		return fail("empty pattern (check for a stray comma)")
	}
	if len(s) > MaxPatternLen {
		return fail("pattern longer than %d bytes", MaxPatternLen)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == 0:
			return fail("NUL byte")
		case c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f':
			return fail("whitespace is not allowed (separate patterns with ',' only)")
		case c < 0x20 || c == 0x7f:
			return fail("control character %q", c)
		case c >= 0x80:
			return fail("non-ASCII character (use the xn-- form of the name)")
		}
	}

	host, portStr, hasPort, bracketed, err := splitHostPort(s)
	if err != nil {
		return fail("%s", err.Error())
	}
	var port uint16
	if hasPort {
		port, err = parsePort(portStr)
		if err != nil {
			return fail("%s", err.Error())
		}
	}
	suffix := ""
	if hasPort {
		suffix = ":" + strconv.Itoa(int(port))
	}

	if bracketed || strings.ContainsAny(host, ":/") || isIPv4Literal(host) {
		pfx, err := parseAddrOrPrefix(host, bracketed)
		if err != nil {
			return fail("%s", err.Error())
		}
		if private && pfx.Bits() == 0 {
			return fail("--allow-private needs specific addresses, not /0")
		}
		text := pfx.String()
		if pfx.IsSingleIP() {
			text = pfx.Addr().String()
		}
		if pfx.Addr().Is6() && hasPort {
			text = "[" + text + "]"
		}
		return rule{kind: kindPrefix, prefix: pfx, port: port, text: text + suffix}, nil
	}

	if host == "*" {
		if private {
			return fail("--allow-private needs specific hosts, not '*'")
		}
		return rule{kind: kindAny, port: port, text: "*" + suffix}, nil
	}
	kind := kindName
	if strings.HasPrefix(host, "*.") {
		kind = kindWildcard
		host = host[2:]
		if host == "" || host == "." {
			return fail("'*.' needs a domain after it")
		}
	}
	name, err := CanonicalName(host)
	if err != nil {
		return fail("%s", err.Error())
	}
	text := name
	if kind == kindWildcard {
		text = "*." + name
		if len(text) > MaxNameLen {
			return fail("name longer than %d bytes", MaxNameLen)
		}
	}
	return rule{kind: kind, name: name, port: port, text: text + suffix}, nil
}

// isIPv4Literal reports whether s is made of digits and dots only with at
// least one dot, i.e. is meant as an IPv4 address (valid or not).
func isIPv4Literal(s string) bool {
	if !strings.Contains(s, ".") || strings.Trim(s, ".") == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if (s[i] < '0' || s[i] > '9') && s[i] != '.' {
			return false
		}
	}
	return true
}

func splitHostPort(s string) (host, port string, hasPort, bracketed bool, err error) {
	if strings.HasPrefix(s, "[") {
		end := strings.IndexByte(s, ']')
		if end < 0 {
			return "", "", false, false, errors.New("missing ']'")
		}
		host, rest := s[1:end], s[end+1:]
		if strings.ContainsAny(host, "[]") {
			return "", "", false, false, errors.New("nested brackets")
		}
		switch {
		case rest == "":
			return host, "", false, true, nil
		case rest[0] == ':':
			return host, rest[1:], true, true, nil
		default:
			return "", "", false, false, fmt.Errorf("unexpected %q after ']'", rest)
		}
	}
	if strings.ContainsAny(s, "[]") {
		return "", "", false, false, errors.New("stray bracket")
	}
	switch strings.Count(s, ":") {
	case 0:
		return s, "", false, false, nil
	case 1:
		i := strings.IndexByte(s, ':')
		if i == 0 {
			return "", "", false, false, errors.New("missing host before ':'")
		}
		return s[:i], s[i+1:], true, false, nil
	default:
		return s, "", false, false, nil // bare IPv6; checked by the caller
	}
}

func parsePort(s string) (uint16, error) {
	if s == "" {
		return 0, errors.New("empty port")
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, fmt.Errorf("port %q is not a decimal number", s)
		}
	}
	if len(s) > 5 {
		return 0, errors.New("port out of range (1-65535)")
	}
	if len(s) > 1 && s[0] == '0' {
		return 0, fmt.Errorf("port %q has a leading zero", s)
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 || n > 65535 {
		return 0, errors.New("port out of range (1-65535)")
	}
	return uint16(n), nil
}

func parseAddrOrPrefix(host string, bracketed bool) (netip.Prefix, error) {
	if host == "" {
		return netip.Prefix{}, errors.New("empty address")
	}
	if strings.Contains(host, "%") {
		return netip.Prefix{}, errors.New("IPv6 zones are not allowed")
	}
	var pfx netip.Prefix
	if strings.Contains(host, "/") {
		p, err := netip.ParsePrefix(host)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("invalid CIDR: %s", trimNetipErr(err))
		}
		if p.Masked() != p {
			return netip.Prefix{}, fmt.Errorf("CIDR has host bits set (did you mean %s?)", p.Masked())
		}
		pfx = p
	} else {
		a, err := netip.ParseAddr(host)
		if err != nil {
			if strings.Contains(host, ":") && !bracketed {
				return netip.Prefix{}, errors.New("not an IPv6 address (an IPv6 address with a port is written [addr]:port)")
			}
			return netip.Prefix{}, fmt.Errorf("invalid IP address: %s", trimNetipErr(err))
		}
		pfx = netip.PrefixFrom(a, a.BitLen())
	}
	a := pfx.Addr()
	if a.Is4In6() {
		return netip.Prefix{}, errors.New("IPv4-mapped IPv6 address: write the IPv4 address")
	}
	if bracketed && a.Is4() {
		return netip.Prefix{}, errors.New("brackets are only for IPv6 addresses")
	}
	return pfx, nil
}

// trimNetipErr drops the quoted input netip repeats in its messages (the
// PatternError already quotes the pattern).
func trimNetipErr(err error) string {
	msg := err.Error()
	if i := strings.LastIndex(msg, "): "); i >= 0 {
		return msg[i+3:]
	}
	if i := strings.LastIndex(msg, ": "); i >= 0 {
		return msg[i+2:]
	}
	return msg
}
