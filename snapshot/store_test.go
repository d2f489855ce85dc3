package snapshot

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"matchlock.dev/matchlock/sandbox"
	"matchlock.dev/matchlock/state"
)

func newStore(t *testing.T) (*Store, *state.DB) {
	t.Helper()
	t.Setenv("MATCHLOCK_CACHE", t.TempDir())
	db, err := state.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return Open(db), db
}

// fake writes what a snapshot directory holds, without a VM.
func fake(dir string) (*sandbox.SnapshotInfo, error) {
	for _, f := range []string{"vmstate", "memory", "vmm.json", sandbox.SnapshotLayerFile, sandbox.SnapshotInfoFile} {
		if err := os.WriteFile(filepath.Join(dir, f), []byte("x"), 0o600); err != nil {
			return nil, err
		}
	}
	return &sandbox.SnapshotInfo{Image: "busybox"}, nil
}

func deadPid(t *testing.T) int {
	c := exec.Command("true")
	if err := c.Run(); err != nil {
		t.Fatal(err)
	}
	return c.Process.Pid
}

func TestCreateCommitsAtomically(t *testing.T) {
	st, _ := newStore(t)
	ctx := context.Background()
	failed := errors.New("disk full")
	if _, err := st.Create(ctx, Options{Name: "s"}, func(dir string) (*sandbox.SnapshotInfo, error) {
		fake(dir)
		return nil, failed
	}); !errors.Is(err, failed) {
		t.Fatalf("failing take: %v", err)
	}
	if ents, _ := os.ReadDir(st.dir); len(ents) != 0 {
		t.Fatalf("a failed creation left %v", ents)
	}
	row, err := st.Create(ctx, Options{Name: "s"}, fake)
	if err != nil || row.Status != state.SnapshotReady {
		t.Fatalf("create: %+v %v", row, err)
	}
	if _, err := st.Create(ctx, Options{Name: "s"}, fake); !errors.Is(err, state.ErrSnapshotExists) {
		t.Fatalf("duplicate: %v", err)
	}
	es, err := st.List()
	if err != nil || len(es) != 1 || es[0].Files["memory"] == 0 {
		t.Fatalf("list: %+v %v", es, err)
	}
	if _, err := st.Create(ctx, Options{Name: "../x"}, fake); err == nil {
		t.Fatal("a name with a slash was accepted")
	}
}

func TestCleanupRemovesWhatInterruptedCreationsLeft(t *testing.T) {
	st, db := newStore(t)
	os.MkdirAll(st.dir, 0o700)
	dead := deadPid(t)
	// A creator killed while writing: a creating row and its temp dir.
	db.InsertSnapshot(&state.Snapshot{Name: "killed", Status: state.SnapshotCreating, CreatorPID: dead})
	os.Mkdir(filepath.Join(st.dir, tmpPrefix+"killed"), 0o700)
	fake(filepath.Join(st.dir, tmpPrefix+"killed"))
	// Killed between the rename and the commit.
	db.InsertSnapshot(&state.Snapshot{Name: "renamed", Status: state.SnapshotCreating, CreatorPID: dead})
	os.Mkdir(filepath.Join(st.dir, "renamed"), 0o700)
	// Stray directories without rows.
	os.Mkdir(filepath.Join(st.dir, tmpPrefix+"stray"), 0o700)
	os.Mkdir(filepath.Join(st.dir, "orphan"), 0o700)
	// A creation in progress (this process) is left alone.
	db.InsertSnapshot(&state.Snapshot{Name: "busy", Status: state.SnapshotCreating, CreatorPID: os.Getpid(), CreatorStart: state.ProcessStart(os.Getpid())})
	os.Mkdir(filepath.Join(st.dir, tmpPrefix+"busy"), 0o700)

	st.Cleanup()
	ents, _ := os.ReadDir(st.dir)
	if len(ents) != 1 || ents[0].Name() != tmpPrefix+"busy" {
		t.Fatalf("after cleanup: %v", ents)
	}
	for _, n := range []string{"killed", "renamed"} {
		if _, err := db.GetSnapshot(n); !errors.Is(err, state.ErrNoSnapshot) {
			t.Fatalf("row %s after cleanup: %v", n, err)
		}
	}
}

func TestRemoveRefusedWhileInUseAndAutoGoesWithItsUsers(t *testing.T) {
	st, db := newStore(t)
	ctx := context.Background()
	if _, err := st.Create(ctx, Options{Name: "s"}, fake); err != nil {
		t.Fatal(err)
	}
	dir, release, err := st.Acquire("s", "vm-1")
	if err != nil || dir != st.Dir("s") {
		t.Fatalf("acquire: %q %v", dir, err)
	}
	var inUse *InUseError
	if err := st.Remove("s"); !errors.As(err, &inUse) || inUse.Users[0].Holder != "vm-1" {
		t.Fatalf("remove in use: %v", err)
	}
	release()
	if err := st.Remove("s"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(st.Dir("s")); !os.IsNotExist(err) {
		t.Fatalf("files after remove: %v", err)
	}
	if _, _, err := st.Acquire("s", "vm-2"); err == nil {
		t.Fatal("acquired a removed snapshot")
	}

	// An auto (fork) snapshot is held by its maker from the start, and
	// goes when nobody uses it.
	if _, err := st.Create(ctx, Options{Name: "fork-a", Auto: true, Holder: "maker"}, fake); err != nil {
		t.Fatal(err)
	}
	st.Cleanup()
	if _, err := db.GetSnapshot("fork-a"); err != nil {
		t.Fatalf("a held fork snapshot was cleaned up: %v", err)
	}
	db.ReleaseSnapshot("fork-a", "maker")
	st.Cleanup()
	if _, err := db.GetSnapshot("fork-a"); !errors.Is(err, state.ErrNoSnapshot) {
		t.Fatalf("an unused fork snapshot survived: %v", err)
	}
	if _, err := os.Stat(st.Dir("fork-a")); !os.IsNotExist(err) {
		t.Fatalf("fork snapshot files: %v", err)
	}
}
