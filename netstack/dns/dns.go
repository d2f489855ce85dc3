// Package dns answers the guest's DNS queries.
//
// The guest's only resolver is the netstack gateway (10.213.0.1:53). The
// Responder never forwards a query: a name the policy does not allow gets
// NXDOMAIN without any lookup leaving the host. For an allowed name an A
// query is resolved on the host (Resolver), the results are checked against
// the private-range rule, and the answer is a synthetic address from
// policy.SyntheticPrefix that the Allocator maps back to the name when the
// guest connects. AAAA and every other type for an allowed name get an empty
// NOERROR answer (the guest network is IPv4 only).
//
// Limits: a message is at most MaxMessageSize bytes, carries exactly one
// question and no answer or authority records, and at most one additional
// record (EDNS OPT). At most MaxInFlight host lookups run at once (past that:
// SERVFAIL), each bounded by LookupTimeout.
package dns

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"matchlock.dev/matchlock/netstack/policy"
)

// Limits and defaults.
const (
	// MaxMessageSize bounds a query the Responder parses (UDP or TCP).
	MaxMessageSize = 4096
	// MaxInFlight bounds concurrent host lookups per Responder.
	MaxInFlight = 32
	// LookupTimeout bounds one host lookup.
	LookupTimeout = 5 * time.Second
	// DefaultTTL is the TTL of synthetic answers, in seconds.
	DefaultTTL = 60
	// ednsUDPSize is the payload size advertised in replies to EDNS queries.
	ednsUDPSize = 1232
)

// Resolver looks names up on the host. *net.Resolver implements it.
type Resolver interface {
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
}

var _ Resolver = (*net.Resolver)(nil)

// SystemResolver returns net.DefaultResolver with a timeout (LookupTimeout
// if <= 0) on each lookup.
func SystemResolver(timeout time.Duration) Resolver {
	if timeout <= 0 {
		timeout = LookupTimeout
	}
	return timeoutResolver{r: net.DefaultResolver, timeout: timeout}
}

type timeoutResolver struct {
	r       *net.Resolver
	timeout time.Duration
}

func (t timeoutResolver) LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error) {
	ctx, cancel := context.WithTimeout(ctx, t.timeout)
	defer cancel()
	return t.r.LookupNetIP(ctx, network, host)
}

// Outcome describes one answered (or dropped) query, for logging.
type Outcome struct {
	Name     string // canonical name; the raw name (quoted) if invalid
	Type     dnsmessage.Type
	RCode    dnsmessage.RCode
	Allowed  bool       // the policy allowed the name
	Addr     netip.Addr // synthetic address answered, if any
	Reason   string     // why it was refused or failed; "" when answered
	Dropped  bool       // no reply was sent (not a query, unparsable)
	LookedUp bool       // a host lookup was made
}

// Config configures a Responder.
type Config struct {
	Policy    *policy.Policy // nil allows nothing
	Resolver  Resolver       // host lookups; SystemResolver(0) if nil
	Allocator *Allocator     // NewSyntheticAllocator() if nil
	TTL       uint32         // DefaultTTL if 0
	Log       func(Outcome)  // optional, called once per message
}

// Responder answers DNS messages. It is safe for concurrent use.
type Responder struct {
	pol   *policy.Policy
	res   Resolver
	alloc *Allocator
	ttl   uint32
	log   func(Outcome)
	sem   chan struct{} // MaxInFlight host lookups
}

// NewResponder returns a Responder for cfg.
func NewResponder(cfg Config) *Responder {
	r := &Responder{
		pol:   cfg.Policy,
		res:   cfg.Resolver,
		alloc: cfg.Allocator,
		ttl:   cfg.TTL,
		log:   cfg.Log,
		sem:   make(chan struct{}, MaxInFlight),
	}
	if r.res == nil {
		r.res = SystemResolver(0)
	}
	if r.alloc == nil {
		r.alloc = NewSyntheticAllocator()
	}
	if r.ttl == 0 {
		r.ttl = DefaultTTL
	}
	return r
}

