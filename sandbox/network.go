package sandbox

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"matchlock.dev/matchlock/guest/proto"
	"matchlock.dev/matchlock/netstack"
	"matchlock.dev/matchlock/netstack/dns"
	"matchlock.dev/matchlock/netstack/mitm"
	"matchlock.dev/matchlock/netstack/policy"
	"matchlock.dev/matchlock/vmm"
)

// netMTU is the guest's IP MTU. A large MTU is the throughput lever of a
// userspace stack without segmentation offload (PLATFORM.md: ~2× over 1500).
const netMTU = 65520

// network is a sandbox's NIC: the host end of the socketpair runs the
// userspace stack; the other end is QEMU's -netdev stream.
type network struct {
	stack *netstack.Stack
	vmNet *vmm.Net
	guest *proto.NetConfig
	// proxy is the secrets proxy (nil without secrets); set before the
	// VM starts, read by the stack's interceptor.
	proxy atomic.Pointer[mitm.Proxy]
}

// intercept hands connections to the secrets proxy, if there is one.
func (n *network) intercept(ctx context.Context, f *netstack.Flow) bool {
	if p := n.proxy.Load(); p != nil {
		return p.Intercept(ctx, f)
	}
	return false
}

// newMAC returns a random locally administered unicast MAC.
func newMAC() net.HardwareAddr {
	m := make(net.HardwareAddr, 6)
	rand.Read(m)
	m[0] = (m[0] &^ 0x01) | 0x02
	return m
}

// ParsePolicy builds the network policy of opts: its allow patterns plus
// the hosts of every secret.
func ParsePolicy(opts Options) (*policy.Policy, error) {
	allow := append([]string(nil), opts.AllowHosts...)
	for _, s := range opts.Secrets {
		allow = append(allow, s.Hosts...)
	}
	return policy.Parse(allow, opts.AllowPrivate)
}

// ValidateNetwork checks the network options before anything boots.
func ValidateNetwork(opts Options) error {
	if _, err := ParsePolicy(opts); err != nil {
		return err
	}
	_, err := newResolver(opts.AddHosts)
	return err
}

func startNetwork(opts Options, log func(netstack.Event)) (*network, error) {
	pol, err := ParsePolicy(opts)
	if err != nil {
		return nil, err
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("network socketpair: %w", err)
	}
	host := os.NewFile(uintptr(fds[0]), "net-host")
	vmEnd := os.NewFile(uintptr(fds[1]), "net-vm")
	mac := newMAC()
	res, err := newResolver(opts.AddHosts)
	if err != nil {
		host.Close()
		vmEnd.Close()
		return nil, err
	}
	n := &network{}
	mtu := netMTU
	slirp := os.Getenv(netBackendEnv) == "slirp"
	if slirp {
		mtu = 1500 // QEMU's user networking has no larger MTU
	}
	cfg := netstack.Config{Conn: host, MTU: uint32(mtu), GuestMAC: mac, Policy: pol, Log: log, Resolver: res}
	if len(opts.Secrets) > 0 {
		cfg.Interceptor = n.intercept // the proxy itself starts in startSecrets
	}
	st, err := netstack.New(cfg)
	if err != nil {
		host.Close()
		vmEnd.Close()
		return nil, fmt.Errorf("network: %w", err)
	}
	n.stack = st
	n.vmNet = &vmm.Net{Conn: vmEnd, MAC: mac.String(), MTU: mtu, Slirp: slirp}
	n.guest = &proto.NetConfig{
		Interface: "eth0",
		Address:   netip4Prefix(netstack.GuestIP.String(), netstack.Subnet.Bits()),
		Gateway:   netstack.GatewayIP.String(),
		DNS:       netstack.GatewayIP.String(),
		MTU:       mtu,
		MAC:       mac.String(),
	}
	return n, nil
}

// netBackendEnv, set to "slirp", attaches the NIC to QEMU's built-in user
// networking instead of the policy stack: no policy, no secrets. It exists
// only as the baseline of bench/network and must never be used otherwise.
const netBackendEnv = "MATCHLOCK_NET_BACKEND"

// Where the sandbox CA goes in the guest. The bundles get it appended
// (Debian/Ubuntu, Alpine, RHEL/Fedora paths); the dedicated file holds it
// alone (NODE_EXTRA_CA_CERTS adds to Node's own store).
const (
	guestCAFile    = "/etc/ssl/matchlock-ca.pem"
	guestCABundle  = "/etc/ssl/certs/ca-certificates.crt"
	caBundleMarker = "# matchlock sandbox CA (added at each setup; replaced, not repeated)\n"
)

var guestCABundles = []string{guestCABundle, "/etc/ssl/cert.pem", "/etc/pki/tls/certs/ca-bundle.crt"}

