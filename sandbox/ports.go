package sandbox

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"
)

// maxForwardConns bounds concurrent connections per published port.
const maxForwardConns = 256

// ErrNoNetwork is returned by network operations on a sandbox without a NIC.
var ErrNoNetwork = errors.New("the sandbox has no network (--no-network)")

// PortSpec is a parsed [HOST_IP:]HOST_PORT:GUEST_PORT.
type PortSpec struct {
	HostIP    string `json:"host_ip"`
	HostPort  uint16 `json:"host_port"`
	GuestPort uint16 `json:"guest_port"`
}

func (p PortSpec) String() string {
	return net.JoinHostPort(p.HostIP, strconv.Itoa(int(p.HostPort))) + "->" + strconv.Itoa(int(p.GuestPort))
}

// ParsePortSpec parses [HOST_IP:]HOST_PORT:GUEST_PORT; the host IP
// defaults to 127.0.0.1 (never all interfaces unless asked). HOST_PORT 0
// picks a free port.
func ParsePortSpec(s string) (PortSpec, error) {
	bad := fmt.Errorf("port %q: want [HOST_IP:]HOST_PORT:GUEST_PORT", s)
	i := strings.LastIndexByte(s, ':')
	if i < 0 {
		return PortSpec{}, bad
	}
	guest, err := strconv.ParseUint(s[i+1:], 10, 16)
	if err != nil || guest == 0 {
		return PortSpec{}, bad
	}
	rest := s[:i]
	ps := PortSpec{HostIP: "127.0.0.1", GuestPort: uint16(guest)}
	if j := strings.LastIndexByte(rest, ':'); j >= 0 {
		ip := strings.Trim(rest[:j], "[]")
		if net.ParseIP(ip) == nil {
			return PortSpec{}, fmt.Errorf("port %q: %q is not an IP address", s, ip)
		}
		ps.HostIP, rest = ip, rest[j+1:]
	}
	hp, err := strconv.ParseUint(rest, 10, 16)
	if err != nil {
		return PortSpec{}, bad
	}
	ps.HostPort = uint16(hp)
	return ps, nil
}

// Forward is a published port.
type Forward struct {
	Spec PortSpec
	Addr string // the address actually bound
	l    net.Listener
}

// Publish listens on the host side of spec and forwards each connection
// into the guest through the userspace network stack.
func (s *Sandbox) Publish(spec PortSpec) (*Forward, error) {
	if s.net == nil {
		return nil, ErrNoNetwork
	}
	l, err := net.Listen("tcp", net.JoinHostPort(spec.HostIP, strconv.Itoa(int(spec.HostPort))))
	if err != nil {
		return nil, fmt.Errorf("publish %s: %w", spec, err)
	}
	f := &Forward{Spec: spec, Addr: l.Addr().String(), l: l}
	s.fwdMu.Lock()
	s.forwards = append(s.forwards, f)
	s.fwdMu.Unlock()
	go s.serveForward(f)
	return f, nil
}

// Forwards lists the published ports.
func (s *Sandbox) Forwards() []*Forward {
	s.fwdMu.Lock()
	defer s.fwdMu.Unlock()
	return append([]*Forward(nil), s.forwards...)
}

func (s *Sandbox) serveForward(f *Forward) {
	sem := make(chan struct{}, maxForwardConns)
	for {
		c, err := f.l.Accept()
		if err != nil {
			return
		}
		select {
		case sem <- struct{}{}:
		default:
			c.Close()
			continue
		}
		go func() {
			defer func() { <-sem }()
			defer c.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			g, err := s.net.stack.DialGuest(ctx, f.Spec.GuestPort)
			cancel()
			if err != nil {
				return
			}
			defer g.Close()
			splice(c, g)
		}()
	}
}

// splice copies both ways, propagating half-closes, until both are done.
func splice(a, b net.Conn) {
	var wg sync.WaitGroup
	cp := func(dst, src net.Conn) {
		defer wg.Done()
		io.Copy(dst, src)
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		} else {
			dst.Close()
		}
	}
	wg.Add(2)
	go cp(a, b)
	go cp(b, a)
	wg.Wait()
}

func (s *Sandbox) closeForwards() {
	s.fwdMu.Lock()
	defer s.fwdMu.Unlock()
	for _, f := range s.forwards {
		f.l.Close()
	}
	s.forwards = nil
}

// AllowList returns the sandbox's current allow and allow-private patterns.
func (s *Sandbox) AllowList() (allow, private []string, err error) {
	if s.net == nil {
		return nil, nil, ErrNoNetwork
	}
	allow, private = s.net.stack.Policy().Patterns()
	return allow, private, nil
}

// AllowHosts adds patterns to the running sandbox's policy: DNS and TCP
// see the change at once.
func (s *Sandbox) AllowHosts(patterns ...string) error {
	if s.net == nil {
		return ErrNoNetwork
	}
	return s.net.stack.Policy().Add(patterns...)
}

// DenyHosts removes patterns from the running sandbox's policy.
// Connections already established are not cut.
func (s *Sandbox) DenyHosts(patterns ...string) error {
	if s.net == nil {
		return ErrNoNetwork
	}
	return s.net.stack.Policy().Remove(patterns...)
}
