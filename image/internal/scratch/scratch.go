// Package scratch makes temporary files inside a store, on the same
// filesystem as their final place so that they can be renamed there
// atomically. Each file is flocked by the process writing it; a file left
// behind by a killed process is no longer locked, which is how Clean tells
// an orphan from a file still being written.
package scratch

import (
	"fmt"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"matchlock.dev/matchlock/image/internal/flock"
)

// Dir is a directory of scratch files.
type Dir struct{ path string }

// New uses (and creates) the directory at path.
func New(path string) (*Dir, error) {
	if err := os.MkdirAll(path, 0o755); err != nil {
		return nil, err
	}
	return &Dir{path: path}, nil
}

// Path is the directory's path.
func (d *Dir) Path() string { return d.path }

// File is a locked scratch file. Remove it, or Commit it to its final name.
type File struct {
	*os.File
	done bool
}

// Create makes a new scratch file, locked for this process. pattern is as
// for os.CreateTemp.
func (d *Dir) Create(pattern string) (*File, error) {
	f, err := os.CreateTemp(d.path, pattern)
	if err != nil {
		return nil, err
	}
	if ok, err := flock.TryFile(f); !ok || err != nil {
		// Only a Clean racing the creation can hold it; Clean skips young
		// files, so this does not happen in practice.
		f.Close()
		os.Remove(f.Name())
		return nil, fmt.Errorf("lock scratch file: %v", err)
	}
	return &File{File: f}, nil
}

// Commit syncs the file and renames it to dst (atomically replacing it).
// The file is closed afterwards either way.
func (f *File) Commit(dst string) error {
	if f.done {
		return fmt.Errorf("scratch file already finished")
	}
	f.done = true
	err := f.Sync()
	if err == nil {
		err = os.Rename(f.Name(), dst)
	}
	if err != nil {
		os.Remove(f.Name())
	}
	if cerr := f.Close(); err == nil && cerr != nil {
		err = cerr
	}
	if err == nil {
		err = syncDir(filepath.Dir(dst))
	}
	return err
}

// Remove closes and deletes the file unless it was committed; safe to defer.
func (f *File) Remove() {
	if f.done {
		return
	}
	f.done = true
	f.Close()
	os.Remove(f.Name())
}

// minAge keeps Clean away from files created a moment ago, between their
// creation and their lock.
const minAge = 10 * time.Second

// Clean removes scratch files that no live process holds: what a killed
// process leaves behind. It returns how many it removed.
func (d *Dir) Clean() (int, error) {
	ents, err := os.ReadDir(d.path)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, e := range ents {
		info, err := e.Info()
		if err != nil || !info.Mode().IsRegular() || time.Since(info.ModTime()) < minAge {
			continue
		}
		p := filepath.Join(d.path, e.Name())
		f, err := os.OpenFile(p, os.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			continue
		}
		if ok, _ := flock.TryFile(f); ok {
			if os.Remove(p) == nil {
				n++
			}
		}
		f.Close()
	}
	return n, nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
