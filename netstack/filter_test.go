package netstack

import (
	"net/netip"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"matchlock.dev/matchlock/netstack/internal/testguest"
)

// FuzzFilterFrame feeds arbitrary frames (at least an Ethernet header, as
// the link guarantees) to the host's frame filter: it must not panic, and
// what it lets through must be ARP from the guest, or unfragmented IPv4 from
// the guest that is TCP or UDP to the gateway's port 53.
func FuzzFilterFrame(f *testing.F) {
	st := &Stack{guestMAC: tcpip.LinkAddress(testguest.DefaultMAC), gwMAC: tcpip.LinkAddress(DefaultGatewayMAC)}
	st.denyLog.perSecond = 1
	syn := ipv4Packet(testguest.DefaultIP, netip.MustParseAddr("203.0.113.1"), uint8(header.TCPProtocolNumber),
		tcpSYN(testguest.DefaultIP, netip.MustParseAddr("203.0.113.1"), 443), 0, 0)
	dns := ipv4Packet(testguest.DefaultIP, GatewayIP, uint8(header.UDPProtocolNumber), udpDatagram(53, []byte("q")), 0, 0)
	f.Add(ethFrame(testguest.DefaultMAC, DefaultGatewayMAC, header.IPv4ProtocolNumber, syn))
	f.Add(ethFrame(testguest.DefaultMAC, DefaultGatewayMAC, header.IPv4ProtocolNumber, dns))
	f.Add(ethFrame(testguest.DefaultMAC, bcast, header.ARPProtocolNumber, arpRequest(testguest.DefaultMAC, testguest.DefaultIP)))
	f.Add(ipv6Frame(testguest.DefaultMAC))
	f.Fuzz(func(t *testing.T, frame []byte) {
		if len(frame) < header.EthernetMinimumSize {
			return
		}
		if !st.filterFrame(frame) {
			return
		}
		eth := header.Ethernet(frame)
		if eth.SourceAddress() != st.guestMAC {
			t.Fatal("passed a frame from another MAC")
		}
		p := frame[header.EthernetMinimumSize:]
		switch eth.Type() {
		case header.ARPProtocolNumber:
			if !header.ARP(p).IsValid() {
				t.Fatal("passed invalid ARP")
			}
		case header.IPv4ProtocolNumber:
			ip := header.IPv4(p)
			if toNetip(ip.SourceAddress()) != GuestIP || ip.More() || ip.FragmentOffset() != 0 {
				t.Fatal("passed spoofed or fragmented IPv4")
			}
			switch ip.TransportProtocol() {
			case header.TCPProtocolNumber:
			case header.UDPProtocolNumber:
				if toNetip(ip.DestinationAddress()) != GatewayIP || header.UDP(ip.Payload()).DestinationPort() != DNSPort {
					t.Fatal("passed UDP not to the gateway's DNS")
				}
			default:
				t.Fatalf("passed IP protocol %d", ip.Protocol())
			}
		default:
			t.Fatalf("passed EtherType %#x", eth.Type())
		}
	})
}
