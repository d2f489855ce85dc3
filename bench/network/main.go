// Command network measures the sandbox network: guest → host-server
// throughput (upload and download of -mib MiB over HTTP) and connection
// setup (-conns sequential TCP connects with one byte each way), through
// matchlock's policy path and, as the baseline, through QEMU's built-in user
// networking (slirp, MATCHLOCK_NET_BACKEND=slirp: a benchmark-only knob) in
// the same run, interleaved, against the same server on 127.0.0.1.
//
// Policy path: the guest reaches the server as bench.test (--add-host
// bench.test:127.0.0.1 --allow-host bench.test --allow-private bench.test),
// i.e. DNS to a synthetic address, policy decision, host-side resolution
// and dial, MTU 65520. Slirp: the guest reaches the host's loopback at
// 10.213.0.1 (slirp's host alias), MTU 1500 (QEMU 7 has no larger one).
//
// Usage: go run ./bench/network -bin bin/matchlock -image busybox -n 3
package main

import (
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

func main() {
	bin := flag.String("bin", "bin/matchlock", "matchlock binary")
	image := flag.String("image", "busybox:latest", "image with a POSIX shell")
	n := flag.Int("n", 3, "rounds (each measures both backends)")
	mib := flag.Int("mib", 256, "MiB per upload / download")
	conns := flag.Int("conns", 200, "sequential connections per round")
	flag.Parse()
	if err := run(*bin, *image, *n, *mib, *conns); err != nil {
		fmt.Fprintln(os.Stderr, "network bench:", err)
		os.Exit(1)
	}
}

type backend struct {
	name   string
	env    []string
	args   []string
	host   string // how the guest names the server
	id     string
	up     []float64 // MB/s
	down   []float64
	connMS []float64
}

func run(bin, image string, rounds, mib, conns int) error {
	probe, err := buildNetprobe()
	if err != nil {
		return err
	}
	defer os.Remove(probe)

	// The server: /upload discards and reports, /download streams zeros.
	mux := http.NewServeMux()
	mux.HandleFunc("/upload", func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.CopyBuffer(io.Discard, r.Body, make([]byte, 256<<10))
		fmt.Fprintf(w, "%d", n)
	})
	mux.HandleFunc("/download", func(w http.ResponseWriter, r *http.Request) {
		n, _ := strconv.ParseInt(r.URL.Query().Get("n"), 10, 64)
		w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
		buf := make([]byte, 256<<10)
		for n > 0 {
			k := min(n, int64(len(buf)))
			if _, err := w.Write(buf[:k]); err != nil {
				return
			}
			n -= k
		}
	})
	hl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer hl.Close()
	go http.Serve(hl, mux)
	el, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer el.Close()
	go func() {
		for {
			c, err := el.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); io.Copy(c, c) }()
		}
	}()
	httpPort := hl.Addr().(*net.TCPAddr).Port
	echoPort := el.Addr().(*net.TCPAddr).Port

	bs := []*backend{
		{name: "policy", host: "bench.test",
			args: []string{"--add-host", "bench.test:127.0.0.1", "--allow-host", "bench.test", "--allow-private", "bench.test"}},
		{name: "slirp", host: "10.213.0.1", env: []string{"MATCHLOCK_NET_BACKEND=slirp"}},
	}
	for _, b := range bs {
		args := append([]string{"run", "-d", "--memory", "512", "--image", image}, b.args...)
		cmd := exec.Command(bin, args...)
		cmd.Env = append(os.Environ(), b.env...)
		out, err := cmd.Output()
		if err != nil {
			return fmt.Errorf("start %s sandbox: %v %s", b.name, err, stderr(err))
		}
		b.id = strings.TrimSpace(string(out))
		defer exec.Command(bin, "rm", "-f", b.id).Run()
		f, err := os.Open(probe)
		if err != nil {
			return err
		}
		cp := exec.Command(bin, "exec", "-i", b.id, "sh", "-c", "cat > /bin/netprobe && chmod +x /bin/netprobe")
		cp.Stdin = f
		out, err = cp.CombinedOutput()
		f.Close()
		if err != nil {
			return fmt.Errorf("copy netprobe: %v %s", err, out)
		}
	}
	bytes := int64(mib) << 20
	rate := regexp.MustCompile(`([0-9.]+) MB/s`)
	each := regexp.MustCompile(`([0-9.]+) ms each`)
	exe := func(b *backend, re *regexp.Regexp, args ...string) (float64, error) {
		out, err := exec.Command(bin, append([]string{"exec", b.id, "netprobe"}, args...)...).CombinedOutput()
		if err != nil {
			return 0, fmt.Errorf("%s %v: %v %s", b.name, args, err, out)
		}
		m := re.FindSubmatch(out)
		if m == nil {
			return 0, fmt.Errorf("%s %v: %s", b.name, args, out)
		}
		return strconv.ParseFloat(string(m[1]), 64)
	}
	for r := 0; r < rounds; r++ {
		for _, b := range bs {
			base := fmt.Sprintf("http://%s:%d", b.host, httpPort)
			v, err := exe(b, rate, "upload", base+"/upload", strconv.FormatInt(bytes, 10))
			if err != nil {
				return err
			}
			b.up = append(b.up, v)
			if v, err = exe(b, rate, "download", fmt.Sprintf("%s/download?n=%d", base, bytes)); err != nil {
				return err
			}
			b.down = append(b.down, v)
			if v, err = exe(b, each, "connects", fmt.Sprintf("%s:%d", b.host, echoPort), strconv.Itoa(conns)); err != nil {
				return err
			}
			b.connMS = append(b.connMS, v)
			fmt.Fprintf(os.Stderr, "round %d %-6s up %6.1f MB/s  down %6.1f MB/s  connect %.3f ms\n",
				r+1, b.name, b.up[r], b.down[r], b.connMS[r])
		}
	}
	p, s := bs[0], bs[1]
	fmt.Printf("network bench: %d rounds, %d MiB transfers, %d sequential connects (medians; range)\n", rounds, mib, conns)
	fmt.Printf("%-24s %-30s %-30s %s\n", "", "policy (MTU 65520)", "slirp (MTU 1500)", "policy/slirp")
	row := func(label string, a, b []float64, unit string, higherBetter bool) {
		ma, mb := median(a), median(b)
		ratio := ma / mb
		if !higherBetter {
			ratio = mb / ma // > 1 means the policy path is faster
		}
		fmt.Printf("%-24s %-30s %-30s %.2f×\n", label, fmtRange(a, unit), fmtRange(b, unit), ratio)
	}
	row("upload (guest→server)", p.up, s.up, "MB/s", true)
	row("download (server→guest)", p.down, s.down, "MB/s", true)
	row("connection setup", p.connMS, s.connMS, "ms", false)
	fmt.Println("(connection setup ratio is slirp time / policy time: above 1 means the policy path is faster)")
	return nil
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func fmtRange(v []float64, unit string) string {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	prec := 1
	if unit == "ms" {
		prec = 3
	}
	return fmt.Sprintf("%.*f %s (%.*f–%.*f)", prec, median(v), unit, prec, s[0], prec, s[len(s)-1])
}

func stderr(err error) string {
	if ee, ok := err.(*exec.ExitError); ok {
		return strings.TrimSpace(string(ee.Stderr))
	}
	return ""
}

// buildNetprobe builds the static guest client (test/e2e/netprobe).
func buildNetprobe() (string, error) {
	p := filepath.Join(os.TempDir(), fmt.Sprintf("matchlock-bench-netprobe-%d", os.Getpid()))
	cmd := exec.Command("go", "build", "-o", p, "./test/e2e/netprobe")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build netprobe (run from the repository root): %v %s", err, out)
	}
	return p, nil
}
