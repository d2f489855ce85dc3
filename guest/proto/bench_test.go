package proto

import (
	"context"
	"io"
	"testing"
)

func benchTransport(b *testing.B, name string) transport {
	for _, tr := range transports {
		if tr.name == name {
			return tr
		}
	}
	b.Skipf("no %s transport", name)
	return transport{}
}

// BenchmarkPingPong measures a round trip over a unix socketpair.
func BenchmarkPingPong(b *testing.B) {
	for _, name := range []string{"unix", "pipe"} {
		b.Run(name, func(b *testing.B) {
			host, _ := connPair(b, benchTransport(b, name), Config{}, Config{})
			ctx := context.Background()
			b.ReportAllocs()
			for b.Loop() {
				if _, err := host.Ping(ctx); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkThroughput measures one stream's bulk throughput, host to guest.
func BenchmarkThroughput(b *testing.B) {
	for _, bc := range []struct {
		name  string
		tr    string
		chunk int
	}{
		{"unix/64KiB", "unix", 64 << 10},
		{"unix/1MiB", "unix", 1 << 20},
		{"unix/1KiB", "unix", 1 << 10},
		{"pipe/1MiB", "pipe", 1 << 20},
	} {
		b.Run(bc.name, func(b *testing.B) {
			host, guest := connPair(b, benchTransport(b, bc.tr), Config{}, Config{})
			h, g := openAccept(b, host, guest, "bench")
			done := make(chan error, 1)
			go func() {
				_, err := io.Copy(io.Discard, g.Reader(Stdin))
				done <- err
			}()
			buf := make([]byte, bc.chunk)
			b.SetBytes(int64(bc.chunk))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := h.Write(Stdin, buf); err != nil {
					b.Fatal(err)
				}
			}
			h.CloseWrite(Stdin)
			if err := <-done; err != nil {
				b.Fatal(err)
			}
		})
	}
}
