package netstack

import (
	"context"
	"fmt"
	"net"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
)

// DialGuest opens a TCP connection from the gateway to the guest's port:
// the inbound path of port forwarding. Traffic enters through this stack,
// never through an interface the host can see.
func (st *Stack) DialGuest(ctx context.Context, port uint16) (net.Conn, error) {
	if port == 0 {
		return nil, fmt.Errorf("netstack: guest port 0")
	}
	c, err := gonet.DialContextTCP(ctx, st.s, tcpip.FullAddress{NIC: nicID, Addr: addrFrom(GuestIP), Port: port}, ipv4.ProtocolNumber)
	if err != nil {
		return nil, fmt.Errorf("connect to guest port %d: %w", port, err)
	}
	return c, nil
}
