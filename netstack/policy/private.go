package policy

import "net/netip"

// SyntheticPrefix is the range the DNS responder hands out to the guest for
// allowed names (RFC 2544 benchmarking space, never routed on the Internet).
// It counts as private: the host never dials an address in it.
var SyntheticPrefix = netip.MustParsePrefix("198.18.0.0/15")

// privateV4 lists the IPv4 destinations refused unless allow-private names
// them.
var privateV4 = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),      // "this network"
	netip.MustParsePrefix("10.0.0.0/8"),     // RFC 1918
	netip.MustParsePrefix("100.64.0.0/10"),  // CGNAT (RFC 6598); also Alibaba metadata
	netip.MustParsePrefix("127.0.0.0/8"),    // loopback
	netip.MustParsePrefix("169.254.0.0/16"), // link-local, cloud metadata
	netip.MustParsePrefix("172.16.0.0/12"),  // RFC 1918
	netip.MustParsePrefix("192.0.0.0/24"),   // IETF protocol assignments (DS-Lite, NAT64 discovery)
	netip.MustParsePrefix("192.88.99.0/24"), // deprecated 6to4 relay anycast
	netip.MustParsePrefix("192.168.0.0/16"), // RFC 1918
	netip.MustParsePrefix("198.18.0.0/15"),  // benchmarking; our synthetic range
	netip.MustParsePrefix("224.0.0.0/4"),    // multicast
	netip.MustParsePrefix("240.0.0.0/4"),    // reserved, broadcast
}

// privateV6 lists the IPv6 destinations refused unless allow-private names
// them. IPv6 forms that carry an IPv4 address are checked by that address
// (see IsPrivate).
var privateV6 = []netip.Prefix{
	netip.MustParsePrefix("::/96"),           // unspecified, loopback, IPv4-compatible (deprecated)
	netip.MustParsePrefix("::ffff:0:0:0/96"), // IPv4-translated (SIIT)
	netip.MustParsePrefix("100::/64"),        // discard-only
	netip.MustParsePrefix("2001::/32"),       // Teredo (embeds an obfuscated IPv4 address)
	netip.MustParsePrefix("fc00::/7"),        // unique local (includes fd00:ec2::254 metadata)
	netip.MustParsePrefix("fe80::/10"),       // link-local
	netip.MustParsePrefix("fec0::/10"),       // site-local (deprecated)
	netip.MustParsePrefix("ff00::/8"),        // multicast
}

var (
	nat64WellKnown = netip.MustParsePrefix("64:ff9b::/96")   // RFC 6052
	nat64Local     = netip.MustParsePrefix("64:ff9b:1::/48") // RFC 8215
	sixToFour      = netip.MustParsePrefix("2002::/16")      // RFC 3056
)

// IsPrivate reports whether ip is a destination the host must not dial unless
// allow-private names it: loopback, RFC 1918, link-local (cloud metadata),
// CGNAT, "this network", multicast, reserved and broadcast, the synthetic
// range, IPv6 loopback/unspecified, unique-local, link-local, site-local and
// multicast, and IPv6 addresses that embed a private IPv4 address
// (IPv4-mapped, NAT64, 6to4). Invalid and zoned addresses are private.
// Documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24,
// 2001:db8::/32) are not: they are never routed and serve as examples.
func IsPrivate(ip netip.Addr) bool {
	if !ip.IsValid() || ip.Zone() != "" {
		return true
	}
	ip = ip.Unmap()
	if ip.Is4() {
		for _, p := range privateV4 {
			if p.Contains(ip) {
				return true
			}
		}
		return false
	}
	for _, p := range privateV6 {
		if p.Contains(ip) {
			return true
		}
	}
	b := ip.As16()
	switch {
	case nat64WellKnown.Contains(ip):
		return IsPrivate(netip.AddrFrom4([4]byte{b[12], b[13], b[14], b[15]}))
	case nat64Local.Contains(ip):
		// RFC 8215 allows several embedding formats; refuse the whole
		// local-use prefix rather than guess which one is in use.
		return true
	case sixToFour.Contains(ip):
		return IsPrivate(netip.AddrFrom4([4]byte{b[2], b[3], b[4], b[5]}))
	}
	return false
}