// Allocator returns the Responder's allocator (synthetic address → name).
func (r *Responder) Allocator() *Allocator { return r.alloc }

// query is a parsed, validated query.
type query struct {
	hdr  dnsmessage.Header
	q    dnsmessage.Question
	edns bool
}

var (
	errNotQuery  = errors.New("not a query")
	errMalformed = errors.New("malformed message")
)

// parseQuery validates msg. On errMalformed with ok header, the header and
// question (if any) are still returned so a FORMERR can be sent.
func parseQuery(msg []byte) (query, bool, error) {
	var out query
	if len(msg) > MaxMessageSize {
		return out, false, errMalformed
	}
	var p dnsmessage.Parser
	h, err := p.Start(msg)
	if err != nil {
		return out, false, errMalformed
	}
	out.hdr = h
	if h.Response {
		return out, false, errNotQuery
	}
	q, err := p.Question()
	if err != nil {
		return out, true, errMalformed // no question, or a bad one
	}
	out.q = q
	if err := p.SkipQuestion(); !errors.Is(err, dnsmessage.ErrSectionDone) {
		return out, true, errMalformed // more than one question
	}
	if err := p.SkipAnswer(); !errors.Is(err, dnsmessage.ErrSectionDone) {
		return out, true, errMalformed
	}
	if err := p.SkipAuthority(); !errors.Is(err, dnsmessage.ErrSectionDone) {
		return out, true, errMalformed
	}
	ah, err := p.AdditionalHeader()
	switch {
	case errors.Is(err, dnsmessage.ErrSectionDone):
	case err != nil:
		return out, true, errMalformed
	case ah.Type != dnsmessage.TypeOPT:
		return out, true, errMalformed
	default:
		if _, err := p.OPTResource(); err != nil {
			return out, true, errMalformed
		}
		if err := p.SkipAdditional(); !errors.Is(err, dnsmessage.ErrSectionDone) {
			return out, true, errMalformed // more than one additional
		}
		out.edns = true
	}
	return out, true, nil
}

// Answer returns the reply to the DNS message msg, or nil if no reply should
// be sent. It never forwards msg anywhere.
func (r *Responder) Answer(ctx context.Context, msg []byte) []byte {
	o := Outcome{}
	reply := r.answer(ctx, msg, &o)
	o.Dropped = reply == nil
	if r.log != nil {
		r.log(o)
	}
	return reply
}

