package index

import (
	"database/sql"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestMigrationsAndNames(t *testing.T) {
	path := filepath.Join(t.TempDir(), "index.db")
	d, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Unix(1700000000, 0)
	img := Image{Digest: "sha256:" + strings.Repeat("a", 64), MediaType: "m", ConfigDigest: "sha256:c", Platform: "linux/amd64",
		Config: []byte("{}"), Layers: []Layer{{Digest: "sha256:l", Size: 3}}, Size: 5, Created: now, Added: now, LastUsed: now}
	if err := d.Put(img, []Name{{Repo: "r", Tag: "1"}, {Repo: "r", Pinned: "sha256:idx"}}); err != nil {
		t.Fatal(err)
	}
	d.Close()

	// Reopening applies nothing twice.
	if d, err = Open(path); err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	got, err := d.Get(img.Digest)
	if err != nil || got.Layers[0].Digest != "sha256:l" || !got.Created.Equal(now) {
		t.Fatalf("Get = %+v, %v", got, err)
	}
	n, err := d.Lookup("r@sha256:idx")
	if err != nil || n.Digest != img.Digest || n.Pinned != "sha256:idx" {
		t.Fatalf("Lookup digest name = %+v, %v", n, err)
	}
	if rows, _ := d.ByPrefix("aaaa"); len(rows) != 1 {
		t.Errorf("ByPrefix found %d", len(rows))
	}
	if rows, _ := d.ByPrefix("aa%"); len(rows) != 0 {
		t.Errorf("ByPrefix took a LIKE pattern")
	}
	if gone, err := d.RemoveName("r:1"); err != nil || gone {
		t.Fatalf("RemoveName(r:1) = %v, %v", gone, err)
	}
	if gone, err := d.RemoveName("r@sha256:idx"); err != nil || !gone {
		t.Fatalf("RemoveName(last) = %v, %v", gone, err)
	}
	if _, err := d.Get(img.Digest); !errors.Is(err, ErrNotFound) {
		t.Fatalf("image left: %v", err)
	}
}

func TestRefusesNewerSchema(t *testing.T) {
	path := filepath.Join(t.TempDir(), "index.db")
	d, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
	raw, _ := sql.Open("sqlite", path)
	raw.Exec(`PRAGMA user_version = 99`)
	raw.Close()
	if _, err := Open(path); err == nil || !strings.Contains(err.Error(), "upgrade matchlock") {
		t.Fatalf("got %v", err)
	}
}
