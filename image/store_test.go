package image_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/random"

	"matchlock.dev/matchlock/image"
	"matchlock.dev/matchlock/image/imagetest"
)

func importBusybox(t *testing.T, s *image.Store, tag string) *image.Image {
	t.Helper()
	img, err := s.Import(bg, tag, bytes.NewReader(imagetest.DockerArchive(t, imagetest.Busybox(t, hostPlatform), "busybox:latest")))
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func TestResolveNames(t *testing.T) {
	s := openStore(t)
	img := importBusybox(t, s, "busybox")
	hex := strings.TrimPrefix(img.Digest, "sha256:")
	for _, ref := range []string{"busybox", "busybox:latest", "library/busybox", "index.docker.io/library/busybox:latest",
		img.Digest, hex[:12], "sha256:" + hex[:8], "busybox@" + img.Digest} {
		got, err := s.Resolve(ref)
		if err != nil {
			t.Errorf("Resolve(%q): %v", ref, err)
			continue
		}
		if got.Digest != img.Digest || got.Ref != ref {
			t.Errorf("Resolve(%q) = %s (ref %q)", ref, got.Digest, got.Ref)
		}
	}
	for _, ref := range []string{"busybox:1", "other", "abc", "sha256:ffff"} {
		if _, err := s.Resolve(ref); !errors.Is(err, image.ErrNotFound) {
			t.Errorf("Resolve(%q): %v, want ErrNotFound", ref, err)
		}
	}
}

func TestTagListRemovePrune(t *testing.T) {
	s := openStore(t)
	img := importBusybox(t, s, "busybox:latest")
	if err := s.Tag("busybox", "localhost:5000/mine/bb:v1"); err != nil {
		t.Fatal(err)
	}
	if err := s.Tag("nope", "x:1"); !errors.Is(err, image.ErrNotFound) {
		t.Errorf("Tag of a missing image: %v", err)
	}
	list, err := s.List()
	if err != nil {
		t.Fatal(err)
	}
	var refs []string
	for _, i := range list {
		refs = append(refs, i.Ref)
	}
	if strings.Join(refs, " ") != "busybox:latest localhost:5000/mine/bb:v1" {
		t.Errorf("List refs: %v", refs)
	}
	disk, err := s.Rootfs(bg, img)
	if err != nil {
		t.Fatal(err)
	}
	blobs := len(blobFiles(t, s))

	// Removing one name keeps the image; the last one takes it.
	if err := s.Remove("busybox"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Resolve(img.Digest); err != nil {
		t.Fatalf("image gone with a name left: %v", err)
	}
	if rep, err := s.Prune(bg); err != nil || rep.Blobs != 0 || rep.Disks != 0 {
		t.Fatalf("prune with the image named: %+v %v", rep, err)
	}
	if err := s.Remove("localhost:5000/mine/bb:v1"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Resolve(img.Digest); !errors.Is(err, image.ErrNotFound) {
		t.Fatalf("image left after its last name: %v", err)
	}
	if err := s.Remove("busybox"); !errors.Is(err, image.ErrNotFound) {
		t.Errorf("second Remove: %v", err)
	}
	rep, err := s.Prune(bg)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Blobs != blobs || rep.Disks != 1 || len(blobFiles(t, s)) != 0 {
		t.Errorf("prune: %+v, %d blobs before, %d left", rep, blobs, len(blobFiles(t, s)))
	}
	if _, err := os.Stat(disk); !os.IsNotExist(err) {
		t.Errorf("disk not pruned: %v", err)
	}
}

func TestRemoveByDigestAndSharedBlobs(t *testing.T) {
	s := openStore(t)
	a := importBusybox(t, s, "a:1")
	// b shares a's layer and adds one.
	extra := imagetest.Layer(t, imagetest.Entry{Name: "extra", Body: []byte("x")})
	bl, _ := imagetest.Busybox(t, hostPlatform).Layers()
	b, err := s.Import(bg, "b:1", bytes.NewReader(imagetest.DockerArchive(t,
		imagetest.Image(t, hostPlatform, imagetestConfig(), bl[0], extra), "b:1")))
	if err != nil {
		t.Fatal(err)
	}
	if a.Layers[0].Digest != b.Layers[0].Digest {
		t.Fatalf("layers not shared: %s %s", a.Layers[0].Digest, b.Layers[0].Digest)
	}
	if err := s.Remove(strings.TrimPrefix(a.Digest, "sha256:")[:10]); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Prune(bg); err != nil {
		t.Fatal(err)
	}
	if !blobFiles(t, s)[b.Layers[0].Digest] {
		t.Error("prune removed a layer that b still uses")
	}
	if _, err := s.Rootfs(bg, b); err != nil {
		t.Fatal(err)
	}
}

func TestTouch(t *testing.T) {
	s := openStore(t)
	img := importBusybox(t, s, "bb:1")
	time.Sleep(10 * time.Millisecond)
	if err := s.Touch(img); err != nil {
		t.Fatal(err)
	}
	again, _ := s.Resolve("bb:1")
	if !again.LastUsed.After(img.LastUsed) {
		t.Errorf("last used %v, was %v", again.LastUsed, img.LastUsed)
	}
}

func TestRootfsOfBusybox(t *testing.T) {
	s := openStore(t)
	img := importBusybox(t, s, "bb:1")
	var wg sync.WaitGroup
	paths := make([]string, 4)
	errs := make([]error, 4)
	for i := range paths {
		wg.Add(1)
		go func() { defer wg.Done(); paths[i], errs[i] = s.Rootfs(bg, img) }()
	}
	wg.Wait()
	for i := range paths {
		if errs[i] != nil || paths[i] != paths[0] {
			t.Fatalf("Rootfs %d: %s %v (first %s)", i, paths[i], errs[i], paths[0])
		}
	}
	disks, _ := os.ReadDir(filepath.Join(s.Root(), "rootfs"))
	if len(disks) != 1 {
		t.Errorf("%d disks, want 1", len(disks))
	}
	fi, _ := os.Stat(paths[0])
	if fi.Mode().Perm() != 0o444 {
		t.Errorf("disk mode %v, want read-only", fi.Mode())
	}
	for req, want := range map[string]string{
		"stat /bin/sh":    `Fast link dest: "busybox"`,
		"stat /tmp":       "Mode:  01777",
		"stat /root":      "Mode:  0700",
		"stat /bin/ls":    "Links: 2",
		"cat /etc/passwd": "root:x:0:0:root:/root:/bin/sh",
	} {
		if got := debugfs(t, paths[0], req); !strings.Contains(got, want) {
			t.Errorf("%s: want %q in\n%s", req, want, got)
		}
	}
	bb, _ := os.ReadFile(imagetest.BusyboxPath)
	if got := debugfs(t, paths[0], "cat /bin/busybox"); got != string(bb) {
		t.Errorf("/bin/busybox differs from the host's (%d vs %d bytes)", len(got), len(bb))
	}
	// Cached: a second call is instant and returns the same file.
	start := time.Now()
	p, err := s.Rootfs(bg, img)
	if err != nil || p != paths[0] || time.Since(start) > 100*time.Millisecond {
		t.Errorf("cached Rootfs: %s %v in %v", p, err, time.Since(start))
	}
}

func TestRootfsCorruptLayer(t *testing.T) {
	s := openStore(t)
	img := importBusybox(t, s, "bb:1")
	p := filepath.Join(s.Root(), "blobs", "sha256", strings.TrimPrefix(img.Layers[0].Digest, "sha256:"))
	b, _ := os.ReadFile(p)
	b[len(b)/2] ^= 0xff
	os.Chmod(p, 0o644)
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := s.Rootfs(bg, img)
	if !errors.Is(err, image.ErrDigestMismatch) && !errors.Is(err, image.ErrInvalidImage) {
		t.Fatalf("got %v, want a digest mismatch", err)
	}
	if got := scratchFiles(t, s); len(got) != 0 {
		t.Errorf("scratch files left: %v", got)
	}
	if disks, _ := os.ReadDir(filepath.Join(s.Root(), "rootfs")); len(disks) != 0 {
		t.Errorf("a disk was left: %v", disks)
	}
}

// A process killed mid-write leaves an unlocked scratch file; the next Open
// removes it, and leaves a file another process is writing alone.
func TestOpenRemovesOrphans(t *testing.T) {
	root := filepath.Join(t.TempDir(), "images")
	s, err := image.Open(root)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	orphan := filepath.Join(root, "tmp", "blob-123")
	os.WriteFile(orphan, []byte("half a layer"), 0o644)
	old := time.Now().Add(-time.Hour)
	os.Chtimes(orphan, old, old)
	s, err = image.Open(root)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := os.Stat(orphan); !os.IsNotExist(err) {
		t.Errorf("orphan scratch file not removed: %v", err)
	}
}

func TestRandomImageRootfs(t *testing.T) {
	s := openStore(t)
	img, err := random.Image(1<<20, 3)
	if err != nil {
		t.Fatal(err)
	}
	got, err := s.Import(bg, "random:1", bytes.NewReader(imagetest.DockerArchive(t, img, "random:1")))
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Layers) != 3 {
		t.Fatalf("%d layers", len(got.Layers))
	}
	if _, err := s.Rootfs(bg, got); err != nil {
		t.Fatal(err)
	}
}
