// Command guestbench measures a mounted directory from inside a guest and
// prints one JSON object. bench/workspace builds it statically and runs it
// on each transport in turn.
//
//	guestbench -dir DIR [-mib 256] [-files 2000]
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

type result struct {
	SeqWriteMBs     float64 `json:"seq_write_mbs"`     // 1 MiB writes, then fsync
	SeqReadColdMBs  float64 `json:"seq_read_cold_mbs"` // after dropping the guest's caches
	SeqReadWarmMBs  float64 `json:"seq_read_warm_mbs"` // again, from the guest's page cache where the transport keeps one
	CreateOps       float64 `json:"create_ops"`        // create+write 100 B+close, files/s
	StatColdOps     float64 `json:"stat_cold_ops"`     // lstat after dropping caches, files/s
	StatWarmOps     float64 `json:"stat_warm_ops"`     // lstat again
	ReadSmallOps    float64 `json:"read_small_ops"`    // open+read+close, files/s (cold)
	DeleteOps       float64 `json:"delete_ops"`        // unlink, files/s
	SmallFilesTotal float64 `json:"small_files_ops"`   // create+stat+delete of one file, per second
}

func dropCaches() {
	unix.Sync()
	os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0)
}

func main() {
	dir := flag.String("dir", "", "directory to measure")
	mib := flag.Int("mib", 256, "sequential file size in MiB")
	files := flag.Int("files", 2000, "small files")
	flag.Parse()
	if *dir == "" {
		fmt.Fprintln(os.Stderr, "guestbench: -dir is required")
		os.Exit(2)
	}
	r, err := run(*dir, *mib, *files)
	if err != nil {
		fmt.Fprintln(os.Stderr, "guestbench:", err)
		os.Exit(1)
	}
	json.NewEncoder(os.Stdout).Encode(r)
}

func run(dir string, mib, files int) (result, error) {
	var r result
	work := filepath.Join(dir, fmt.Sprintf("bench-%d", os.Getpid()))
	if err := os.MkdirAll(work, 0o755); err != nil {
		return r, err
	}
	defer os.RemoveAll(work)
	big := filepath.Join(work, "big")
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i * 31)
	}
	mbs := func(d time.Duration) float64 { return float64(mib) * (1 << 20) / 1e6 / d.Seconds() }

	t0 := time.Now()
	f, err := os.Create(big)
	if err != nil {
		return r, err
	}
	for i := 0; i < mib; i++ {
		if _, err := f.Write(buf); err != nil {
			return r, err
		}
	}
	if err := f.Sync(); err != nil {
		return r, err
	}
	f.Close()
	r.SeqWriteMBs = mbs(time.Since(t0))

	for i, warm := range []bool{false, true} {
		if !warm {
			dropCaches()
		}
		t0 = time.Now()
		f, err := os.Open(big)
		if err != nil {
			return r, err
		}
		n, err := io.CopyBuffer(io.Discard, f, buf)
		f.Close()
		if err != nil || n != int64(mib)<<20 {
			return r, fmt.Errorf("read %d bytes: %v", n, err)
		}
		if i == 0 {
			r.SeqReadColdMBs = mbs(time.Since(t0))
		} else {
			r.SeqReadWarmMBs = mbs(time.Since(t0))
		}
	}
	os.Remove(big)

	small := filepath.Join(work, "small")
	var names []string
	for i := 0; i < files; i++ {
		names = append(names, filepath.Join(small, fmt.Sprintf("d%02d", i%20), fmt.Sprintf("f%05d", i)))
	}
	for i := 0; i < 20; i++ {
		os.MkdirAll(filepath.Join(small, fmt.Sprintf("d%02d", i)), 0o755)
	}
	content := make([]byte, 100)
	ops := func(d time.Duration) float64 { return float64(files) / d.Seconds() }
	t0 = time.Now()
	for _, n := range names {
		if err := os.WriteFile(n, content, 0o644); err != nil {
			return r, err
		}
	}
	tc := time.Since(t0)
	r.CreateOps = ops(tc)
	dropCaches()
	var st unix.Stat_t
	for _, out := range []*float64{&r.StatColdOps, &r.StatWarmOps} {
		t0 = time.Now()
		for _, n := range names {
			if err := unix.Lstat(n, &st); err != nil {
				return r, err
			}
		}
		*out = ops(time.Since(t0))
	}
	tstat := time.Duration(float64(time.Second) * float64(files) / r.StatColdOps)
	dropCaches()
	t0 = time.Now()
	for _, n := range names {
		if _, err := os.ReadFile(n); err != nil {
			return r, err
		}
	}
	r.ReadSmallOps = ops(time.Since(t0))
	t0 = time.Now()
	for _, n := range names {
		if err := os.Remove(n); err != nil {
			return r, err
		}
	}
	td := time.Since(t0)
	r.DeleteOps = ops(td)
	r.SmallFilesTotal = ops(tc + tstat + td)
	return r, nil
}
