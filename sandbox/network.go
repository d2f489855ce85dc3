package sandbox

import (
	"context"
	"crypto/rand"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"

	"golang.org/x/sys/unix"

	"matchlock.dev/matchlock/guest/proto"
	"matchlock.dev/matchlock/netstack"
	"matchlock.dev/matchlock/netstack/dns"
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
	st, err := netstack.New(netstack.Config{Conn: host, MTU: netMTU, GuestMAC: mac, Policy: pol, Log: log, Resolver: res})
	if err != nil {
		host.Close()
		vmEnd.Close()
		return nil, fmt.Errorf("network: %w", err)
	}
	return &network{
		stack: st,
		vmNet: &vmm.Net{Conn: vmEnd, MAC: mac.String(), MTU: netMTU},
		guest: &proto.NetConfig{
			Interface: "eth0",
			Address:   netip4Prefix(netstack.GuestIP.String(), netstack.Subnet.Bits()),
			Gateway:   netstack.GatewayIP.String(),
			DNS:       netstack.GatewayIP.String(),
			MTU:       netMTU,
			MAC:       mac.String(),
		},
	}, nil
}

func netip4Prefix(ip string, bits int) string { return fmt.Sprintf("%s/%d", ip, bits) }

// closeVMEnd releases our copy of QEMU's end once QEMU has inherited it.
func (n *network) closeVMEnd() { n.vmNet.Conn.Close() }

func (n *network) close() {
	if n != nil {
		n.stack.Close()
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
