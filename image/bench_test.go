package image_test

import (
	"archive/tar"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"matchlock.dev/matchlock/image"
	"matchlock.dev/matchlock/image/imagetest"
	"matchlock.dev/matchlock/image/testregistry"
)

// benchImage is about 100 MB unpacked in three layers: a busybox base with
// 3000 small text files, 40 compressible 1.5 MB files, and 30 MB of random
// data, like a small distro image with some binaries.
func benchImage(b *testing.B) v1.Image {
	rng := rand.New(rand.NewSource(1))
	words := strings.Fields("the quick brown fox jumps over lazy dog lorem ipsum dolor sit amet config value path")
	text := func(n int) []byte {
		var sb strings.Builder
		for sb.Len() < n {
			sb.WriteString(words[rng.Intn(len(words))])
			sb.WriteByte(' ')
		}
		return []byte(sb.String()[:n])
	}
	bb, err := os.ReadFile(imagetest.BusyboxPath)
	if err != nil {
		b.Fatal(err)
	}
	base := []imagetest.Entry{{Name: "bin/busybox", Mode: 0o755, Body: bb}, {Name: "bin/sh", Type: tar.TypeSymlink, Link: "busybox"}}
	for i := 0; i < 3000; i++ {
		base = append(base, imagetest.Entry{Name: fmt.Sprintf("usr/share/doc/pkg%03d/file%d.txt", i/10, i), Body: text(3000)})
	}
	var mid []imagetest.Entry
	for i := 0; i < 40; i++ {
		mid = append(mid, imagetest.Entry{Name: fmt.Sprintf("usr/lib/lib%d.so", i), Mode: 0o755, Body: text(1500 << 10)})
	}
	random := make([]byte, 30<<20)
	rng.Read(random)
	top := []imagetest.Entry{{Name: "opt/app/blob.bin", Body: random}, {Name: "usr/share/doc/pkg000/.wh.file0.txt"}}
	return imagetest.Image(b, hostPlatform, v1.Config{Cmd: []string{"/bin/sh"}},
		imagetest.Layer(b, base...), imagetest.Layer(b, mid...), imagetest.Layer(b, top...))
}

// BenchmarkPullConvert pulls a ~100 MB image from the real registry and
// converts it, cold and cached, and does the same by hand with skopeo copy,
// umoci unpack and mkfs.ext4 -d when those tools are installed. Run it with
// bench/image_bench.sh (or -bench PullConvert -benchtime 1x).
func BenchmarkPullConvert(b *testing.B) {
	reg := testregistry.Start(b)
	img := benchImage(b)
	ref := reg.Host + "/bench:1"
	push(b, ref, img)
	size := int64(0)
	layers, _ := img.Layers()
	for _, l := range layers {
		n, _ := l.Size()
		size += n
	}
	b.Logf("image: %d layers, %.1f MB compressed", len(layers), float64(size)/1e6)

	timeit := func(f func() error) float64 {
		start := time.Now()
		if err := f(); err != nil {
			b.Fatal(err)
		}
		return time.Since(start).Seconds()
	}
	for i := 0; i < b.N; i++ {
		s, err := image.Open(filepath.Join(b.TempDir(), "images"))
		if err != nil {
			b.Fatal(err)
		}
		var got *image.Image
		pullCold := timeit(func() (err error) { got, err = s.Pull(bg, ref, image.PullOptions{}); return })
		var disk string
		convCold := timeit(func() (err error) { disk, err = s.Rootfs(bg, got); return })
		pullWarm := timeit(func() (err error) { _, err = s.Pull(bg, ref, image.PullOptions{}); return })
		convWarm := timeit(func() (err error) { _, err = s.Rootfs(bg, got); return })
		fi, _ := os.Stat(disk)
		s.Close()
		b.ReportMetric(pullCold, "pull-cold-s")
		b.ReportMetric(convCold, "convert-cold-s")
		b.ReportMetric(pullWarm, "pull-cached-s")
		b.ReportMetric(convWarm, "convert-cached-s")
		b.Logf("matchlock: pull %.3fs, convert %.3fs (ext4 %.1f MB); again: pull %.3fs, convert %.4fs",
			pullCold, convCold, float64(fi.Size())/1e6, pullWarm, convWarm)

		manual(b, ref, timeit)
	}
}

// manual does by hand what Pull and Rootfs do: skopeo copy to an OCI
// layout, umoci unpack, mkfs.ext4 -d.
func manual(b *testing.B, ref string, timeit func(func() error) float64) {
	for _, tool := range []string{"skopeo", "umoci", "mkfs.ext4"} {
		if _, err := exec.LookPath(tool); err != nil {
			b.Logf("by hand: skipped, %s not installed (apt-get install -y skopeo umoci)", tool)
			return
		}
	}
	dir := b.TempDir()
	run := func(name string, args ...string) error {
		out, err := exec.Command(name, args...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("%s: %v\n%s", name, err, out)
		}
		return nil
	}
	layout := filepath.Join(dir, "oci")
	copyS := timeit(func() error {
		return run("skopeo", "copy", "--quiet", "--src-tls-verify=false", "docker://"+ref, "oci:"+layout+":bench")
	})
	bundle := filepath.Join(dir, "bundle")
	unpackS := timeit(func() error { return run("umoci", "unpack", "--image", layout+":bench", bundle) })
	disk := filepath.Join(dir, "rootfs.ext4")
	mkfsS := timeit(func() error {
		return run("mkfs.ext4", "-q", "-F", "-b", "4096", "-d", filepath.Join(bundle, "rootfs"), disk, "400M")
	})
	b.ReportMetric(copyS, "skopeo-copy-s")
	b.ReportMetric(unpackS, "umoci-unpack-s")
	b.ReportMetric(mkfsS, "mkfs-ext4-s")
	b.Logf("by hand: skopeo copy %.3fs, umoci unpack %.3fs, mkfs.ext4 -d %.3fs (total %.3fs)",
		copyS, unpackS, mkfsS, copyS+unpackS+mkfsS)
}
