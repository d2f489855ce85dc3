package mitm

import (
	"encoding/base64"
	"fmt"
	"net/http"
	"net/url"
	"sort"
	"strings"

	"matchlock.dev/matchlock/netstack/policy"
)

// PlaceholderPrefix starts every placeholder; 32 lower-case hex digits
// follow it (see sandbox: one fresh placeholder per secret and sandbox).
const PlaceholderPrefix = "SANDBOX_SECRET_"

// PlaceholderLen is the length of a placeholder.
const PlaceholderLen = len(PlaceholderPrefix) + 32

// ValidPlaceholder reports whether s has the placeholder form.
func ValidPlaceholder(s string) bool {
	if len(s) != PlaceholderLen || !strings.HasPrefix(s, PlaceholderPrefix) {
		return false
	}
	for i := len(PlaceholderPrefix); i < len(s); i++ {
		c := s[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

type secret struct {
	name        string
	placeholder string
	value       string
	hosts       *policy.Policy // where the value may be sent (allow list only)
}

// substituter finds placeholders in a request head and swaps in the real
// values where the destination is one the secret is bound to.
type substituter struct {
	byPH   map[string]*secret
	values []string // every real value, for scrubbing messages
}

func newSubstituter(secrets []Secret) (*substituter, error) {
	s := &substituter{byPH: map[string]*secret{}}
	for _, sec := range secrets {
		if !ValidPlaceholder(sec.Placeholder) {
			return nil, fmt.Errorf("secret %s: malformed placeholder", sec.Name)
		}
		if sec.Value == "" {
			return nil, fmt.Errorf("secret %s: empty value", sec.Name)
		}
		if strings.ContainsAny(sec.Value, "\r\n\x00") {
			// It would end up in a header line.
			return nil, fmt.Errorf("secret %s: the value contains CR, LF or NUL", sec.Name)
		}
		if _, dup := s.byPH[sec.Placeholder]; dup {
			return nil, fmt.Errorf("secret %s: duplicate placeholder", sec.Name)
		}
		pol, err := policy.Parse(sec.Hosts, nil)
		if err != nil {
			return nil, fmt.Errorf("secret %s: %w", sec.Name, err)
		}
		s.byPH[sec.Placeholder] = &secret{name: sec.Name, placeholder: sec.Placeholder, value: sec.Value, hosts: pol}
		s.values = append(s.values, sec.Value)
	}
	return s, nil
}

// bound reports whether some secret may be sent to name:port.
func (s *substituter) bound(name string, port uint16) bool {
	for _, sec := range s.byPH {
		if sec.hosts.AllowName(name, port) {
			return true
		}
	}
	return false
}

// find adds to refs the known secrets whose placeholder occurs in v.
func (s *substituter) find(v string, refs map[*secret]bool) {
	for {
		i := strings.Index(v, PlaceholderPrefix)
		if i < 0 {
			return
		}
		v = v[i:]
		if len(v) >= PlaceholderLen {
			if sec, ok := s.byPH[v[:PlaceholderLen]]; ok {
				refs[sec] = true
			}
		}
		v = v[len(PlaceholderPrefix):]
	}
}

// target is where a request goes.
type target struct {
	name  string // the connection's name (canonical)
	port  uint16
	tls   bool // the request arrived over TLS we terminated
	sniOK bool // the guest's SNI named the connection's name
}

// verdict is what rewrite decided for one request.
type verdict struct {
	block string   // non-empty: refuse the request (403) for this reason
	used  []string // names of the secrets substituted, sorted
}

// basicAuth splits "Basic <base64>" (scheme case-insensitive).
func basicAuth(v string) (string, bool) {
	const scheme = "basic "
	if len(v) < len(scheme) || !strings.EqualFold(v[:len(scheme)], scheme) {
		return "", false
	}
	b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(v[len(scheme):]))
	if err != nil {
		return "", false
	}
	return string(b), true
}

// rewrite checks the placeholders of a request head (header names and
// values, decoded Basic credentials, the URL) and, when every one found may
// go to t, substitutes the real values in the header values, the Basic
// credentials and the query. Bodies and trailers are never looked at. A
// placeholder in a header name or the URL path is refused (not substituted
// there). On a refusal nothing is modified.
func (s *substituter) rewrite(h http.Header, u *url.URL, t target) verdict {
	refs := map[*secret]bool{}
	for k, vs := range h {
		if strings.Contains(strings.ToUpper(k), PlaceholderPrefix) {
			// Header names are canonicalised (case changed): refuse
			// anything that looks like a placeholder.
			return verdict{block: "secret placeholder in a header name"}
		}
		for _, v := range vs {
			s.find(v, refs)
			if dec, ok := basicAuth(v); ok {
				s.find(dec, refs)
			}
		}
	}
	inPath := map[*secret]bool{}
	s.find(u.Path, inPath)
	s.find(u.RawPath, inPath)
	if len(inPath) > 0 {
		return verdict{block: fmt.Sprintf("secret %s placeholder in the URL path (only headers and the query are substituted)", names(inPath))}
	}
	s.find(u.RawQuery, refs)
	if len(refs) == 0 {
		return verdict{}
	}
	switch {
	case !t.tls:
		return verdict{block: fmt.Sprintf("secret %s in a plain-HTTP request (secrets are only sent over HTTPS)", names(refs))}
	case !t.sniOK:
		return verdict{block: fmt.Sprintf("secret %s: the TLS server name does not name %s", names(refs), t.name)}
	}
	var unbound []string
	for sec := range refs {
		if !sec.hosts.AllowName(t.name, t.port) {
			unbound = append(unbound, sec.name)
		}
	}
	if len(unbound) > 0 {
		sort.Strings(unbound)
		return verdict{block: fmt.Sprintf("secret %s is not bound to %s:%d", strings.Join(unbound, ","), t.name, t.port)}
	}

	var pairs, qpairs []string
	for sec := range refs {
		pairs = append(pairs, sec.placeholder, sec.value)
		qpairs = append(qpairs, sec.placeholder, url.QueryEscape(sec.value))
	}
	rep := strings.NewReplacer(pairs...)
	for k, vs := range h {
		for i, v := range vs {
			if dec, ok := basicAuth(v); ok && strings.Contains(dec, PlaceholderPrefix) {
				v = v[:len("basic ")] + base64.StdEncoding.EncodeToString([]byte(rep.Replace(dec)))
			}
			vs[i] = rep.Replace(v)
		}
		h[k] = vs
	}
	if strings.Contains(u.RawQuery, PlaceholderPrefix) {
		u.RawQuery = strings.NewReplacer(qpairs...).Replace(u.RawQuery)
	}
	used := make([]string, 0, len(refs))
	for sec := range refs {
		used = append(used, sec.name)
	}
	sort.Strings(used)
	return verdict{used: used}
}

// scrub replaces every real value in msg (an error text that may quote a
// URL or a header) with "[secret]".
func (s *substituter) scrub(msg string) string {
	for _, v := range s.values {
		if v != "" {
			msg = strings.ReplaceAll(msg, v, "[secret]")
			if q := url.QueryEscape(v); q != v {
				msg = strings.ReplaceAll(msg, q, "[secret]")
			}
		}
	}
	return msg
}

func names(refs map[*secret]bool) string {
	var n []string
	for sec := range refs {
		n = append(n, sec.name)
	}
	sort.Strings(n)
	return strings.Join(n, ",")
}

// hostOnly strips a ":port" suffix from an authority. An IPv6 literal keeps
// its brackets (it never equals a name).
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

// sameName compares a name the guest sent (SNI, Host) with the connection's
// canonical name. Invalid names never match.
func sameName(got, name string) bool {
	c, err := policy.CanonicalName(got)
	return err == nil && c == name
}