// startSecrets starts the secrets proxy of a sandbox with secrets and
// returns the files that install its CA in the guest; it adds the CA
// variables to the image environment. Call it after startNetwork and the
// placeholders, before setup.
func (s *Sandbox) startSecrets(opts Options) ([]proto.SetupFile, error) {
	if s.net == nil || len(opts.Secrets) == 0 {
		return nil, nil
	}
	var secs []mitm.Secret
	for ph, name := range s.placeholders {
		for _, sec := range opts.Secrets {
			if sec.Name == name {
				secs = append(secs, mitm.Secret{Name: name, Placeholder: ph, Value: sec.Value, Hosts: sec.Hosts})
			}
		}
	}
	p, err := mitm.New(mitm.Config{Secrets: secs, Policy: s.net.stack.Policy(), Log: opts.NetLog})
	if err != nil {
		return nil, fmt.Errorf("secrets: %w", err)
	}
	s.net.proxy.Store(p)
	ca := p.CACert()
	files := []proto.SetupFile{{Path: guestCAFile, Mode: 0o644, Data: ca}}
	for _, b := range guestCABundles {
		files = append(files, proto.SetupFile{Path: b, Mode: 0o644, Data: append([]byte(caBundleMarker), ca...), Append: true})
	}
	s.Image.Env = MergeEnv(s.Image.Env, []string{
		"SSL_CERT_FILE=" + guestCABundle,
		"REQUESTS_CA_BUNDLE=" + guestCABundle,
		"CURL_CA_BUNDLE=" + guestCABundle,
		"NODE_EXTRA_CA_CERTS=" + guestCAFile,
	})
	return files, nil
}

// NetStats are a sandbox's network counters.
type NetStats struct {
	netstack.Stats
	Secrets *mitm.Stats `json:"secrets,omitempty"` // nil without secrets
}

// NetStats returns the network counters (zero with NoNetwork or for a
// Remote sandbox).
func (s *Sandbox) NetStats() NetStats {
	if s.net == nil {
		return NetStats{}
	}
	out := NetStats{Stats: s.net.stack.Stats()}
	if p := s.net.proxy.Load(); p != nil {
		ms := p.Stats()
		out.Secrets = &ms
	}
	return out
}

func netip4Prefix(ip string, bits int) string { return fmt.Sprintf("%s/%d", ip, bits) }

// closeVMEnd releases our copy of QEMU's end once QEMU has inherited it.
func (n *network) closeVMEnd() { n.vmNet.Conn.Close() }

func (n *network) close() {
	if n != nil {
		n.stack.Close()
		if p := n.proxy.Load(); p != nil {
			p.Close()
		}
	}
}

// staticResolver answers names given with --add-host NAME:IP on the host
// side (they still pass through the policy and the private-range rule),
// and asks the system resolver for the rest.
type staticResolver struct {
	hosts map[string][]netip.Addr
	next  dns.Resolver
}

func newResolver(addHosts []string) (dns.Resolver, error) {
	sys := dns.SystemResolver(0)
	if len(addHosts) == 0 {
		return sys, nil
	}
	r := &staticResolver{hosts: map[string][]netip.Addr{}, next: sys}
	for _, h := range addHosts {
		name, ipStr, ok := strings.Cut(h, ":")
		ip, err := netip.ParseAddr(ipStr)
		name = strings.ToLower(strings.TrimSuffix(name, "."))
		if !ok || err != nil || !ip.Is4() || name == "" || strings.ContainsAny(name, " /\x00") {
			return nil, fmt.Errorf("--add-host %q: want NAME:IPv4", h)
		}
		r.hosts[name] = append(r.hosts[name], ip)
	}
	return r, nil
}

func (r *staticResolver) LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error) {
	if ips, ok := r.hosts[strings.ToLower(strings.TrimSuffix(host, "."))]; ok {
		return ips, nil
	}
	return r.next.LookupNetIP(ctx, network, host)
}

// MaxNetLogBytes bounds a network log file (NetLogFile): the guest decides
// how many events there are.
const MaxNetLogBytes = 64 << 20

// NetLogFile opens (appending) a network log at path and returns an
// Options.NetLog writing one line per event to it (at most MaxNetLogBytes,
// then one line saying so), and the file to close.
func NetLogFile(path string) (func(netstack.Event), io.Closer, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, nil, err
	}
	var mu sync.Mutex
	var n int64
	if fi, err := f.Stat(); err == nil {
		n = fi.Size()
	}
	return func(e netstack.Event) {
		line := e.Time.UTC().Format(time.RFC3339Nano) + " " + e.String() + "\n"
		mu.Lock()
		defer mu.Unlock()
		if n >= MaxNetLogBytes {
			return
		}
		if n+int64(len(line)) > MaxNetLogBytes-256 {
			io.WriteString(f, "network log full: later events are not written (matchlock inspect has the counts)\n")
			n = MaxNetLogBytes
			return
		}
		w, _ := io.WriteString(f, line)
		n += int64(w)
	}, f, nil
}
