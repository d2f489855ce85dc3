// Command startup measures sandbox start-up against the bare VM it is made
// of, in one interleaved run:
//
//   - baseline: the same QEMU command line and kernel booting a trivial
//     init (busybox `reboot -f`), from QEMU start to QEMU exit;
//   - matchlock: `matchlock run --image IMAGE true`, wall time;
//   - control-channel round trip: median of N pings in one sandbox;
//   - idle memory: RSS and PSS of matchlock + QEMU for `--memory 256`.
//
// Usage: go run ./bench/startup -bin bin/matchlock -image busybox -n 15
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"matchlock.dev/matchlock/internal/initramfs"
	"matchlock.dev/matchlock/kernel"
	"matchlock.dev/matchlock/vmm"
	"matchlock.dev/matchlock/vmm/qemu"
)

func main() {
	bin := flag.String("bin", "bin/matchlock", "matchlock binary")
	image := flag.String("image", "busybox:latest", "small image to run")
	n := flag.Int("n", 15, "iterations of each start-up variant")
	pings := flag.Int("pings", 1000, "control-channel round trips")
	accel := flag.String("accel", "", "force kvm or tcg (default: what matchlock detects)")
	flag.Parse()
	if err := run(*bin, *image, *n, *pings, *accel); err != nil {
		fmt.Fprintln(os.Stderr, "startup:", err)
		os.Exit(1)
	}
}

func run(bin, image string, n, pings int, accel string) error {
	k, err := kernel.Find("")
	if err != nil {
		return err
	}
	tmp, err := os.MkdirTemp("", "matchlock-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	initrd, err := baselineInitrd(tmp)
	if err != nil {
		return err
	}
	if accel == "" {
		accel = "tcg"
		if out, err := exec.Command(bin, "diagnose").CombinedOutput(); err == nil && strings.Contains(string(out), "KVM:") {
			accel = "kvm"
		}
	}
	// Warm both paths once (page cache, converted image, verdict cache).
	if out, err := exec.Command(bin, "run", "--accel", accel, "--image", image, "true").CombinedOutput(); err != nil {
		return fmt.Errorf("warm-up run: %v: %s", err, out)
	}
	var base, ml []time.Duration
	for i := 0; i < n; i++ {
		d, err := bootBaseline(k, initrd, tmp, accel)
		if err != nil {
			return err
		}
		base = append(base, d)
		t0 := time.Now()
		if out, err := exec.Command(bin, "run", "--accel", accel, "--image", image, "true").CombinedOutput(); err != nil {
			return fmt.Errorf("run: %v: %s", err, out)
		}
		ml = append(ml, time.Since(t0))
	}
	mb, mm := median(base), median(ml)
	fmt.Printf("accel                     %s\n", accel)
	fmt.Printf("baseline boot (median)    %s  (n=%d, min %s, max %s)\n", ms(mb), n, ms(minD(base)), ms(maxD(base)))
	fmt.Printf("matchlock run true        %s  (n=%d, min %s, max %s)\n", ms(mm), n, ms(minD(ml)), ms(maxD(ml)))
	fmt.Printf("ratio                     %.2f  (target <= 1.15)\n", float64(mm)/float64(mb))

	rtt, err := pingMedian(bin, image, accel, pings)
	if err != nil {
		return err
	}
	fmt.Printf("control round trip        %.3f ms median of %d\n", float64(rtt)/1e6, pings)

	rss, pss, err := idleMemory(bin, image, accel)
	if err != nil {
		return err
	}
	fmt.Printf("idle memory (--memory 256) RSS %.1f MB, PSS %.1f MB (matchlock + QEMU)\n", rss/1e6, pss/1e6)
	return nil
}

// baselineInitrd is busybox as /init, powering off at once.
func baselineInitrd(dir string) (string, error) {
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		return "", fmt.Errorf("baseline needs busybox-static: %w", err)
	}
	script := []byte("#!/bin/busybox sh\n/bin/busybox reboot -f\n")
	es := []initramfs.Entry{
		{Name: "bin", Mode: 0o040755},
		{Name: "dev", Mode: 0o040755},
		{Name: "dev/console", Mode: 0o020600, Major: 5, Minor: 1},
		{Name: "bin/busybox", Mode: 0o100755, Data: bb},
		{Name: "init", Mode: 0o100755, Data: script},
	}
	p := filepath.Join(dir, "baseline.cpio")
	f, err := os.Create(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	return p, initramfs.Write(f, es)
}

func bootBaseline(k, initrd, dir, accel string) (time.Duration, error) {
	b := &qemu.Backend{}
	t0 := time.Now()
	m, err := b.Start(context.Background(), vmm.Spec{Kernel: k, Initrd: initrd, CPUs: 1, MemoryMiB: 512, RunDir: dir, Accel: accel})
	if err != nil {
		return 0, err
	}
	if err := m.Wait(); err != nil {
		return 0, fmt.Errorf("baseline VM: %w", err)
	}
	return time.Since(t0), nil
}

// pingMedian asks the hidden `matchlock debug ping` command for the
// round-trip median.
func pingMedian(bin, image, accel string, n int) (time.Duration, error) {
	out, err := exec.Command(bin, "debug", "ping", "--accel", accel, "--image", image, "-n", strconv.Itoa(n)).CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("debug ping: %v: %s", err, out)
	}
	ns, err := strconv.ParseInt(strings.TrimSpace(string(out)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("debug ping output %q", out)
	}
	return time.Duration(ns), nil
}

func idleMemory(bin, image, accel string) (rss, pss float64, err error) {
	cmd := exec.Command(bin, "run", "--accel", accel, "--memory", "256", "--image", image, "sh", "-c", "echo ready; sleep 600")
	out, err := cmd.StdoutPipe()
	if err != nil {
		return 0, 0, err
	}
	if err := cmd.Start(); err != nil {
		return 0, 0, err
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	if l, err := bufio.NewReader(out).ReadString('\n'); err != nil || l != "ready\n" {
		return 0, 0, fmt.Errorf("idle sandbox: %q %v", l, err)
	}
	pids := append([]int{cmd.Process.Pid}, children(cmd.Process.Pid)...)
	for _, p := range pids {
		r, s := memOf(p)
		rss += r
		pss += s
	}
	return rss, pss, nil
}

func children(pid int) []int {
	var out []int
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	for _, t := range tasks {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", pid, t.Name()))
		for _, f := range strings.Fields(string(b)) {
			if c, err := strconv.Atoi(f); err == nil {
				out = append(out, c)
			}
		}
	}
	return out
}

// memOf returns RSS and PSS in bytes from smaps_rollup.
func memOf(pid int) (rss, pss float64) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return 0, 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		v, _ := strconv.ParseFloat(f[1], 64)
		switch f[0] {
		case "Rss:":
			rss = v * 1024
		case "Pss:":
			pss = v * 1024
		}
	}
	return
}

func median(ds []time.Duration) time.Duration {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

func minD(ds []time.Duration) time.Duration {
	m := ds[0]
	for _, d := range ds {
		m = min(m, d)
	}
	return m
}

func maxD(ds []time.Duration) time.Duration {
	m := ds[0]
	for _, d := range ds {
		m = max(m, d)
	}
	return m
}

func ms(d time.Duration) string { return fmt.Sprintf("%.0f ms", float64(d)/1e6) }
