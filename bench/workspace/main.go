// Command workspace compares matchlock's shared directories (FUSE in the
// guest, served by the host over the control channel) with QEMU's virtio-9p
// (cache=loose, msize=256 KiB), on the same host directory, in the same VM,
// in one interleaved run: sequential write and read MB/s, and small-file
// create/stat/read/delete per second, measured in the guest by guestbench.
//
// Usage: go run ./bench/workspace [-rounds 5] [-mib 256] [-files 2000] [-dir HOSTDIR]
//
// It prints medians per transport and the ratio FUSE/9p (targets: ≥ 1.0×
// sequential, ≥ 0.5× small files).
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"matchlock.dev/matchlock/sandbox"
)

func main() {
	rounds := flag.Int("rounds", 5, "rounds (each measures both transports, alternating which goes first)")
	mib := flag.Int("mib", 256, "sequential file size in MiB")
	files := flag.Int("files", 2000, "small files per round")
	dir := flag.String("dir", "", "host directory to share (default: a new temporary directory)")
	agent := flag.String("agent", "", "guest agent binary (default: built from this tree)")
	accel := flag.String("accel", "", "kvm or tcg (default: detect)")
	asJSON := flag.Bool("json", false, "print every round as JSON too")
	ttl := flag.Duration("cache-ttl", 0, "FUSE name/attribute cache time (default: the mount default, 1s)")
	flag.Parse()
	if err := run(*rounds, *mib, *files, *dir, *agent, *accel, *asJSON, *ttl); err != nil {
		fmt.Fprintln(os.Stderr, "bench/workspace:", err)
		os.Exit(1)
	}
}

func run(rounds, mib, files int, dir, agent, accel string, asJSON bool, ttl time.Duration) error {
	tmp, err := os.MkdirTemp("", "matchlock-wsbench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	if dir == "" {
		dir = filepath.Join(tmp, "share")
		if err := os.Mkdir(dir, 0o755); err != nil {
			return err
		}
	}
	root := repoRoot()
	if agent == "" {
		agent = filepath.Join(tmp, "matchlock-guest")
		if err := goBuild(root, agent, "./cmd/matchlock-guest"); err != nil {
			return err
		}
	}
	gb := filepath.Join(tmp, "guestbench")
	if err := goBuild(root, gb, "./bench/workspace/guestbench"); err != nil {
		return err
	}
	img := &busybox{dir: tmp}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Hour)
	defer cancel()
	sb, err := sandbox.New(ctx, sandbox.Options{
		Image: "busybox", Images: img, Agent: agent, Accel: accel,
		MemoryMiB: 1024, DiskSizeMiB: 1024, NoNetwork: true,
		Mounts: []sandbox.Mount{
			{Source: dir, Target: "/mnt/fuse", CacheTTL: ttl},
			{Source: dir, Target: "/mnt/9p", Transport: "9p"},
		},
		Notice: func(s string) { fmt.Fprintln(os.Stderr, "matchlock:", s) },
	})
	if err != nil {
		return err
	}
	defer sb.Close()
	b, err := os.ReadFile(gb)
	if err != nil {
		return err
	}
	if _, err := sb.WriteFile(ctx, "/bin/guestbench", bytes.NewReader(b), 0o755); err != nil {
		return err
	}
	fmt.Printf("host dir %s, VM accel %s, %d rounds of %d MiB and %d files, FUSE cache TTL %v\n", dir, sb.Accel, rounds, mib, files, ttl)
	res := map[string][]map[string]float64{}
	order := []string{"fuse", "9p"}
	for r := 0; r < rounds; r++ {
		for _, t := range order {
			out, errOut, st, _, err := sb.Output(ctx, sandbox.ExecOptions{
				Argv: []string{"/bin/guestbench", "-dir", "/mnt/" + t, "-mib", fmt.Sprint(mib), "-files", fmt.Sprint(files)},
			})
			if err != nil || st.Code != 0 {
				return fmt.Errorf("%s round %d: %v (exit %d): %s", t, r, err, st.Code, errOut)
			}
			var m map[string]float64
			if err := json.Unmarshal(out, &m); err != nil {
				return fmt.Errorf("%s round %d: %v: %s", t, r, err, out)
			}
			res[t] = append(res[t], m)
			if asJSON {
				fmt.Printf("{\"transport\":%q,\"round\":%d,\"result\":%s}\n", t, r, strings.TrimSpace(string(out)))
			}
		}
		order[0], order[1] = order[1], order[0]
	}
	var keys []string
	for k := range res["fuse"][0] {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "metric\tmatchlock FUSE\tvirtio-9p\tratio\t")
	for _, k := range keys {
		f, n := median(res["fuse"], k), median(res["9p"], k)
		fmt.Fprintf(tw, "%s\t%.1f\t%.1f\t%.2f×\t\n", k, f, n, f/n)
	}
	return tw.Flush()
}

func median(rs []map[string]float64, k string) float64 {
	var v []float64
	for _, r := range rs {
		v = append(v, r[k])
	}
	sort.Float64s(v)
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

func goBuild(root, out, pkg string) error {
	cmd := exec.Command("go", "build", "-o", out, pkg)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %v: %s", pkg, err, b)
	}
	return nil
}

// busybox is an ImageSource: a busybox root made into ext4 with mkfs.ext4 -d.
type busybox struct {
	dir  string
	once sync.Once
	path string
	err  error
}

func (b *busybox) Rootfs(ctx context.Context, ref string) (string, sandbox.ImageConfig, error) {
	b.once.Do(func() {
		root := filepath.Join(b.dir, "root")
		for _, d := range []string{"bin", "etc", "tmp", "proc", "sys", "dev", "run", "mnt"} {
			os.MkdirAll(filepath.Join(root, d), 0o755)
		}
		bb, err := os.ReadFile("/bin/busybox")
		if err != nil {
			b.err = fmt.Errorf("busybox (install busybox-static): %w", err)
			return
		}
		os.WriteFile(filepath.Join(root, "bin", "busybox"), bb, 0o755)
		for _, app := range []string{"sh", "ls", "cat", "mount", "sync"} {
			os.Symlink("busybox", filepath.Join(root, "bin", app))
		}
		os.WriteFile(filepath.Join(root, "etc", "passwd"), []byte("root:x:0:0:root:/:/bin/sh\n"), 0o644)
		b.path = filepath.Join(b.dir, "root.ext4")
		if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", root, b.path, "64M").CombinedOutput(); err != nil {
			b.err = fmt.Errorf("mkfs.ext4: %v: %s", err, out)
		}
	})
	return b.path, sandbox.ImageConfig{Env: []string{"PATH=/bin"}}, b.err
}
