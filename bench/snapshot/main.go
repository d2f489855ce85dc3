// Command snapshot measures restoring sandboxes from a snapshot against
// booting them, in one interleaved run:
//
//   - cold: `matchlock run --cold --image IMAGE true`, wall time;
//   - restore: `matchlock run --snapshot S true`, wall time;
//   - 4 forks: four concurrent `matchlock run --snapshot S true`, wall time
//     until the last has answered (exited);
//   - live fork: `matchlock fork ID -n 4` of a running sandbox, until all
//     four run;
//   - memory: private, PSS and RSS (smaps_rollup) of the QEMU of each of 4
//     sandboxes restored from S and of one cold-booted sandbox, idle.
//
// Targets (the project's issue): restore ≤ 0.15 × cold; all 4 forks
// answering within 0.3 × one cold start.
//
// Usage: go run ./bench/snapshot -bin bin/matchlock -image busybox -n 7
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

func main() {
	bin := flag.String("bin", "bin/matchlock", "matchlock binary")
	image := flag.String("image", "busybox:latest", "small image to run")
	n := flag.Int("n", 7, "iterations of each variant")
	memory := flag.Int("memory", 256, "guest memory in MiB")
	flag.Parse()
	b := &bench{bin: *bin, image: *image, mem: strconv.Itoa(*memory)}
	err := b.run(*n)
	b.cleanup()
	if err != nil {
		fmt.Fprintln(os.Stderr, "snapshot bench:", err)
		os.Exit(1)
	}
}

type bench struct {
	bin, image, mem string
	snap            string
	sandboxes       []string
}

func (b *bench) ml(args ...string) (string, error) {
	out, err := exec.Command(b.bin, args...).Output()
	if err != nil {
		msg := ""
		if ee, ok := err.(*exec.ExitError); ok {
			msg = strings.TrimSpace(string(ee.Stderr))
		}
		return "", fmt.Errorf("matchlock %s: %v: %s", strings.Join(args, " "), err, msg)
	}
	return strings.TrimSpace(string(out)), nil
}

func (b *bench) timed(args ...string) (time.Duration, error) {
	t0 := time.Now()
	_, err := b.ml(args...)
	return time.Since(t0), err
}

func (b *bench) detached(args ...string) (string, error) {
	id, err := b.ml(append([]string{"run", "-d"}, args...)...)
	if err == nil {
		b.sandboxes = append(b.sandboxes, id)
	}
	return id, err
}

func (b *bench) cleanup() {
	if len(b.sandboxes) > 0 {
		b.ml(append([]string{"rm", "-f"}, b.sandboxes...)...)
	}
	if b.snap != "" {
		b.ml("snapshot", "rm", b.snap)
	}
}

func (b *bench) run(n int) error {
	cold := []string{"run", "--cold", "--memory", b.mem, "--image", b.image, "true"}
	if _, err := b.timed(cold...); err != nil { // warm caches (image, verdict)
		return err
	}
	src, err := b.detached("--memory", b.mem, "--image", b.image)
	if err != nil {
		return err
	}
	b.snap = fmt.Sprintf("bench-%d", os.Getpid())
	t0 := time.Now()
	if _, err := b.ml("snapshot", "create", src, "--name", b.snap); err != nil {
		return err
	}
	create := time.Since(t0)
	restore := []string{"run", "--snapshot", b.snap, "true"}
	if _, err := b.timed(restore...); err != nil {
		return err
	}

	var tc, tr, t4, tf []time.Duration
	for i := 0; i < n; i++ {
		d, err := b.timed(cold...)
		if err != nil {
			return err
		}
		tc = append(tc, d)
		if d, err = b.timed(restore...); err != nil {
			return err
		}
		tr = append(tr, d)
		if d, err = b.concurrent(4, restore); err != nil {
			return err
		}
		t4 = append(t4, d)
		t0 := time.Now()
		out, err := b.ml("fork", src, "-n", "4")
		if err != nil {
			return err
		}
		tf = append(tf, time.Since(t0))
		ids := strings.Fields(out)
		b.ml(append([]string{"rm", "-f"}, ids...)...)
	}
	mc, mr, m4, mf := median(tc), median(tr), median(t4), median(tf)
	fmt.Printf("snapshot create (source pauses briefly): %v\n", create.Round(time.Millisecond))
	fmt.Printf("%-34s median %7.1f ms  (runs: %s)\n", "cold run … true", ms(mc), list(tc))
	fmt.Printf("%-34s median %7.1f ms  (runs: %s)\n", "run --snapshot … true", ms(mr), list(tr))
	fmt.Printf("%-34s median %7.1f ms  (runs: %s)\n", "4 concurrent run --snapshot", ms(m4), list(t4))
	fmt.Printf("%-34s median %7.1f ms  (runs: %s)\n", "fork -n 4 (live, until running)", ms(mf), list(tf))
	fmt.Printf("restore / cold          = %.2f  (target ≤ 0.15)\n", ms(mr)/ms(mc))
	fmt.Printf("4 forks / one cold      = %.2f  (target ≤ 0.30)\n", ms(m4)/ms(mc))
	fmt.Printf("fork -n 4 / one cold    = %.2f\n", ms(mf)/ms(mc))
	return b.memory()
}

