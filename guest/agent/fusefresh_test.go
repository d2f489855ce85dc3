package agent

import (
	"fmt"
	"testing"
	"time"
)

func TestFreshDirs(t *testing.T) {
	f := newFreshDirs(time.Hour)
	if _, ok := f.absent(5, "a"); ok {
		t.Fatal("a directory not made here is fresh")
	}
	f.made(5)
	if left, ok := f.absent(5, "a"); !ok || left <= 0 || left > time.Hour {
		t.Fatalf("new directory: absent %v %v", left, ok)
	}
	f.add(5, "a")
	if _, ok := f.absent(5, "a"); ok {
		t.Fatal("a name made here is absent")
	}
	if _, ok := f.absent(5, "b"); !ok {
		t.Fatal("b is not absent")
	}
	f.remove(5, "a")
	if _, ok := f.absent(5, "a"); !ok {
		t.Fatal("a removed name is not absent")
	}
	f.add(6, "x") // not fresh: ignored
	if _, ok := f.absent(6, "y"); ok {
		t.Fatal("adding to an unfresh directory made it fresh")
	}
	f.drop(5)
	if _, ok := f.absent(5, "b"); ok {
		t.Fatal("dropped directory still fresh")
	}

	f.made(7)
	for i := 0; i <= maxFreshNames; i++ {
		f.add(7, fmt.Sprint(i))
	}
	if _, ok := f.absent(7, "other"); ok {
		t.Fatal("a directory over maxFreshNames stayed fresh")
	}

	expired := newFreshDirs(0)
	expired.made(1)
	if _, ok := expired.absent(1, "a"); ok {
		t.Fatal("fresh past its time")
	}

	full := newFreshDirs(time.Hour)
	for i := 0; i < maxFreshDirs+10; i++ {
		full.made(uint64(i))
	}
	if len(full.dirs) > maxFreshDirs {
		t.Fatalf("%d fresh directories kept", len(full.dirs))
	}
}
