// Package snapshot stores sandbox snapshots: their files under
// <cache>/snapshots/<name>/ and their rows in the state database, with
// reference counts so that a snapshot is never removed while a sandbox
// restored from it runs (that sandbox maps the snapshot's RAM file).
//
// A snapshot is written into <cache>/snapshots/.tmp-<name> and renamed into
// place only when complete; its row says "creating" (with the creator's
// pid) until then. Whatever an interrupted creation (SIGKILL, disk full)
// leaves behind is removed by the next Cleanup, which every operation of
// this package runs first: rows of creators that are gone, temporary
// directories without a live creator, directories without a row, and auto
// snapshots (made by fork) that no live sandbox uses.
package snapshot

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"matchlock.dev/matchlock/internal/paths"
	"matchlock.dev/matchlock/sandbox"
	"matchlock.dev/matchlock/state"
)

const tmpPrefix = ".tmp-"

// StallEnv, when set to a duration, makes Create wait that long before it
// commits a snapshot. Tests use it to interrupt a creation mid-way.
const StallEnv = "MATCHLOCK_TEST_SNAPSHOT_STALL"

// Store is the snapshot store.
type Store struct {
	db  *state.DB
	dir string
}

// Open returns the store in the state directory, with its metadata in db
// (which lives there too). Snapshots are not in the cache: they are user
// data, and a directory is only ever judged against the database that
// indexes it (Cleanup removes what its database does not know).
func Open(db *state.DB) *Store {
	return &Store{db: db, dir: filepath.Join(paths.StateDir(), "snapshots")}
}

// Dir is where the snapshot called name keeps its files.
func (s *Store) Dir(name string) string { return filepath.Join(s.dir, name) }

// ValidName reports whether name can name a snapshot: letters, digits,
// '.', '_' and '-', at most 64, starting with a letter or digit.
func ValidName(name string) bool {
	if name == "" || len(name) > 64 {
		return false
	}
	for i, c := range name {
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		if !alnum && (i == 0 || (c != '.' && c != '_' && c != '-')) {
			return false
		}
	}
	return true
}

// NewName returns a fresh name: prefix and 8 hex digits.
func NewName(prefix string) string {
	var b [4]byte
	rand.Read(b[:])
	return prefix + hex.EncodeToString(b[:])
}

// Options of Create.
type Options struct {
	Name   string
	Source string // id of the sandbox
	Image  string
	// Auto marks a snapshot made for fork: Cleanup removes it once no
	// live sandbox uses it.
	Auto bool
	// Holder, when set, is recorded as a user of the snapshot (for this
	// process) as it becomes ready: an auto snapshot is never without one.
	Holder string
	// NoSync skips making the files durable before the snapshot is
	// published: for snapshots that are a cache (boot) or die with their
	// users (fork). Auto implies it.
	NoSync bool
}

// Create takes a snapshot: take writes it into a temporary directory,
// which becomes the snapshot once complete and durable.
func (s *Store) Create(ctx context.Context, o Options, take func(dir string) (*sandbox.SnapshotInfo, error)) (*state.Snapshot, error) {
	if !ValidName(o.Name) {
		return nil, fmt.Errorf("snapshot name %q: want letters, digits, '.', '_' or '-', at most 64, starting with a letter or digit", o.Name)
	}
	s.Cleanup()
	if err := os.MkdirAll(s.dir, 0o700); err != nil {
		return nil, err
	}
	pid := os.Getpid()
	row := &state.Snapshot{Name: o.Name, Status: state.SnapshotCreating, Auto: o.Auto, Source: o.Source, Image: o.Image,
		Created: time.Now(), CreatorPID: pid, CreatorStart: state.ProcessStart(pid)}
	if err := s.db.InsertSnapshot(row); err != nil {
		return nil, err
	}
	tmp := filepath.Join(s.dir, tmpPrefix+o.Name)
	final := s.Dir(o.Name)
	fail := func(err error) (*state.Snapshot, error) {
		os.RemoveAll(tmp)
		os.RemoveAll(final)
		s.db.DeleteSnapshot(o.Name)
		return nil, err
	}
	os.RemoveAll(tmp)
	if err := os.Mkdir(tmp, 0o700); err != nil {
		return fail(err)
	}
	info, err := take(tmp)
	if err != nil {
		return fail(err)
	}
	if d, err := time.ParseDuration(os.Getenv(StallEnv)); err == nil {
		time.Sleep(d)
	}
	durable := !o.Auto && !o.NoSync
	if durable {
		// A named snapshot outlives crashes of the host: make it durable
		// before it is published. (A fork's snapshot dies with its forks.)
		if err := syncDir(tmp); err != nil {
			return fail(fmt.Errorf("snapshot: sync: %w", err))
		}
	}
	if err := os.Rename(tmp, final); err != nil {
		return fail(err)
	}
	if durable {
		syncPath(s.dir)
	}
	size, _ := sandbox.DiskUsage(final)
	b, _ := json.Marshal(info)
	if err := s.db.SnapshotReady(o.Name, size, b, o.Holder, pid); err != nil {
		return fail(err)
	}
	row.Status, row.Size, row.Info = state.SnapshotReady, size, b
	return row, nil
}

func syncDir(dir string) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range ents {
		if err := syncPath(filepath.Join(dir, e.Name())); err != nil {
			return err
		}
	}
	return syncPath(dir)
}