func (b *bench) concurrent(k int, args []string) (time.Duration, error) {
	var wg sync.WaitGroup
	errs := make([]error, k)
	t0 := time.Now()
	for i := 0; i < k; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			_, errs[i] = b.ml(args...)
		}(i)
	}
	wg.Wait()
	d := time.Since(t0)
	for _, err := range errs {
		if err != nil {
			return 0, err
		}
	}
	return d, nil
}

// memory reports private/PSS/RSS of idle QEMUs: 4 restored from the
// snapshot (sharing its RAM file's page cache) and 1 cold-booted.
func (b *bench) memory() error {
	var forks []string
	for i := 0; i < 4; i++ {
		id, err := b.detached("--snapshot", b.snap)
		if err != nil {
			return err
		}
		forks = append(forks, id)
	}
	cold, err := b.detached("--cold", "--memory", b.mem, "--image", b.image)
	if err != nil {
		return err
	}
	time.Sleep(2 * time.Second) // idle
	pids, err := b.qemuPids()
	if err != nil {
		return err
	}
	fmt.Printf("memory per QEMU (idle, --memory %s): private / PSS / RSS\n", b.mem)
	for i, id := range forks {
		p, s, r := smaps(pids[id])
		fmt.Printf("  restored %d  %6.1f / %6.1f / %6.1f MiB\n", i+1, p, s, r)
	}
	p, s, r := smaps(pids[cold])
	fmt.Printf("  cold        %6.1f / %6.1f / %6.1f MiB\n", p, s, r)
	return nil
}

func (b *bench) qemuPids() (map[string]int, error) {
	out, err := b.ml("list", "--json")
	if err != nil {
		return nil, err
	}
	var rs []struct {
		ID      string `json:"id"`
		QEMUPID int    `json:"qemu_pid"`
	}
	if err := json.Unmarshal([]byte(out), &rs); err != nil {
		return nil, err
	}
	m := map[string]int{}
	for _, r := range rs {
		m[r.ID] = r.QEMUPID
	}
	return m, nil
}

// smaps returns private, PSS and RSS in MiB from /proc/PID/smaps_rollup.
func smaps(pid int) (priv, pss, rss float64) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 2 {
			continue
		}
		kb, _ := strconv.ParseFloat(fs[1], 64)
		mib := kb / 1024
		switch fs[0] {
		case "Rss:":
			rss = mib
		case "Pss:":
			pss = mib
		case "Private_Clean:", "Private_Dirty:":
			priv += mib
		}
	}
	return
}

func median(ds []time.Duration) time.Duration {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

func ms(d time.Duration) float64 { return float64(d) / 1e6 }

func list(ds []time.Duration) string {
	var p []string
	for _, d := range ds {
		p = append(p, strconv.Itoa(int(ms(d))))
	}
	return strings.Join(p, " ")
}
