package rootfs

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/Microsoft/hcsshim/ext4/tar2ext4"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// TestGGCRExtractComparison records why the package merges layers itself
// instead of feeding go-containerregistry's mutate.Extract to tar2ext4: with
// ggcr v0.22.1 opaque directories are right, but Extract walks layers top
// down, so a hard link made in a lower layer to a name that an upper layer
// replaces ends up linked to the upper file (or, made in an upper layer to a
// lower file, comes before its target and fails).
func TestGGCRExtractComparison(t *testing.T) {
	lower := layerTar(t, file("a", "old"), hardlink("b", "a"), file("o/lower", "l"))
	upper := layerTar(t, file("a", "new"), file("o/.wh..wh..opq", ""), file("o/upper", "u"))

	ours, _ := buildExt4(t, lower, upper)
	if got := cat(t, ours, "/b"); got != "old" {
		t.Errorf("ours: /b = %q, want old", got)
	}
	if exists(t, ours, "/o/lower") || !exists(t, ours, "/o/upper") {
		t.Error("ours: opaque directory not applied")
	}

	img := empty.Image
	for _, l := range [][]byte{lower, upper} {
		layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(l)), nil })
		if err != nil {
			t.Fatal(err)
		}
		if img, err = mutate.AppendLayers(img, layer); err != nil {
			t.Fatal(err)
		}
	}
	theirs := filepath.Join(t.TempDir(), "ggcr.ext4")
	f, err := os.Create(theirs)
	if err != nil {
		t.Fatal(err)
	}
	rc := mutate.Extract(img)
	defer rc.Close()
	if err := tar2ext4.ConvertTarToExt4(rc, f, tar2ext4.ConvertWhiteout); err != nil {
		t.Logf("ggcr Extract + tar2ext4: %v", err)
		return
	}
	f.Close()
	t.Logf("ggcr Extract: /b = %q (want old), opaque applied: %v", cat(t, theirs, "/b"),
		!exists(t, theirs, "/o/lower") && exists(t, theirs, "/o/upper"))
}
