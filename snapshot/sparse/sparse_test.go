package sparse

import (
	"bytes"
	"crypto/rand"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

func allocated(t *testing.T, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Blocks * 512
}

// writeSample writes 1 MiB of random data at 0, a zero-filled MiB at 8 MiB
// (data extents, not a hole), 4 KiB at 100 MiB, and leaves the file 200 MiB
// long, so it ends in a hole.
func writeSample(t *testing.T, f *os.File) []byte {
	t.Helper()
	a := make([]byte, 1<<20)
	rand.Read(a)
	f.WriteAt(a, 0)
	f.WriteAt(make([]byte, 1<<20), 8<<20)
	f.WriteAt([]byte("tail"), 100<<20)
	if err := f.Truncate(200 << 20); err != nil {
		t.Fatal(err)
	}
	return a
}

func check(t *testing.T, dst string, a []byte) {
	t.Helper()
	got, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 200<<20 || !bytes.Equal(got[:1<<20], a) || string(got[100<<20:100<<20+4]) != "tail" {
		t.Fatalf("copy differs (len %d)", len(got))
	}
	for _, b := range got[1<<20 : 100<<20] {
		if b != 0 {
			t.Fatal("nonzero byte in a hole")
		}
	}
}

func TestCopyKeepsHoles(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	a := writeSample(t, f)
	f.Close()
	dst := filepath.Join(dir, "dst")
	if _, err := CopyFile(dst, src); err != nil {
		t.Fatal(err)
	}
	check(t, dst, a)
	if got := allocated(t, dst); got > 3<<20 {
		t.Fatalf("copy allocates %d bytes; the source holds ~2 MiB", got)
	}
	if _, err := CopyFile(dst, src); err == nil {
		t.Fatal("copy over an existing file succeeded")
	}
}

func TestCopyFromMemfdSkipsZeroPages(t *testing.T) {
	fd, err := unix.MemfdCreate("sparse-test", unix.MFD_CLOEXEC)
	if err != nil {
		t.Skip("memfd:", err)
	}
	f := os.NewFile(uintptr(fd), "memfd")
	defer f.Close()
	a := writeSample(t, f)
	dst := filepath.Join(t.TempDir(), "dst")
	n, err := Copy(dst, f)
	if err != nil {
		t.Fatal(err)
	}
	check(t, dst, a)
	// Across filesystems the copy goes through read/write, which also
	// drops the zero-filled MiB.
	if n > 1<<20+8192 || allocated(t, dst) > 1<<20+64<<10 {
		t.Fatalf("copied %d bytes, allocated %d; want ~1 MiB", n, allocated(t, dst))
	}
}