func syncPath(p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// Entry is a snapshot with its live users.
type Entry struct {
	*state.Snapshot
	Dir   string              `json:"dir"`
	Users []state.SnapshotRef `json:"users"`
	Files map[string]int64    `json:"files,omitempty"` // bytes on disk per file
}

// Info decodes the snapshot's description.
func (e *Entry) Description() (*sandbox.SnapshotInfo, error) {
	var info sandbox.SnapshotInfo
	if err := json.Unmarshal(e.Info, &info); err != nil {
		return nil, err
	}
	return &info, nil
}

// List returns the ready snapshots with their users.
func (s *Store) List() ([]*Entry, error) {
	s.Cleanup()
	rows, err := s.db.ListSnapshots()
	if err != nil {
		return nil, err
	}
	var out []*Entry
	for _, r := range rows {
		if r.Status != state.SnapshotReady {
			continue
		}
		e, err := s.entry(r)
		if err != nil {
			return nil, err
		}
		out = append(out, e)
	}
	return out, nil
}

// Get returns one ready snapshot.
func (s *Store) Get(name string) (*Entry, error) {
	s.Cleanup()
	r, err := s.db.GetSnapshot(name)
	if err != nil {
		return nil, err
	}
	if r.Status != state.SnapshotReady {
		return nil, fmt.Errorf("%w: %s is still being created", state.ErrNoSnapshot, name)
	}
	return s.entry(r)
}

func (s *Store) entry(r *state.Snapshot) (*Entry, error) {
	users, err := s.db.SnapshotUsers(r.Name)
	if err != nil {
		return nil, err
	}
	if users == nil {
		users = []state.SnapshotRef{}
	}
	dir := s.Dir(r.Name)
	_, files := sandbox.DiskUsage(dir)
	return &Entry{Snapshot: r, Dir: dir, Users: users, Files: files}, nil
}

// InUseError is returned by Remove for a snapshot that running sandboxes
// use.
type InUseError struct {
	Name  string
	Users []state.SnapshotRef
}

func (e *InUseError) Error() string {
	var ids []string
	for _, u := range e.Users {
		ids = append(ids, u.Holder)
	}
	return fmt.Sprintf("snapshot %s is in use by %d running sandbox(es) restored from it (%s): stop them first", e.Name, len(e.Users), strings.Join(ids, ", "))
}

func (e *InUseError) Unwrap() error { return state.ErrSnapshotInUse }

// Remove deletes a snapshot that no running sandbox uses.
func (s *Store) Remove(name string) error {
	s.Cleanup()
	users, err := s.db.RemoveSnapshot(name)
	if len(users) > 0 {
		return &InUseError{Name: name, Users: users}
	}
	if err != nil {
		return err
	}
	return os.RemoveAll(s.Dir(name))
}

// Acquire records that holder (this process) uses the snapshot and
// returns its directory; release forgets it. A sandbox restored from the
// snapshot must hold it for its whole life.
func (s *Store) Acquire(name, holder string) (dir string, release func(), err error) {
	if _, err := s.db.AcquireSnapshot(name, holder, os.Getpid()); err != nil {
		if errors.Is(err, state.ErrNoSnapshot) {
			return "", nil, fmt.Errorf("no snapshot %q: see 'matchlock snapshot ls'", name)
		}
		return "", nil, err
	}
	dir = s.Dir(name)
	if _, err := os.Stat(filepath.Join(dir, sandbox.SnapshotInfoFile)); err != nil {
		s.db.ReleaseSnapshot(name, holder)
		return "", nil, fmt.Errorf("snapshot %s: files missing (%v)", name, err)
	}
	return dir, func() { s.db.ReleaseSnapshot(name, holder) }, nil
}

// Cleanup removes what interrupted creations and finished forks left.
// Errors are ignored: Cleanup runs again at the next operation.
func (s *Store) Cleanup() {
	rows, err := s.db.ListSnapshots()
	if err != nil {
		return
	}
	known := map[string]bool{}
	creating := map[string]bool{}
	for _, r := range rows {
		dir := s.Dir(r.Name)
		switch {
		case r.Status == state.SnapshotCreating && !state.Alive(r.CreatorPID, r.CreatorStart):
			os.RemoveAll(filepath.Join(s.dir, tmpPrefix+r.Name))
			os.RemoveAll(dir)
			s.db.DeleteSnapshot(r.Name)
			continue
		case r.Status == state.SnapshotCreating:
			creating[r.Name] = true
		case r.Auto:
			if users, err := s.db.SnapshotUsers(r.Name); err == nil && len(users) == 0 {
				if _, err := s.db.RemoveSnapshot(r.Name); err == nil {
					os.RemoveAll(dir)
					continue
				}
			}
		default:
			if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
				s.db.DeleteSnapshot(r.Name) // its files were removed by hand
				continue
			}
		}
		known[r.Name] = true
	}
	ents, _ := os.ReadDir(s.dir)
	for _, e := range ents {
		n := e.Name()
		name, isTmp := strings.CutPrefix(n, tmpPrefix)
		if isTmp && creating[name] || !isTmp && known[name] {
			continue
		}
		// Ask again: a creation may have started since we listed the rows
		// (it inserts its row before it makes its directory).
		if r, err := s.db.GetSnapshot(name); err == nil {
			live := r.Status == state.SnapshotCreating && state.Alive(r.CreatorPID, r.CreatorStart)
			if live || !isTmp && r.Status == state.SnapshotReady {
				continue
			}
		} else if !errors.Is(err, state.ErrNoSnapshot) {
			continue
		}
		os.RemoveAll(filepath.Join(s.dir, n))
	}
}
