package scratch

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestCleanRemovesOnlyOrphans(t *testing.T) {
	d, err := New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	live, err := d.Create("live-*")
	if err != nil {
		t.Fatal(err)
	}
	defer live.Remove()
	orphan := filepath.Join(d.Path(), "orphan")
	young := filepath.Join(d.Path(), "young")
	os.WriteFile(orphan, nil, 0o644)
	os.WriteFile(young, nil, 0o644)
	old := time.Now().Add(-time.Hour)
	os.Chtimes(orphan, old, old)
	os.Chtimes(live.Name(), old, old)

	n, err := d.Clean()
	if err != nil || n != 1 {
		t.Fatalf("Clean = %d, %v; want 1", n, err)
	}
	for p, want := range map[string]bool{orphan: false, young: true, live.Name(): true} {
		if _, err := os.Stat(p); (err == nil) != want {
			t.Errorf("%s exists = %v, want %v", p, err == nil, want)
		}
	}
}

func TestCommit(t *testing.T) {
	d, _ := New(t.TempDir())
	f, err := d.Create("x-*")
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("data")
	dst := filepath.Join(t.TempDir(), "dst")
	if err := f.Commit(dst); err != nil {
		t.Fatal(err)
	}
	f.Remove() // no-op after Commit
	if b, _ := os.ReadFile(dst); string(b) != "data" {
		t.Errorf("committed %q", b)
	}
	if ents, _ := os.ReadDir(d.Path()); len(ents) != 0 {
		t.Errorf("scratch dir not empty: %v", ents)
	}
}
