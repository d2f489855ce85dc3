package sandbox

import (
	"context"
	"io"
	"testing"
	"time"
)

type zeroReader struct{ n int64 }

func (z *zeroReader) Read(p []byte) (int, error) {
	if z.n <= 0 {
		return 0, io.EOF
	}
	n := int64(len(p))
	if n > z.n {
		n = z.n
	}
	clear(p[:n])
	z.n -= n
	return int(n), nil
}

func TestThroughputProbe(t *testing.T) {
	sb := newShareSandbox(t, Options{})
	ctx := context.Background()
	t0 := time.Now()
	n, err := sb.WriteFile(ctx, "/dev/null", &zeroReader{n: 256 << 20}, 0o644)
	d := time.Since(t0)
	t.Logf("host->guest WriteFile %d bytes in %v: %.0f MB/s (%v)", n, d, float64(n)/1e6/d.Seconds(), err)
	t0 = time.Now()
	n, err = sb.ReadFile(ctx, "/dev/zero", io.Discard)
	_ = n
	out := mustSh(t, sb, "head -c 268435456 /dev/zero > /tmp/z; ls -l /tmp/z")
	t0 = time.Now()
	n, err = sb.ReadFile(ctx, "/tmp/z", io.Discard)
	d = time.Since(t0)
	t.Logf("guest->host ReadFile %d bytes in %v: %.0f MB/s (%v) %s", n, d, float64(n)/1e6/d.Seconds(), err, out)
}
