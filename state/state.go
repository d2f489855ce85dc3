// Package state records sandboxes in a SQLite database (modernc.org/sqlite,
// WAL, versioned migrations) under the state directory, so that many
// matchlock processes — CLIs and per-sandbox supervisors — can list, find
// and update them concurrently.
package state

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	_ "modernc.org/sqlite"

	"matchlock.dev/matchlock/internal/paths"
)

// Sandbox statuses.
const (
	StatusStarting = "starting" // supervisor launched, VM booting
	StatusRunning  = "running"  // VM up, supervisor serving
	StatusStopped  = "stopped"  // stopped by kill or after its command (clean)
	StatusCrashed  = "crashed"  // supervisor died without cleaning up
)

// Sentinels.
var (
	ErrNotFound  = errors.New("no such sandbox")
	ErrNameInUse = errors.New("name already in use")
)

// Record is one sandbox row. Config never holds secret values.
type Record struct {
	ID              string          `json:"id"`
	Name            string          `json:"name,omitempty"`
	Image           string          `json:"image"`
	Status          string          `json:"status"`
	Created         time.Time       `json:"created"`
	Finished        time.Time       `json:"finished,omitzero"`
	SupervisorPID   int             `json:"supervisor_pid,omitempty"`
	SupervisorStart uint64          `json:"-"` // /proc starttime, guards against pid reuse
	QEMUPID         int             `json:"qemu_pid,omitempty"`
	ExitCode        *int            `json:"exit_code,omitempty"`
	Error           string          `json:"error,omitempty"`
	Config          json.RawMessage `json:"config,omitempty"`
}

// DB is the state database.
type DB struct {
	db  *sql.DB
	dir string
}

var migrations = []string{
	// 1: sandboxes
	`CREATE TABLE sandboxes (
		id TEXT PRIMARY KEY,
		name TEXT UNIQUE,
		image TEXT NOT NULL,
		status TEXT NOT NULL,
		created INTEGER NOT NULL,
		finished INTEGER NOT NULL DEFAULT 0,
		supervisor_pid INTEGER NOT NULL DEFAULT 0,
		supervisor_start INTEGER NOT NULL DEFAULT 0,
		qemu_pid INTEGER NOT NULL DEFAULT 0,
		exit_code INTEGER,
		error TEXT NOT NULL DEFAULT '',
		config TEXT NOT NULL DEFAULT '{}'
	)`,
	// 2: snapshots and the sandboxes using them (see snapshots.go)
	`CREATE TABLE snapshots (
		name TEXT PRIMARY KEY,
		status TEXT NOT NULL,
		auto INTEGER NOT NULL DEFAULT 0,
		source TEXT NOT NULL DEFAULT '',
		image TEXT NOT NULL DEFAULT '',
		created INTEGER NOT NULL,
		creator_pid INTEGER NOT NULL DEFAULT 0,
		creator_start INTEGER NOT NULL DEFAULT 0,
		size INTEGER NOT NULL DEFAULT 0,
		info TEXT NOT NULL DEFAULT '{}'
	);
	CREATE TABLE snapshot_refs (
		snapshot TEXT NOT NULL,
		holder TEXT NOT NULL,
		pid INTEGER NOT NULL,
		pid_start INTEGER NOT NULL,
		created INTEGER NOT NULL,
		PRIMARY KEY (snapshot, holder)
	)`,
}

// Open opens (creating and migrating) the database in dir.
func Open(dir string) (*DB, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	path := filepath.Join(dir, "state.db")
	db, err := sql.Open("sqlite", "file:"+path+"?_pragma=busy_timeout(10000)&_pragma=journal_mode(WAL)&_pragma=synchronous(NORMAL)&_txlock=immediate")
	if err != nil {
		return nil, fmt.Errorf("open state db: %w", err)
	}
	d := &DB{db: db, dir: dir}
	if err := d.migrate(); err != nil {
		db.Close()
		return nil, fmt.Errorf("migrate state db %s: %w", path, err)
	}
	return d, nil
}

// Close closes the database.
func (d *DB) Close() error { return d.db.Close() }

func (d *DB) migrate() error {
	ctx := context.Background()
	tx, err := d.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if _, err := tx.Exec(`CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)`); err != nil {
		return err
	}
	var v int
	err = tx.QueryRow(`SELECT version FROM schema_version`).Scan(&v)
	if errors.Is(err, sql.ErrNoRows) {
		if _, err := tx.Exec(`INSERT INTO schema_version VALUES (0)`); err != nil {
			return err
		}
	} else if err != nil {
		return err
	}
	if v > len(migrations) {
		return fmt.Errorf("schema version %d is newer than this matchlock (%d): upgrade matchlock", v, len(migrations))
	}
	for i := v; i < len(migrations); i++ {
		if _, err := tx.Exec(migrations[i]); err != nil {
			return fmt.Errorf("migration %d: %w", i+1, err)
		}
	}
	if _, err := tx.Exec(`UPDATE schema_version SET version = ?`, len(migrations)); err != nil {
		return err
	}
	return tx.Commit()
}

const cols = `id, coalesce(name, ''), image, status, created, finished, supervisor_pid, supervisor_start, qemu_pid, exit_code, error, config`

func scan(row interface{ Scan(...any) error }) (*Record, error) {
	var r Record
	var created, finished int64
	var exit sql.NullInt64
	var cfg string
	if err := row.Scan(&r.ID, &r.Name, &r.Image, &r.Status, &created, &finished, &r.SupervisorPID, &r.SupervisorStart, &r.QEMUPID, &exit, &r.Error, &cfg); err != nil {
		return nil, err
	}
	r.Created = time.Unix(0, created)
	if finished > 0 {
		r.Finished = time.Unix(0, finished)
	}
	if exit.Valid {
		c := int(exit.Int64)
		r.ExitCode = &c
	}
	r.Config = json.RawMessage(cfg)
	return &r, nil
}

