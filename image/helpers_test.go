package image_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"matchlock.dev/matchlock/image"
)

var hostPlatform = "linux/" + runtime.GOARCH

func openStore(t testing.TB, opts ...image.Option) *image.Store {
	t.Helper()
	s, err := image.Open(filepath.Join(t.TempDir(), "images"), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func push(t testing.TB, ref string, img v1.Image) {
	t.Helper()
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
}

func pushIndex(t testing.TB, ref string, idx v1.ImageIndex) {
	t.Helper()
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.WriteIndex(r, idx); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
}

func digestOf(t testing.TB, img v1.Image) string {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d.String()
}

// blobFiles lists the store's blobs.
func blobFiles(t testing.TB, s *image.Store) map[string]bool {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(s.Root(), "blobs", "sha256"))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	for _, e := range ents {
		out["sha256:"+e.Name()] = true
	}
	return out
}

// scratchFiles lists what is left in the store's scratch directory.
func scratchFiles(t testing.TB, s *image.Store) []string {
	t.Helper()
	ents, _ := os.ReadDir(filepath.Join(s.Root(), "tmp"))
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

func debugfs(t testing.TB, img, req string) string {
	t.Helper()
	out, err := exec.Command("debugfs", "-R", req, img).CombinedOutput()
	if err != nil {
		t.Fatalf("debugfs %q: %v\n%s", req, err, out)
	}
	s := string(out)
	if strings.HasPrefix(s, "debugfs ") {
		s = s[strings.Index(s, "\n")+1:]
	}
	return s
}

var bg = context.Background()

func imagetestConfig() v1.Config { return v1.Config{Cmd: []string{"/bin/sh"}} }