func (r *Responder) answer(ctx context.Context, msg []byte, o *Outcome) []byte {
	q, hdrOK, err := parseQuery(msg)
	if err != nil {
		o.Reason = err.Error()
		if !hdrOK {
			return nil
		}
		o.RCode = dnsmessage.RCodeFormatError
		// Echo the question only if one was parsed.
		return r.build(q, o.RCode, q.q.Name.Length != 0, netip.Addr{})
	}
	o.Type = q.q.Type
	if q.hdr.OpCode != 0 {
		o.RCode, o.Reason = dnsmessage.RCodeNotImplemented, "opcode not supported"
		return r.build(q, o.RCode, true, netip.Addr{})
	}
	raw := q.q.Name.String()
	name, err := policy.CanonicalName(raw)
	if err != nil {
		o.Name = quoteName(raw)
		o.RCode, o.Reason = dnsmessage.RCodeRefused, "invalid name: "+err.Error()
		return r.build(q, o.RCode, true, netip.Addr{})
	}
	o.Name = name
	if q.q.Class != dnsmessage.ClassINET {
		o.RCode, o.Reason = dnsmessage.RCodeRefused, "class not IN"
		return r.build(q, o.RCode, true, netip.Addr{})
	}
	if !r.pol.AllowNameAnyPort(name) {
		o.RCode, o.Reason = dnsmessage.RCodeNameError, "name not allowed"
		return r.build(q, o.RCode, true, netip.Addr{})
	}
	o.Allowed = true
	if q.q.Type != dnsmessage.TypeA {
		// AAAA and the rest: the name exists, there is no such record.
		o.RCode = dnsmessage.RCodeSuccess
		return r.build(q, o.RCode, true, netip.Addr{})
	}

	select {
	case r.sem <- struct{}{}:
	default:
		o.RCode, o.Reason = dnsmessage.RCodeServerFailure, "too many lookups in flight"
		return r.build(q, o.RCode, true, netip.Addr{})
	}
	lctx, cancel := context.WithTimeout(ctx, LookupTimeout)
	o.LookedUp = true
	addrs, err := r.res.LookupNetIP(lctx, "ip", name)
	cancel()
	<-r.sem
	if err != nil {
		var de *net.DNSError
		if errors.As(err, &de) && de.IsNotFound {
			o.RCode, o.Reason = dnsmessage.RCodeNameError, "no such host"
		} else {
			o.RCode, o.Reason = dnsmessage.RCodeServerFailure, "lookup failed: "+err.Error()
		}
		return r.build(q, o.RCode, true, netip.Addr{})
	}
	if !r.usable(name, addrs) {
		o.RCode = dnsmessage.RCodeNameError
		if len(addrs) == 0 {
			o.Reason = "no addresses"
		} else {
			o.Reason = "resolves only to private addresses (see --allow-private)"
		}
		return r.build(q, o.RCode, true, netip.Addr{})
	}
	o.Addr = r.alloc.Assign(name)
	o.RCode = dnsmessage.RCodeSuccess
	return r.build(q, o.RCode, true, o.Addr)
}

// usable reports whether at least one address may be dialled for name.
func (r *Responder) usable(name string, addrs []netip.Addr) bool {
	for _, a := range addrs {
		if !policy.IsPrivate(a) || r.pol.PrivateAllowedAnyPort(name, a) {
			return true
		}
	}
	return false
}

func (r *Responder) build(q query, rcode dnsmessage.RCode, withQuestion bool, a netip.Addr) []byte {
	h := dnsmessage.Header{
		ID:                 q.hdr.ID,
		Response:           true,
		OpCode:             q.hdr.OpCode,
		RecursionDesired:   q.hdr.RecursionDesired,
		RecursionAvailable: true,
		RCode:              rcode,
	}
	b := dnsmessage.NewBuilder(make([]byte, 0, 128), h)
	b.EnableCompression()
	if withQuestion {
		if err := b.StartQuestions(); err != nil {
			return nil
		}
		if err := b.Question(q.q); err != nil {
			return nil
		}
	}
	if a.IsValid() {
		if err := b.StartAnswers(); err != nil {
			return nil
		}
		rh := dnsmessage.ResourceHeader{Name: q.q.Name, Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET, TTL: r.ttl}
		if err := b.AResource(rh, dnsmessage.AResource{A: a.As4()}); err != nil {
			return nil
		}
	}
	if q.edns {
		if err := b.StartAdditionals(); err != nil {
			return nil
		}
		var rh dnsmessage.ResourceHeader
		if err := rh.SetEDNS0(ednsUDPSize, dnsmessage.RCodeSuccess, false); err != nil {
			return nil
		}
		if err := b.OPTResource(rh, dnsmessage.OPTResource{}); err != nil {
			return nil
		}
	}
	out, err := b.Finish()
	if err != nil {
		return nil
	}
	return out
}

// quoteName makes a raw query name safe to log.
func quoteName(s string) string {
	var b strings.Builder
	for i := 0; i < len(s) && b.Len() < 300; i++ {
		c := s[i]
		if c < 0x21 || c >= 0x7f || c == '\\' {
			b.WriteString(`\x`)
			b.WriteByte("0123456789abcdef"[c>>4])
			b.WriteByte("0123456789abcdef"[c&15])
			continue
		}
		b.WriteByte(c)
	}
	return b.String()
}
