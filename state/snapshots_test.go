package state

import (
	"errors"
	"os"
	"os/exec"
	"testing"
	"time"
)

func TestSnapshotRefsAndRemove(t *testing.T) {
	db, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	now := time.Now()
	if err := db.InsertSnapshot(&Snapshot{Name: "s", Status: SnapshotCreating, Created: now, CreatorPID: os.Getpid()}); err != nil {
		t.Fatal(err)
	}
	if err := db.InsertSnapshot(&Snapshot{Name: "s", Status: SnapshotCreating, Created: now}); !errors.Is(err, ErrSnapshotExists) {
		t.Fatalf("duplicate name: %v", err)
	}
	if _, err := db.AcquireSnapshot("s", "a", os.Getpid()); !errors.Is(err, ErrNoSnapshot) {
		t.Fatalf("acquire of a snapshot being created: %v", err)
	}
	if _, err := db.RemoveSnapshot("s"); !errors.Is(err, ErrSnapshotInUse) {
		t.Fatalf("remove of a snapshot being created by a live process: %v", err)
	}
	if err := db.SnapshotReady("s", 42, []byte(`{"x":1}`), "", 0); err != nil {
		t.Fatal(err)
	}
	if _, err := db.AcquireSnapshot("s", "a", os.Getpid()); err != nil {
		t.Fatal(err)
	}
	// A reference held by a process that is gone counts for nothing.
	dead := exec.Command("true")
	dead.Run()
	if _, err := db.AcquireSnapshot("s", "b", dead.Process.Pid); err != nil {
		t.Fatal(err)
	}
	users, err := db.RemoveSnapshot("s")
	if !errors.Is(err, ErrSnapshotInUse) || len(users) != 1 || users[0].Holder != "a" {
		t.Fatalf("remove in use: %v %+v", err, users)
	}
	db.ReleaseSnapshot("s", "a")
	if _, err := db.RemoveSnapshot("s"); err != nil {
		t.Fatal(err)
	}
	if _, err := db.GetSnapshot("s"); !errors.Is(err, ErrNoSnapshot) {
		t.Fatalf("after remove: %v", err)
	}
	// An auto snapshot is referenced from the moment it is ready.
	db.InsertSnapshot(&Snapshot{Name: "auto", Status: SnapshotCreating, Auto: true, Created: now, CreatorPID: os.Getpid()})
	if err := db.SnapshotReady("auto", 1, nil, "maker", os.Getpid()); err != nil {
		t.Fatal(err)
	}
	if u, _ := db.SnapshotUsers("auto"); len(u) != 1 {
		t.Fatalf("users of a fresh auto snapshot: %+v", u)
	}
	// Reopening keeps the schema (migrations are not re-run).
	list, err := db.ListSnapshots()
	if err != nil || len(list) != 1 || !list[0].Auto {
		t.Fatalf("list: %+v %v", list, err)
	}
}
