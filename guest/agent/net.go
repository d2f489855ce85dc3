package agent

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"

	"matchlock.dev/matchlock/guest/proto"
)

// The guest has no DHCP client or iproute2: the agent configures its one
// interface with a handful of rtnetlink requests (about 1 ms in all).

func linkUp(name string) error {
	ifc, err := net.InterfaceByName(name)
	if err != nil {
		return err
	}
	return nlLinkSet(ifc.Index, unix.IFF_UP, 0, nil)
}

func configureNet(c *proto.NetConfig) error {
	ifc, err := net.InterfaceByName(c.Interface)
	if err != nil {
		return fmt.Errorf("interface %s: %w", c.Interface, err)
	}
	pfx, err := netip.ParsePrefix(c.Address)
	if err != nil || !pfx.Addr().Is4() {
		return fmt.Errorf("address %q: want an IPv4 CIDR", c.Address)
	}
	var mac net.HardwareAddr
	if c.MAC != "" {
		if mac, err = net.ParseMAC(c.MAC); err != nil {
			return fmt.Errorf("mac %q: %w", c.MAC, err)
		}
	}
	// A restored guest's interface is up with the snapshot's MAC:
	// virtio-net changes it live, so the link, its address and routes
	// stay (a down/up cycle costs tens of ms under TCG).
	if mac != nil && ifc.Flags&net.FlagUp != 0 {
		if bytes.Equal(ifc.HardwareAddr, mac) || nlSetAddress(ifc.Index, mac) == nil {
			mac = nil
		}
	}
	// Otherwise down first, so that a new MAC can be set.
	if mac != nil {
		if err := nlLinkSet(ifc.Index, 0, c.MTU, mac); err != nil {
			return fmt.Errorf("link set: %w", err)
		}
	}
	if err := nlLinkSet(ifc.Index, unix.IFF_UP, c.MTU, nil); err != nil {
		return fmt.Errorf("link up: %w", err)
	}
	if err := nlAddrReplace(ifc.Index, pfx); err != nil {
		return fmt.Errorf("address: %w", err)
	}
	if c.Gateway != "" {
		gw, err := netip.ParseAddr(c.Gateway)
		if err != nil {
			return fmt.Errorf("gateway %q: %w", c.Gateway, err)
		}
		if err := nlDefaultRoute(ifc.Index, gw); err != nil {
			return fmt.Errorf("default route: %w", err)
		}
	}
	return nil
}

func nlRequest(msgType uint16, flags uint16, body []byte) error {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	msg := make([]byte, unix.NLMSG_HDRLEN, unix.NLMSG_HDRLEN+len(body))
	binary.NativeEndian.PutUint32(msg[0:], uint32(unix.NLMSG_HDRLEN+len(body)))
	binary.NativeEndian.PutUint16(msg[4:], msgType)
	binary.NativeEndian.PutUint16(msg[6:], flags|unix.NLM_F_REQUEST|unix.NLM_F_ACK)
	binary.NativeEndian.PutUint32(msg[8:], 1)
	msg = append(msg, body...)
	if err := unix.Sendto(fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	buf := make([]byte, 8192)
	n, _, err := unix.Recvfrom(fd, buf, 0)
	if err != nil {
		return err
	}
	msgs, err := syscall.ParseNetlinkMessage(buf[:n])
	if err != nil {
		return err
	}
	for _, m := range msgs {
		if m.Header.Type == unix.NLMSG_ERROR && len(m.Data) >= 4 {
			if code := int32(binary.NativeEndian.Uint32(m.Data)); code != 0 {
				return unix.Errno(-code)
			}
		}
	}
	return nil
}

func rtattr(typ uint16, data []byte) []byte {
	l := unix.SizeofRtAttr + len(data)
	b := make([]byte, (l+3)&^3)
	binary.NativeEndian.PutUint16(b[0:], uint16(l))
	binary.NativeEndian.PutUint16(b[2:], typ)
	copy(b[4:], data)
	return b
}

func nlLinkSet(index int, flags uint32, mtu int, mac net.HardwareAddr) error {
	b := make([]byte, unix.SizeofIfInfomsg)
	b[0] = unix.AF_UNSPEC
	binary.NativeEndian.PutUint32(b[4:], uint32(index))
	binary.NativeEndian.PutUint32(b[8:], flags)
	binary.NativeEndian.PutUint32(b[12:], unix.IFF_UP) // change mask
	if mtu > 0 {
		v := make([]byte, 4)
		binary.NativeEndian.PutUint32(v, uint32(mtu))
		b = append(b, rtattr(unix.IFLA_MTU, v)...)
	}
	if mac != nil {
		b = append(b, rtattr(unix.IFLA_ADDRESS, mac)...)
	}
	return nlRequest(unix.RTM_NEWLINK, 0, b)
}

// nlSetAddress sets the MAC of a link without touching its flags.
func nlSetAddress(index int, mac net.HardwareAddr) error {
	b := make([]byte, unix.SizeofIfInfomsg)
	b[0] = unix.AF_UNSPEC
	binary.NativeEndian.PutUint32(b[4:], uint32(index))
	b = append(b, rtattr(unix.IFLA_ADDRESS, mac)...)
	return nlRequest(unix.RTM_NEWLINK, 0, b)
}

func nlAddrReplace(index int, p netip.Prefix) error {
	b := make([]byte, unix.SizeofIfAddrmsg)
	b[0] = unix.AF_INET
	b[1] = byte(p.Bits())
	binary.NativeEndian.PutUint32(b[4:], uint32(index))
	a := p.Addr().As4()
	b = append(b, rtattr(unix.IFA_LOCAL, a[:])...)
	b = append(b, rtattr(unix.IFA_ADDRESS, a[:])...)
	return nlRequest(unix.RTM_NEWADDR, unix.NLM_F_CREATE|unix.NLM_F_REPLACE, b)
}

func nlDefaultRoute(index int, gw netip.Addr) error {
	b := make([]byte, unix.SizeofRtMsg)
	b[0] = unix.AF_INET
	b[4] = unix.RT_TABLE_MAIN
	b[5] = unix.RTPROT_BOOT
	b[6] = unix.RT_SCOPE_UNIVERSE
	b[7] = unix.RTN_UNICAST
	g := gw.As4()
	b = append(b, rtattr(unix.RTA_GATEWAY, g[:])...)
	oif := make([]byte, 4)
	binary.NativeEndian.PutUint32(oif, uint32(index))
	b = append(b, rtattr(unix.RTA_OIF, oif)...)
	return nlRequest(unix.RTM_NEWROUTE, unix.NLM_F_CREATE|unix.NLM_F_REPLACE, b)
}