// Insert adds a new sandbox. A taken name gives ErrNameInUse.
func (d *DB) Insert(r *Record) error {
	var name any
	if r.Name != "" {
		name = r.Name
	}
	cfg := string(r.Config)
	if cfg == "" {
		cfg = "{}"
	}
	_, err := d.db.Exec(`INSERT INTO sandboxes (id, name, image, status, created, config) VALUES (?, ?, ?, ?, ?, ?)`,
		r.ID, name, r.Image, r.Status, r.Created.UnixNano(), cfg)
	if err != nil && strings.Contains(err.Error(), "UNIQUE constraint failed: sandboxes.name") {
		return fmt.Errorf("%w: %q", ErrNameInUse, r.Name)
	}
	return err
}

// Get finds a sandbox by id, unique id prefix, or name.
func (d *DB) Get(ref string) (*Record, error) {
	if ref == "" {
		return nil, ErrNotFound
	}
	r, err := scan(d.db.QueryRow(`SELECT `+cols+` FROM sandboxes WHERE id = ? OR name = ?`, ref, ref))
	if err == nil {
		return r, nil
	}
	if !errors.Is(err, sql.ErrNoRows) {
		return nil, err
	}
	rows, err := d.db.Query(`SELECT `+cols+` FROM sandboxes WHERE id LIKE ? ESCAPE '\'`, escapeLike(ref)+"%")
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var found []*Record
	for rows.Next() {
		r, err := scan(rows)
		if err != nil {
			return nil, err
		}
		found = append(found, r)
	}
	switch len(found) {
	case 0:
		return nil, fmt.Errorf("%w: %s", ErrNotFound, ref)
	case 1:
		return found[0], nil
	}
	return nil, fmt.Errorf("%q matches %d sandboxes: give more of the id", ref, len(found))
}

func escapeLike(s string) string {
	r := strings.NewReplacer(`\`, `\\`, `%`, `\%`, `_`, `\_`)
	return r.Replace(s)
}

// List returns all sandboxes, newest first.
func (d *DB) List() ([]*Record, error) {
	rows, err := d.db.Query(`SELECT ` + cols + ` FROM sandboxes ORDER BY created DESC`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*Record
	for rows.Next() {
		r, err := scan(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

// SetRunning records the processes of a booted sandbox.
func (d *DB) SetRunning(id string, supervisorPID int, supervisorStart uint64, qemuPID int) error {
	return d.exec(`UPDATE sandboxes SET status = ?, supervisor_pid = ?, supervisor_start = ?, qemu_pid = ? WHERE id = ?`,
		StatusRunning, supervisorPID, supervisorStart, qemuPID, id)
}

// SetSupervisor records the supervisor of a starting sandbox.
func (d *DB) SetSupervisor(id string, pid int, start uint64) error {
	return d.exec(`UPDATE sandboxes SET supervisor_pid = ?, supervisor_start = ? WHERE id = ?`, pid, start, id)
}

// Finish records the end of a sandbox.
func (d *DB) Finish(id, status string, exitCode *int, errMsg string) error {
	var ec any
	if exitCode != nil {
		ec = *exitCode
	}
	return d.exec(`UPDATE sandboxes SET status = ?, exit_code = coalesce(?, exit_code), error = ?, finished = ? WHERE id = ? AND status IN (?, ?)`,
		status, ec, errMsg, time.Now().UnixNano(), id, StatusStarting, StatusRunning)
}

// Delete removes a sandbox row.
func (d *DB) Delete(id string) error { return d.exec(`DELETE FROM sandboxes WHERE id = ?`, id) }

func (d *DB) exec(q string, args ...any) error {
	res, err := d.db.Exec(q, args...)
	if err != nil {
		return err
	}
	_ = res
	return nil
}

// DefaultDir is the state directory's database location.
func OpenDefault() (*DB, error) { return Open(paths.StateDir()) }

// ProcessStart returns the start time of pid (clock ticks since boot, from
// /proc/PID/stat), which with the pid identifies a process across pid
// reuse. 0 if the process does not exist.
func ProcessStart(pid int) uint64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The command name may contain spaces and parentheses: fields
	// start after the last ')'.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(b[i+1:]))
	// field 22 overall is starttime; after ')' the first field is #3,
	// the state. A zombie has exited: it only waits for its reaper.
	if len(f) < 20 || f[0] == "Z" || f[0] == "X" {
		return 0
	}
	v, _ := strconv.ParseUint(f[19], 10, 64)
	return v
}

// Alive reports whether the recorded process still exists.
func Alive(pid int, start uint64) bool {
	if pid <= 0 {
		return false
	}
	s := ProcessStart(pid)
	return s != 0 && (start == 0 || s == start)
}

// Refresh marks starting/running sandboxes whose supervisor is gone as
// crashed, and returns the current list.
func (d *DB) Refresh() ([]*Record, error) {
	rs, err := d.List()
	if err != nil {
		return nil, err
	}
	for _, r := range rs {
		if r.Status != StatusRunning && r.Status != StatusStarting {
			continue
		}
		if r.SupervisorPID == 0 && time.Since(r.Created) < time.Minute {
			continue // being launched right now
		}
		if !Alive(r.SupervisorPID, r.SupervisorStart) {
			if err := d.Finish(r.ID, StatusCrashed, nil, "supervisor died"); err != nil {
				return nil, err
			}
			r.Status, r.Error = StatusCrashed, "supervisor died"
		}
	}
	return rs, nil
}
