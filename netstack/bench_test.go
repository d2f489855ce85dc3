package netstack

import (
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// The benchmarks run the whole path in one process: guest gVisor stack →
// socketpair (length-prefixed frames) → host stack → forwarder → a server
// on 127.0.0.1. Both stacks share the machine's cores, so the numbers are a
// lower bound for a real VM (whose kernel runs on its own vCPU).

func benchEnv(b *testing.B, mtu uint32) (*env, netip.Addr) {
	e := newEnv(b, []string{"svc.test"}, []string{"svc.test"}, withMTU(mtu))
	e.res.set("svc.test", "127.0.0.1")
	return e, e.mustResolve("svc.test")
}

func sinkServer(b *testing.B) (uint16, chan int64) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	got := make(chan int64, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		n, _ := io.Copy(io.Discard, c)
		c.Close()
		got <- n
	}()
	return uint16(ln.Addr().(*net.TCPAddr).Port), got
}

func benchUpload(b *testing.B, mtu uint32) {
	e, ip := benchEnv(b, mtu)
	port, got := sinkServer(b)
	c, err := e.dial(netip.AddrPortFrom(ip, port))
	if err != nil {
		b.Fatal(err)
	}
	chunk := make([]byte, 64<<10)
	b.SetBytes(int64(len(chunk)))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := c.Write(chunk); err != nil {
			b.Fatal(err)
		}
	}
	c.(interface{ CloseWrite() error }).CloseWrite()
	select {
	case n := <-got:
		if n != int64(b.N)*int64(len(chunk)) {
			b.Fatalf("server got %d bytes, want %d", n, int64(b.N)*int64(len(chunk)))
		}
	case <-time.After(60 * time.Second):
		b.Fatal("sink did not finish")
	}
	b.StopTimer()
	c.Close()
}

func benchDownload(b *testing.B, mtu uint32) {
	e, ip := benchEnv(b, mtu)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	chunk := make([]byte, 64<<10)
	total := int64(b.N) * int64(len(chunk))
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		for i := 0; i < b.N; i++ {
			if _, err := c.Write(chunk); err != nil {
				return
			}
		}
	}()
	c, err := e.dial(netip.AddrPortFrom(ip, uint16(ln.Addr().(*net.TCPAddr).Port)))
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	b.SetBytes(int64(len(chunk)))
	b.ResetTimer()
	n, err := io.Copy(io.Discard, c)
	if err != nil || n != total {
		b.Fatalf("got %d bytes, want %d: %v", n, total, err)
	}
}

func BenchmarkUploadMTU1500(b *testing.B)    { benchUpload(b, 1500) }
func BenchmarkUploadMTU65520(b *testing.B)   { benchUpload(b, 65520) }
func BenchmarkDownloadMTU1500(b *testing.B)  { benchDownload(b, 1500) }
func BenchmarkDownloadMTU65520(b *testing.B) { benchDownload(b, 65520) }

// BenchmarkConnect measures one connection to an allowed name: guest SYN,
// policy decision, host lookup (fake resolver), upstream dial, handshake,
// one byte each way, close.
func BenchmarkConnect(b *testing.B) {
	e, ip := benchEnv(b, 1500)
	echo := newEchoServer(b)
	dst := netip.AddrPortFrom(ip, echo.port())
	buf := make([]byte, 1)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		c, err := e.dial(dst)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := c.Write([]byte{1}); err != nil { // not a letter: no HTTP sniffing wait
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
}

// BenchmarkDNS measures one guest A query for an allowed name (fake
// resolver) over UDP to the gateway.
func BenchmarkDNS(b *testing.B) {
	e, _ := benchEnv(b, 1500)
	q := buildQuery(b, "svc.test.", dnsmessage.TypeA)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		reply, err := e.g.Exchange(dnsServer, q, 3*time.Second)
		if err != nil {
			b.Fatal(err)
		}
		if rc, _ := parseAnswer(b, reply); rc != dnsmessage.RCodeSuccess {
			b.Fatal(rc)
		}
	}
}
